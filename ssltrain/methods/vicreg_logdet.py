"""VICReg with a LogDet entropy term (the information-theoretic view of VICReg, Shwartz-Ziv et al. 2023).

The variance and covariance terms are replaced by ``1/2 logdet(I + alpha Cov)`` per branch, an estimate of the
embedding's entropy, which is maximised; the invariance term is VICReg's. Computed on the gathered batch.
"""

from __future__ import annotations

from torch import Tensor

from ssltrain.config import Config, VICRegLogDetConfig
from ssltrain.losses import vicreg_logdet_loss
from ssltrain.methods.base import TwoViewMethod


class VICRegLogDet(TwoViewMethod):
    cfg: VICRegLogDetConfig

    @classmethod
    def section(cls, cfg: Config) -> object:
        return cfg.method.vicreg_logdet

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        c = self.cfg
        return vicreg_logdet_loss(z_a, z_b, c.sim_weight, c.entropy_weight, c.alpha)
