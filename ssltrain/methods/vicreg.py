"""VICReg (Bardes, Ponce, LeCun, ICLR 2022): invariance + variance hinge + covariance decorrelation."""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import VICRegConfig
from ssltrain.data.loader import Views
from ssltrain.losses import vicreg_loss
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class VICReg(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: VICRegConfig) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        z = self.encode_views(views, self.projector)
        c = self.cfg
        terms = [
            vicreg_loss(z[i], z[j], c.sim_weight, c.var_weight, c.cov_weight, c.gamma, c.eps)
            for i, j in view_pairs(len(views.global_views), len(views.local_views))
        ]
        return average_terms(terms)
