"""VCReg-style orthonormality: invariance + ||E[z z^T] - I||_F^2, estimated without bias from two half-batches.

The product of two independent estimates of E[z z^T] - I has the squared norm as its expectation, where the
square of one estimate would add the estimator's variance. The halves are the first and second half of the
gathered batch (which is randomly ordered), so the estimate is the same on any number of ranks.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import VCRegConfig
from ssltrain.data.loader import Views
from ssltrain.distributed import gather
from ssltrain.losses import vcreg_loss
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class VCReg(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: VCRegConfig,
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
        return average_terms([vcreg_loss(z[i], z[j], c.sim_weight, c.ortho_weight) for i, j in pairs])
