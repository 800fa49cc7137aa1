"""VCReg-style orthonormality: invariance + ||E[z z^T] - I||_F^2, estimated without bias from two half-batches.

The product of two independent estimates of E[z z^T] - I has the squared norm as its expectation, where the
square of one estimate would add the estimator's variance. The halves are the first and second half of the
gathered batch (which is randomly ordered), so the estimate is the same on any number of ranks.
"""

from __future__ import annotations

from torch import Tensor

from ssltrain.config import Config, VCRegConfig
from ssltrain.losses import vcreg_loss
from ssltrain.methods.base import TwoViewMethod


class VCReg(TwoViewMethod):
    cfg: VCRegConfig

    @classmethod
    def section(cls, cfg: Config) -> object:
        return cfg.method.vcreg

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        return vcreg_loss(z_a, z_b, self.cfg.sim_weight, self.cfg.ortho_weight)
