"""Heads on top of the backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


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


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, official ``DINOHead``).

    ``layers`` Linear layers (Linear-GELU between them, BatchNorm after each hidden Linear only with ``use_bn``)
    map to a ``bottleneck_dim`` vector, which is L2-normalised and fed to a weight-normalised, bias-free
    ``Linear(bottleneck_dim, out_dim)``: ``W = g * V / ||V||`` row-wise (``torch.nn.utils.parametrizations
    .weight_norm``, ``dim=0``). ``g`` starts at 1; with ``norm_last_layer`` it stays frozen at 1 (every
    prototype row of ``W`` has unit norm, so logits are cosine similarities), which the DINO authors found
    stabilises ViT training. MLP Linears get trunc-normal(std .02) weights and zero biases; ``V`` keeps
    PyTorch's default Linear init, as in the reference code. ``last_layer`` is exposed so a method can cancel
    its gradients during the first epoch(s) (``freeze_last_layer``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a DINO head needs at least one layer, got layers={layers}")
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            mods: list[nn.Module] = []
            dim = in_dim
            for _ in range(layers - 1):
                mods.append(nn.Linear(dim, hidden_dim))
                if use_bn:
                    mods.append(nn.BatchNorm1d(hidden_dim))
                mods.append(nn.GELU())
                dim = hidden_dim
            mods.append(nn.Linear(dim, bottleneck_dim))
            self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck vector (before the last layer)."""
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))


class Prototypes(nn.Linear):
    """SwAV prototypes (Caron et al. 2020): a bias-free ``Linear(dim, count)`` whose rows are the prototypes.

    The method calls ``normalize_()`` (under ``torch.no_grad``) before each forward so every row has unit L2
    norm and the scores of L2-normalised embeddings are cosine similarities. Rows are also unit-norm at
    construction.
    """

    def __init__(self, dim: int, count: int) -> None:
        super().__init__(dim, count, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1, p=2))
