"""VICReg (Bardes, Ponce, LeCun, ICLR 2022): invariance + variance hinge + covariance decorrelation.

As in the official code, the variance and covariance are statistics of the batch gathered from all ranks; the
whole loss is computed on the gathered batch, so it equals the single-process loss on that batch. With
``loss.impl`` auto or triton the variance and covariance come from the fused kernel (the D x D covariance is
never formed); the eager path is :func:`ssltrain.losses.vicreg_loss` itself.
"""

from __future__ import annotations

from torch import Tensor

from ssltrain.config import Config, VICRegConfig
from ssltrain.losses import dispatch
from ssltrain.methods.base import TwoViewMethod


class VICReg(TwoViewMethod):
    cfg: VICRegConfig

    @classmethod
    def section(cls, cfg: Config) -> object:
        return cfg.method.vicreg

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        c = self.cfg
        return dispatch.vicreg(z_a, z_b, c.sim_weight, c.var_weight, c.cov_weight, c.gamma, c.eps, impl=self.loss_impl)
