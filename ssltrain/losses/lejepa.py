"""LeJEPA (Balestriero & LeCun 2025, arXiv 2511.08544): a prediction loss between views plus SIGReg, the sketched
isotropic Gaussian regulariser, with one trade-off weight.

SIGReg projects the embeddings on random unit directions and scores each 1-D projection with the Epps-Pulley
statistic, the weighted L2 distance between its empirical characteristic function (ECF) and that of N(0, 1),
integrated with the trapezoidal rule on a fixed grid. The ECF is a mean over the samples, so under data
parallelism its sums are all-reduced with autograd: every rank computes the loss of the whole batch and an input's
gradient, summed by the backward over ranks, follows the single-process one (the convention of
:mod:`ssltrain.core.collectives`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ssltrain.core.collectives import all_reduce_sum
from ssltrain.losses.common import check_positive, check_views, compute_dtype


def sigreg_directions(
    dim: int,
    num_slices: int,
    seed: int,
    step: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(dim, num_slices)`` unit-norm columns, Gaussian directions drawn from a CPU generator seeded by
    ``(seed, step)``: the same on every rank and device, and again after a resume at that step.

    The CPU generator keeps 32 bits of its seed, so the seed is a 32-bit hash of ``seed`` plus ``step`` (mod 2**32):
    within a run every step below 2**32 has its own draw.
    """
    if dim < 1 or num_slices < 1:
        raise ValueError(f"dim and num_slices must be >= 1, got {dim} and {num_slices}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {step}")
    base = int.from_bytes(hashlib.sha256(f"sigreg/{seed}".encode()).digest()[:4], "little")
    g = torch.Generator().manual_seed((base + step) % 2**32)
    a = torch.randn(dim, num_slices, generator=g, dtype=torch.float64)
    a = a / a.norm(dim=0, keepdim=True)
    return a.to(device=device, dtype=dtype)


def epps_pulley_grid(num_points: int, t_max: float, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes ``t >= 0`` and weights of the trapezoidal rule on ``num_points`` equispaced points of
    ``[-t_max, t_max]``, times the window ``exp(-t^2 / 2)``, folded onto ``t >= 0``.

    The integrand ``|ECF(t) - exp(-t^2/2)|^2`` is even (``ECF(-t)`` is the conjugate of ``ECF(t)``), so each node
    ``t > 0`` stands for itself and ``-t``: its weight doubles, and only half the grid is evaluated.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    check_positive(t_max, "t_max")
    t = torch.linspace(-t_max, t_max, num_points, dtype=torch.float64)
    w = torch.full((num_points,), 2 * t_max / (num_points - 1), dtype=torch.float64)
    w[[0, -1]] /= 2
    half = num_points // 2
    t, w = t[half:].abs(), 2 * w[half:]
    if num_points % 2 == 1:  # t = 0 is its own mirror
        w[0] /= 2
    return t.to(dtype), (w * torch.exp(-t.square() / 2)).to(dtype)


EcfSums = Callable[[Tensor, Tensor, Tensor], Tensor]


def ecf_sums(z: Tensor, directions: Tensor, t: Tensor) -> Tensor:
    """``(2, ..., S, T)``: this rank's sums over the rows of ``cos`` and ``sin`` of ``t * (z @ directions)``, in
    ``t``'s dtype (the specification of the fused kernel ``ssltrain.kernels.sigreg_sums``)."""
    x = (z.to(t.dtype) @ directions.to(t.dtype)).unsqueeze(-1) * t  # (..., N, S, T)
    return torch.stack([x.cos().sum(dim=-3), x.sin().sum(dim=-3)])


def sigreg(
    z: Tensor, directions: Tensor, num_points: int = 17, t_max: float = 5.0, sums: EcfSums | None = None
) -> Tensor:
    """SIGReg: the Epps-Pulley statistic of each projection ``z @ directions``, averaged over slices (and views).

    ``z`` is ``(N, D)`` or ``(V, N, D)`` (V views scored separately, one all-reduce); ``directions`` ``(D, S)``.
    With ``x = z @ a`` and the ECF ``phi(t) = 1/N sum_n exp(i t x_n)`` over the N rows of all ranks:

    ``T(x) = N * integral |phi(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt``  (trapezoid, ``num_points`` on
    ``[-t_max, t_max]``, see :func:`epps_pulley_grid`); returns the mean of ``T`` over slices and views.
    ``sums`` computes this rank's ECF sums (:func:`ecf_sums`, the default; the dispatcher passes the fused kernel).
    """
    if z.dim() not in (2, 3) or directions.dim() != 2 or directions.shape[0] != z.shape[-1]:
        raise ValueError(
            f"z must be (N, D) or (V, N, D) and directions (D, S), got {tuple(z.shape)} and {tuple(directions.shape)}"
        )
    dtype = compute_dtype(z, directions)
    t, weights = epps_pulley_grid(num_points, t_max, dtype)
    t, weights = t.to(z.device), weights.to(z.device)
    with torch.autocast(z.device.type, enabled=False):  # phases t * x need the projection in >= float32
        total = all_reduce_sum((sums or ecf_sums)(z, directions, t).to(dtype))  # (2, ..., S, T): all ranks
        n = all_reduce_sum(torch.tensor(float(z.shape[-2]), dtype=dtype, device=z.device))
        cos_mean, sin_mean = total[0] / n, total[1] / n
        err = (cos_mean - torch.exp(-t.square() / 2)).square() + sin_mean.square()
        return (err @ weights * n).mean()


def lejepa_loss(
    views: Sequence[Tensor],
    num_global: int,
    directions: Tensor,
    lambd: float = 0.05,
    num_points: int = 17,
    t_max: float = 5.0,
    sums: EcfSums | None = None,
) -> dict[str, Tensor]:
    """LeJEPA: ``loss = (1 - lambd) * prediction + lambd * sigreg``.

    ``views``: V ``(N, D)`` embeddings of the same N samples, the ``num_global`` global views first.
    ``prediction = 1/(V N D) * sum_{v,n,d} (c - z_v)[n, d]^2`` with ``c`` the mean of the global views'
    embeddings (no stop-gradient); ``sigreg`` = :func:`sigreg` of every view (global and local) on the same
    ``directions``, averaged over views. N counts the rows of all ranks: both terms are those of the whole batch.
    ``sums``: as in :func:`sigreg`.
    """
    check_views(list(views), "views")
    if not 1 <= num_global <= len(views):
        raise ValueError(f"num_global must be in [1, {len(views)}], got {num_global}")
    if any(v.shape != views[0].shape for v in views):
        raise ValueError(f"every view must have one (N, D) shape, got {[tuple(v.shape) for v in views]}")
    if not 0.0 <= lambd <= 1.0:
        raise ValueError(f"lambd must be in [0, 1], got {lambd}")
    dtype = compute_dtype(*views)
    z = torch.stack([v.to(dtype) for v in views])  # (V, N, D)
    center = z[:num_global].mean(dim=0)
    sq_sum = all_reduce_sum((center - z).square().sum())
    count = all_reduce_sum(torch.tensor(float(z.numel()), dtype=dtype, device=z.device))
    prediction = sq_sum / count
    regulariser = sigreg(z, directions, num_points, t_max, sums)
    loss = (1 - lambd) * prediction + lambd * regulariser
    return {"loss": loss, "prediction": prediction, "sigreg": regulariser}
