"""VICReg with a pairwise-distance entropy term (Kolchinsky & Tracey 2017 estimator of a Gaussian mixture's entropy).

The anti-collapse term is the entropy of the mixture of isotropic Gaussians centred on the batch's embeddings,
estimated from pairwise KL (upper bound) or Bhattacharyya (lower bound) distances; computed on the gathered batch.
"""

from __future__ import annotations

from torch import Tensor

from ssltrain.config import Config, VICRegPairwiseConfig
from ssltrain.losses import vicreg_pairwise_loss
from ssltrain.methods.base import TwoViewMethod


class VICRegPairwise(TwoViewMethod):
    cfg: VICRegPairwiseConfig

    @classmethod
    def section(cls, cfg: Config) -> object:
        return cfg.method.vicreg_pairwise

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        c = self.cfg
        return vicreg_pairwise_loss(z_a, z_b, c.sim_weight, c.entropy_weight, c.sigma, c.distance)
