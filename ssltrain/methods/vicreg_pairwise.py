"""VICReg with a pairwise-distance entropy term (Kolchinsky & Tracey 2017 estimator of a Gaussian mixture's entropy).

The anti-collapse term is the entropy of the mixture of isotropic Gaussians centred on the batch's embeddings,
estimated from pairwise KL (upper bound) or Bhattacharyya (lower bound) distances; computed on the gathered batch.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import VICRegPairwiseConfig
from ssltrain.data.loader import Views
from ssltrain.distributed import gather
from ssltrain.losses import vicreg_pairwise_loss
from ssltrain.methods.base import Method, average_terms, view_pairs
from ssltrain.models.heads import MLP


class VICRegPairwise(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: VICRegPairwiseConfig,
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
        return average_terms([
            vicreg_pairwise_loss(z[i], z[j], c.sim_weight, c.entropy_weight, c.sigma, c.distance) for i, j in pairs
        ])
