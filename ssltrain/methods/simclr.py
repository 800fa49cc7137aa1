"""SimCLR (Chen et al., ICML 2020): NT-Xent over the other samples of the global batch as negatives.

Each rank computes the loss of its own rows against the columns of all ranks (gathered with autograd), so the
mean over ranks is the loss of the whole batch, at 1/W of the logits per rank.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain import kernels
from ssltrain.config import SimCLRConfig
from ssltrain.data.loader import Views
from ssltrain.distributed import gather, local_rows, world_size
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class SimCLR(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: SimCLRConfig,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        z = self.encode_views(views, self.projector)
        self.watch(z[0])
        rows = local_rows(z[0].shape[0], z[0].device) if world_size() > 1 else None
        z = [gather(v) for v in z]
        pairs = view_pairs(len(views.global_views), len(views.local_views))
        return average_terms([
            kernels.nt_xent(z[i], z[j], self.cfg.temperature, rows=rows, impl=self.loss_impl) for i, j in pairs
        ])
