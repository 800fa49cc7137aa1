"""Cheap collapse monitors on a batch of embeddings, for logging next to the loss.

Every function works on a detached copy under ``torch.no_grad``, on whatever device ``z`` lives, in float32
(float64 stays float64; half precision is upcast), and returns python floats. Costs are one SVD of the (N, D)
batch (``O(N D min(N, D))``) and one Cholesky of a ``min(N, D)``-sized matrix, so call them every few hundred
steps, not every step, for large N and D.

Keys of ``embedding_monitors(z, prefix)``:

- ``{prefix}_std``: mean over dimensions of the per-dimension std (unbiased) of raw ``z``.
- ``{prefix}_std_min``: the smallest per-dimension std (one dead dimension shows here first).
- ``{prefix}_std_normalized``: mean per-dimension std of the L2-normalised rows, times ``sqrt(D)``: about 1
  when the embeddings spread over the sphere, 0 when they have collapsed to one point (the SimSiam monitor,
  Chen & He 2021, whose collapsed value is 0 and whose isotropic-Gaussian value is 1/sqrt(D) before scaling).
- ``{prefix}_rankme``: RankMe (Garrido et al., ICML 2023), the exponential of the entropy of the normalised
  singular values: between ~1 (rank one, e.g. full collapse) and ``min(N, D)`` (all singular values equal).
- ``{prefix}_logdet_entropy``: ``ssltrain.losses.logdet_entropy(z, alpha=1) / D``, nats per dimension.

For plots and eval-time checks, :func:`spectrum` gives the singular-value spectrum of the centred batch (the
standard deviations along the principal axes): a spectrum that drops to ~0 after a few values is dimensional
collapse (Jing et al., ICLR 2022). :func:`collapse_warnings` turns monitor values into warnings, for the log
and the run report, against thresholds the caller passes (``eval.collapse_rankme`` / ``eval.collapse_std``).

Edge cases: every key is always present, so logs keep the same columns. With N = 1 the batch statistics are
undefined and ``_std``, ``_std_min``, ``_std_normalized`` and ``_logdet_entropy`` are ``nan`` (RankMe of one
row is defined: 1). A batch with any non-finite entry gives ``nan`` for every key instead of raising, so a
diverging run still logs. ``MetricsLog`` writes ``nan`` as the string ``"nan"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses import logdet_entropy

__all__ = ["collapse_warnings", "embedding_monitors", "rankme", "singular_values", "spectrum"]

MONITOR_KEYS = ("std", "std_min", "std_normalized", "rankme", "logdet_entropy")


def _prepare(z: Tensor) -> Tensor:
    if z.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) tensor, got shape {tuple(z.shape)}")
    if z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"embeddings must have N >= 1 rows and D >= 1 columns, got shape {tuple(z.shape)}")
    dtype = torch.promote_types(torch.float32, z.dtype)
    return z.detach().to(dtype)


@torch.no_grad()
def singular_values(z: Tensor) -> Tensor:
    """Singular values of the (N, D) batch ``z`` (not centred), descending, ``min(N, D)`` of them."""
    return torch.linalg.svdvals(_prepare(z))


def _rankme_from_singular_values(s: Tensor, eps: float) -> float:
    # An all-zero batch would give 0/0; clamping the sum makes every p_k = eps and the result ~1 (fully collapsed).
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return math.exp(float(-(p * torch.log(p)).sum()))


@torch.no_grad()
def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023): ``exp(-sum_k p_k log p_k)``, ``p_k = s_k / sum(s) + eps``.

    ``s`` are the singular values of ``z`` as given (N x D, not centred, as in the paper). A matrix of rank r
    with r equal singular values scores r (up to ``eps``); a rank-one matrix scores ~1.
    """
    return _rankme_from_singular_values(singular_values(z), eps)


@torch.no_grad()
def spectrum(z: Tensor, center: bool = True) -> Tensor:
    """Singular values of the (centred) batch divided by ``sqrt(N - 1)``: the standard deviations of ``z`` along
    its principal axes, descending (the square roots of the covariance eigenvalues).

    ``min(N - 1, D)`` values when centred (centring removes one direction, so with N <= D the last singular value
    is zero by construction and is left out), ``min(N, D)`` otherwise. Needs N >= 2. The data behind the
    report's spectrum plot: how many directions the embeddings really use.
    """
    z = _prepare(z)
    n, d = z.shape
    if n < 2:
        raise ValueError(f"a spectrum needs at least 2 rows, got {n}")
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(z) / math.sqrt(n - 1)
    return s[: min(n - 1, d)] if center else s


def collapse_warnings(
    monitors: Mapping[str, Any], prefix: str, rankme_min: float, std_min: float, max_rank: int | None = None
) -> list[str]:
    """Warnings for monitor values under the thresholds: ``{prefix}_rankme < rankme_min`` or
    ``{prefix}_std_normalized < std_min`` (the scale-free std; raw std depends on the method's scale).

    ``max_rank``: ``min(N, D)`` of the batch the monitors came from, when known. RankMe cannot exceed it, so the
    RankMe threshold becomes ``min(rankme_min, max_rank / 2)``: a batch of 8 with RankMe 7 is not collapsed.
    Missing and non-finite values (strings such as ``"nan"`` from metrics.jsonl included) give no warning: a
    diverged run has its own loud symptoms, and a missing monitor is not a collapse.
    """
    out = []
    if max_rank is not None:
        rankme_min = min(rankme_min, max_rank / 2)
    checks = (("rankme", rankme_min, "RankMe (effective rank)"), ("std_normalized", std_min, "normalised std"))
    for key, limit, what in checks:
        value = _as_float(monitors.get(f"{prefix}_{key}"))
        if value is not None and value < limit:
            out.append(
                f"{prefix}_{key} = {value:.4g} < {limit:g}: {what} this low means the {prefix} space has collapsed"
                " onto few directions"
            )
    return out


def _as_float(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@torch.no_grad()
def embedding_monitors(z: Tensor, prefix: str = "emb") -> dict[str, float]:
    """Collapse monitors of one (N, D) embedding batch; see the module docstring for the keys."""
    z = _prepare(z)
    n, d = z.shape
    out = {f"{prefix}_{key}": math.nan for key in MONITOR_KEYS}
    if not bool(torch.isfinite(z).all()):
        return out
    out[f"{prefix}_rankme"] = _rankme_from_singular_values(torch.linalg.svdvals(z), 1e-7)
    if n < 2:
        return out
    std = z.std(dim=0, correction=1)
    out[f"{prefix}_std"] = float(std.mean())
    out[f"{prefix}_std_min"] = float(std.min())
    out[f"{prefix}_std_normalized"] = float(F.normalize(z, dim=1).std(dim=0, correction=1).mean()) * math.sqrt(d)
    # LinAlgError only on overflow of the Gram matrix (|z| ~ 1e19 in float32): the entry stays nan
    with contextlib.suppress(torch.linalg.LinAlgError):
        out[f"{prefix}_logdet_entropy"] = float(logdet_entropy(z, alpha=1.0)) / d
    return out
