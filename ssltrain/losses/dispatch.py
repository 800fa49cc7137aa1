"""The one place that picks, per call, the eager reference or the fused Triton kernel of a loss (``loss.impl``).

Only the losses below have a kernel; every other loss is its eager reference alone. ``impl`` is ``"auto"``,
``"triton"`` or ``"eager"``, resolved by :func:`ssltrain.kernels.resolve_impl` from the inputs' devices. Both
paths validate the inputs with the reference's own checks, so a bad input fails the same way on either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import ssltrain.kernels as kernels
from ssltrain.losses.barlow_twins import barlow_twins_loss, check_barlow_twins
from ssltrain.losses.cissl import check_cissl, cissl_loss
from ssltrain.losses.common import check_batch, compute_dtype
from ssltrain.losses.infonce import check_nt_xent, nt_xent_loss
from ssltrain.losses.lejepa import EcfSums, lejepa_loss
from ssltrain.losses.lejepa import sigreg as _eager_sigreg
from ssltrain.losses.vicreg import vicreg_loss
from ssltrain.losses.vicreg import vicreg_regularizer as _eager_regularizer

__all__ = ["barlow_twins", "cissl", "lejepa", "nt_xent", "sigreg", "vicreg", "vicreg_regularizer"]


def vicreg_regularizer(z: Tensor, gamma: float = 1.0, eps: float = 1e-4, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``(variance_hinge(z, gamma, eps), covariance_offdiag(z))`` of one VICReg branch."""
    if kernels.resolve_impl(impl, z) == "eager":
        return _eager_regularizer(z, gamma, eps)
    check_batch(z, "z")
    return kernels.vicreg_regularizer(z, gamma, eps)


def vicreg(
    z_a: Tensor,
    z_b: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    impl: str = "auto",
) -> dict[str, Tensor]:
    """:func:`ssltrain.losses.vicreg_loss`, each branch's variance and covariance from the fused kernel (the
    D x D covariance is never formed) when ``impl`` resolves to triton."""
    if kernels.resolve_impl(impl, z_a, z_b) == "eager":
        return vicreg_loss(z_a, z_b, sim_weight, var_weight, cov_weight, gamma, eps)

    def fused(z: Tensor) -> tuple[Tensor, Tensor]:
        return vicreg_regularizer(z, gamma, eps, impl="triton")

    return vicreg_loss(z_a, z_b, sim_weight, var_weight, cov_weight, gamma, eps, regularizer=fused)


def barlow_twins(
    z_a: Tensor, z_b: Tensor, lambd: float = 0.0051, eps: float = 1e-5, impl: str = "auto"
) -> dict[str, Tensor]:
    """:func:`ssltrain.losses.barlow_twins_loss`: dict with ``loss``, ``on_diag``, ``off_diag``."""
    if kernels.resolve_impl(impl, z_a, z_b) == "eager":
        return barlow_twins_loss(z_a, z_b, lambd, eps)
    check_barlow_twins(z_a, z_b, lambd, eps)
    return kernels.barlow_twins(z_a, z_b, lambd, eps)


def nt_xent(
    z_a: Tensor, z_b: Tensor, temperature: float = 0.1, rows: Tensor | None = None, impl: str = "auto"
) -> dict[str, Tensor]:
    """:func:`ssltrain.losses.nt_xent_loss`: dict with ``loss`` and (detached) ``accuracy``."""
    if kernels.resolve_impl(impl, z_a, z_b) == "eager":
        return nt_xent_loss(z_a, z_b, temperature, rows=rows)
    idx = check_nt_xent(z_a, z_b, temperature, rows)
    return kernels.nt_xent(z_a, z_b, temperature, idx, all_rows=rows is None)


def cissl(
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    temperature: float = 0.07,
    rows: Tensor | None = None,
    impl: str = "auto",
) -> dict[str, Tensor]:
    """:func:`ssltrain.losses.cissl_loss`: dict with ``loss`` and (detached) ``accuracy``."""
    if kernels.resolve_impl(impl, s_a, s_b, t_a, t_b) == "eager":
        return cissl_loss(s_a, s_b, t_a, t_b, temperature, rows=rows)
    idx = check_cissl(s_a, s_b, t_a, t_b, temperature, rows)
    return kernels.cissl(s_a, s_b, t_a, t_b, temperature, idx, all_rows=rows is None)


def _sigreg_sums(impl: str, z: Sequence[Tensor], directions: Tensor) -> EcfSums | None:
    """The fused ECF sums when ``impl`` resolves to triton and the kernel applies (float32 compute, directions
    without a gradient); None (the eager :func:`ssltrain.losses.lejepa.ecf_sums`) otherwise."""
    if kernels.resolve_impl(impl, *z, directions) == "eager":
        return None
    if compute_dtype(*z, directions) == torch.float64 or directions.requires_grad:
        return None
    return kernels.sigreg_sums


def sigreg(z: Tensor, directions: Tensor, num_points: int = 17, t_max: float = 5.0, impl: str = "auto") -> Tensor:
    """:func:`ssltrain.losses.lejepa.sigreg`, its projections and characteristic-function sums from the fused
    kernel (N x S x T never formed) when ``impl`` resolves to triton; the all-reduce stays the reference's."""
    return _eager_sigreg(z, directions, num_points, t_max, sums=_sigreg_sums(impl, [z], directions))


def lejepa(
    views: Sequence[Tensor],
    num_global: int,
    directions: Tensor,
    lambd: float = 0.05,
    num_points: int = 17,
    t_max: float = 5.0,
    impl: str = "auto",
) -> dict[str, Tensor]:
    """:func:`ssltrain.losses.lejepa_loss`, SIGReg's sums as in :func:`sigreg`."""
    sums = _sigreg_sums(impl, list(views), directions)
    return lejepa_loss(views, num_global, directions, lambd, num_points, t_max, sums=sums)
