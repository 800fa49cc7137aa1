"""SimCLR (Chen et al., ICML 2020): NT-Xent over the other samples of the batch as negatives."""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import SimCLRConfig
from ssltrain.data.loader import Views
from ssltrain.losses import nt_xent_loss
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class SimCLR(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: SimCLRConfig) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        z = self.encode_views(views, self.projector)
        terms = [
            nt_xent_loss(z[i], z[j], self.cfg.temperature)
            for i, j in view_pairs(len(views.global_views), len(views.local_views))
        ]
        return average_terms(terms)
