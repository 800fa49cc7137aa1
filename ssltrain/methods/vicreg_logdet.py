"""VICReg with a LogDet entropy term (the information-theoretic view of VICReg, Shwartz-Ziv et al. 2023).

The variance and covariance terms are replaced by ``1/2 logdet(I + alpha Cov)`` per branch, an estimate of the
embedding's entropy, which is maximised; the invariance term is VICReg's. Computed on the gathered batch.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import VICRegLogDetConfig
from ssltrain.data.loader import Views
from ssltrain.distributed import gather
from ssltrain.losses import vicreg_logdet_loss
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class VICRegLogDet(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: VICRegLogDetConfig,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        z = self.encode_views(views, self.projector)
        self.watch(z[0])
        z = [gather(v) for v in z]
        c = self.cfg
        pairs = view_pairs(len(views.global_views), len(views.local_views))
        return average_terms([vicreg_logdet_loss(z[i], z[j], c.sim_weight, c.entropy_weight, c.alpha) for i, j in pairs])
