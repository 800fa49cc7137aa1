"""VICReg (Bardes, Ponce, LeCun, ICLR 2022): invariance + variance hinge + covariance decorrelation.

As in the official code, the variance and covariance are statistics of the batch gathered from all ranks; the
whole loss is computed on the gathered batch, so it equals the single-process loss on that batch. With
``loss.impl`` auto or triton the variance and covariance come from the fused kernel (the D x D covariance is
never formed); the eager path is :func:`ssltrain.losses.vicreg_loss` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain import kernels
from ssltrain.config import VICRegConfig
from ssltrain.losses import vicreg_loss
from ssltrain.methods.base import TwoViewMethod


def vicreg_terms(z_a: Tensor, z_b: Tensor, c: VICRegConfig, impl: str) -> dict[str, Tensor]:
    """The VICReg loss through the fused regulariser when ``impl`` resolves to triton, else the reference."""
    if kernels.resolve_impl(impl, z_a, z_b) == "eager":
        return vicreg_loss(z_a, z_b, c.sim_weight, c.var_weight, c.cov_weight, c.gamma, c.eps)
    dtype = torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)  # as the reference
    invariance = F.mse_loss(z_a.to(dtype), z_b.to(dtype))
    var_a, cov_a = kernels.vicreg_regularizer(z_a, c.gamma, c.eps, impl="triton")
    var_b, cov_b = kernels.vicreg_regularizer(z_b, c.gamma, c.eps, impl="triton")
    variance, covariance = (var_a + var_b) / 2, cov_a + cov_b
    loss = c.sim_weight * invariance + c.var_weight * variance + c.cov_weight * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


class VICReg(TwoViewMethod):
    cfg: VICRegConfig

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        return vicreg_terms(z_a, z_b, self.cfg, self.loss_impl)
