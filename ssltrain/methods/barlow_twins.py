"""Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of the two views' standardised embeddings
pushed to the identity. The correlation is over the batch gathered from all ranks (the official code all-reduces
it), so the loss equals the single-process loss on that batch; fused kernel on GPU."""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain import kernels
from ssltrain.config import BarlowTwinsConfig
from ssltrain.data.loader import Views
from ssltrain.distributed import gather
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class BarlowTwins(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: BarlowTwinsConfig,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        z = self.encode_views(views, self.projector)
        self.watch(z[0])
        z = [gather(v) for v in z]
        pairs = view_pairs(len(views.global_views), len(views.local_views))
        return average_terms([kernels.barlow_twins(z[i], z[j], self.cfg.lambd, impl=self.loss_impl) for i, j in pairs])
