"""VICReg and its information-theoretic variants: invariance plus an anti-collapse term per branch (variance and
covariance, a LogDet entropy, or a pairwise-distance entropy)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_batch, check_pair, check_positive, compute_dtype


def variance_hinge(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg variance term of one branch: keeps every dimension's batch std above ``gamma`` (anti-collapse).

    ``v(z) = 1/D * sum_j relu(gamma - sqrt(Var(z[:, j]) + eps))`` with the unbiased variance (divisor N - 1).
    ``eps`` sits inside the square root so the gradient stays finite when a dimension has collapsed.
    """
    check_batch(z, "z")
    z = z.to(compute_dtype(z))
    std = torch.sqrt(z.var(dim=0, correction=1) + eps)
    return F.relu(gamma - std).mean()


def covariance_offdiag(z: Tensor) -> Tensor:
    """VICReg covariance term of one branch: pushes distinct dimensions to be decorrelated.

    With ``z_c = z - mean(z, dim=0)`` and ``C = z_c^T z_c / (N - 1)`` (D x D), returns
    ``c(z) = 1/D * sum_{i != j} C[i, j]^2``. The diagonal (the variances) is masked out, not subtracted,
    so there is no cancellation against the usually much larger diagonal.
    """
    check_batch(z, "z")
    z = z.to(compute_dtype(z))
    n, d = z.shape
    z_c = z - z.mean(dim=0)
    cov = (z_c.T @ z_c) / (n - 1)
    off = cov.masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0.0)
    return off.pow(2).sum() / d


Regularizer = Callable[[Tensor], tuple[Tensor, Tensor]]  # one branch's (variance, covariance) from its embeddings


def vicreg_regularizer(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """``(variance_hinge(z, gamma, eps), covariance_offdiag(z))``: what the fused kernel computes in one pass."""
    return variance_hinge(z, gamma, eps), covariance_offdiag(z)


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    regularizer: Regularizer | None = None,
) -> dict[str, Tensor]:
    """VICReg (Bardes, Ponce, LeCun, ICLR 2022), matching the official facebookresearch/vicreg code.

    ``invariance = 1/(N*D) * sum_{n,d} (z_a - z_b)[n, d]^2`` (``F.mse_loss``)
    ``variance   = (v(z_a) + v(z_b)) / 2``  with ``v`` = :func:`variance_hinge`
    ``covariance = c(z_a) + c(z_b)``        with ``c`` = :func:`covariance_offdiag` (summed, not averaged,
    as in the official code)
    ``loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance``

    Returns the weighted ``loss`` and the three unweighted terms, all in the compute dtype (>= float32).
    ``regularizer`` computes ``(v(z), c(z))`` of a branch from its embeddings as given, so that the fused kernel
    (:mod:`ssltrain.losses.dispatch`) shares this composition; None: :func:`vicreg_regularizer` on the branches
    cast to the common compute dtype.
    """
    check_pair(z_a, z_b)
    dtype = compute_dtype(z_a, z_b)
    if regularizer is None:
        z_a, z_b = z_a.to(dtype), z_b.to(dtype)
        regularizer = functools.partial(vicreg_regularizer, gamma=gamma, eps=eps)
    invariance = F.mse_loss(z_a.to(dtype), z_b.to(dtype))
    (var_a, cov_a), (var_b, cov_b) = regularizer(z_a), regularizer(z_b)
    variance = (var_a + var_b) / 2
    covariance = cov_a + cov_b
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


def logdet_entropy(z: Tensor, alpha: float = 1.0) -> Tensor:
    """LogDet entropy estimate of the embedding distribution (Zhouyin & Liu 2021), in nats.

    ``H(z) = 1/2 * logdet(I_D + alpha * C)`` with ``C = z_c^T z_c / (N - 1)`` the unbiased covariance. When
    N < D, Sylvester's identity ``det(I_D + A^T A) = det(I_N + A A^T)`` gives the same value from the N x N
    Gram matrix, which is cheaper and better conditioned. The matrix is positive definite, so a Cholesky
    factor gives the log-determinant stably.
    """
    check_batch(z, "z")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    z = z.to(compute_dtype(z))
    n, d = z.shape
    z_c = (z - z.mean(dim=0)) * (alpha / (n - 1)) ** 0.5
    gram = z_c @ z_c.T if n < d else z_c.T @ z_c
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + gram)
    return torch.log(torch.diagonal(chol)).sum()


