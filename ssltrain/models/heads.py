"""Heads on top of the backbone."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Sequential):
    """Projector: Linear-BN-ReLU for each hidden width, then a plain Linear (the VICReg/SimCLR/BYOL form)."""

    def __init__(self, in_dim: int, widths: list[int], last_bn: bool = False) -> None:
        if not widths:
            raise ValueError("a projector needs at least one layer width (method.projector)")
        layers: list[nn.Module] = []
        dim = in_dim
        for width in widths[:-1]:
            layers += [nn.Linear(dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            dim = width
        layers.append(nn.Linear(dim, widths[-1], bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(widths[-1], affine=False))
        super().__init__(*layers)
        self.out_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)