def _invariance_minus_entropy(
    z_a: Tensor, z_b: Tensor, entropy_of: Callable[[Tensor], Tensor], sim_weight: float, entropy_weight: float
) -> dict[str, Tensor]:
    """``sim_weight * mse(z_a, z_b) - entropy_weight * (H(z_a) + H(z_b)) / (2 D)``: the VICReg variants' shape."""
    check_pair(z_a, z_b)
    dtype = compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)
    invariance = F.mse_loss(z_a, z_b)
    entropy = (entropy_of(z_a) + entropy_of(z_b)) / (2 * z_a.shape[1])
    loss = sim_weight * invariance - entropy_weight * entropy
    return {"loss": loss, "invariance": invariance, "entropy": entropy}


def vicreg_logdet_loss(
    z_a: Tensor, z_b: Tensor, sim_weight: float = 25.0, entropy_weight: float = 25.0, alpha: float = 64.0
) -> dict[str, Tensor]:
    """VICReg, information-theoretic variant (Shwartz-Ziv et al., 2023): LogDet entropy instead of var/cov.

    ``invariance = F.mse_loss(z_a, z_b)`` (as in :func:`vicreg_loss`)
    ``entropy = (H(z_a) + H(z_b)) / (2 D)`` with ``H`` = :func:`logdet_entropy` (nats per dimension)
    ``loss = sim_weight * invariance - entropy_weight * entropy``
    """
    return _invariance_minus_entropy(z_a, z_b, lambda z: logdet_entropy(z, alpha), sim_weight, entropy_weight)


_PAIRWISE_DISTANCES = {"kl": 2.0, "bhattacharyya": 8.0}


def pairwise_entropy(z: Tensor, sigma: float = 1.0, distance: str = "kl") -> Tensor:
    """Pairwise-distance entropy estimate (Kolchinsky & Tracey, 2017) of a Gaussian mixture, in nats.

    The mixture has N equally weighted components ``N(z_i, sigma^2 I_d)``:

    ``H = -1/N * sum_i log( 1/N * sum_j exp(-D_ij) ) + d/2 * log(2 pi e sigma^2)``

    with ``D_ij = |z_i - z_j|^2 / (2 sigma^2)`` (the KL divergence between components; an upper bound on the
    mixture entropy) for ``distance="kl"`` or ``D_ij = |z_i - z_j|^2 / (8 sigma^2)`` (the Bhattacharyya
    distance; a lower bound) for ``distance="bhattacharyya"``. The inner sum is a log-sum-exp. Squared distances
    use the expanded form ``|z_i|^2 + |z_j|^2 - 2 z_i . z_j`` on the centred batch (shift-invariant, less
    cancellation), clamped at 0, with the diagonal set to exactly 0. N = 1 is allowed (one Gaussian).
    """
    check_batch(z, "z", min_rows=1)
    check_positive(sigma, "sigma")
    if distance not in _PAIRWISE_DISTANCES:
        raise ValueError(f"distance must be one of {sorted(_PAIRWISE_DISTANCES)}, got {distance!r}")
    z = z.to(compute_dtype(z))
    n, d = z.shape

    z_c = z - z.mean(dim=0)
    sq_norm = z_c.pow(2).sum(dim=1)
    sq_dist = (sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - 2 * (z_c @ z_c.T)).clamp_min(0.0)
    sq_dist = sq_dist.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), 0.0)
    div = sq_dist / (_PAIRWISE_DISTANCES[distance] * sigma**2)
    mixture_term = -(torch.logsumexp(-div, dim=1) - math.log(n)).mean()
    return mixture_term + 0.5 * d * math.log(2 * math.pi * math.e * sigma**2)


def vicreg_pairwise_loss(
    z_a: Tensor,
    z_b: Tensor,
    sim_weight: float = 25.0,
    entropy_weight: float = 100.0,
    sigma: float = 1.0,
    distance: str = "kl",
) -> dict[str, Tensor]:
    """VICReg, information-theoretic variant with the pairwise-distance entropy estimator.

    ``invariance = F.mse_loss(z_a, z_b)``
    ``entropy = (H(z_a) + H(z_b)) / (2 D)`` with ``H`` = :func:`pairwise_entropy` (nats per dimension)
    ``loss = sim_weight * invariance - entropy_weight * entropy``
    """
    return _invariance_minus_entropy(
        z_a, z_b, lambda z: pairwise_entropy(z, sigma, distance), sim_weight, entropy_weight
    )
