"""Eager reference implementations of the self-supervised losses, in plain torch.

This module is the specification: fused kernels and distributed variants are tested against it, so every
function favours exactness and readability over speed. Each loss is one function whose docstring states the
formula; inputs are upcast to at least float32 (bf16/fp16 -> float32, float64 stays float64) before any
arithmetic, because variances, Gram matrices and log-sum-exps lose too much in half precision.

Shapes: ``z_a`` and ``z_b`` are ``(N, D)`` embeddings of two views of the same N samples; row ``i`` of
``z_a`` and row ``i`` of ``z_b`` are a positive pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["covariance_offdiag", "logdet_entropy", "nt_xent_loss", "variance_hinge", "vicreg_loss"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The common dtype of the inputs, but never below float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_batch(z: Tensor, name: str, min_rows: int = 2) -> None:
    if z.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) tensor of embeddings, got shape {tuple(z.shape)}")
    if z.shape[0] < min_rows:
        raise ValueError(
            f"{name} has N={z.shape[0]} rows but this loss needs N >= {min_rows} "
            "(batch statistics / negatives are undefined for a single sample)"
        )
    if z.shape[1] < 1:
        raise ValueError(f"{name} has D=0 features, got shape {tuple(z.shape)}")


def _check_pair(z_a: Tensor, z_b: Tensor) -> None:
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must have the same (N, D) shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    _check_batch(z_a, "z_a")
    _check_batch(z_b, "z_b")


def variance_hinge(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg variance term of one branch: keeps every dimension's batch std above ``gamma`` (anti-collapse).

    ``v(z) = 1/D * sum_j relu(gamma - sqrt(Var(z[:, j]) + eps))`` with the unbiased variance (divisor N - 1).
    ``eps`` sits inside the square root so the gradient stays finite when a dimension has collapsed.
    """
    _check_batch(z, "z")
    z = z.to(_compute_dtype(z))
    std = torch.sqrt(z.var(dim=0, correction=1) + eps)
    return F.relu(gamma - std).mean()


def covariance_offdiag(z: Tensor) -> Tensor:
    """VICReg covariance term of one branch: pushes distinct dimensions to be decorrelated.

    With ``z_c = z - mean(z, dim=0)`` and ``C = z_c^T z_c / (N - 1)`` (D x D), returns
    ``c(z) = 1/D * sum_{i != j} C[i, j]^2``. The diagonal (the variances) is masked out, not subtracted,
    so there is no cancellation against the usually much larger diagonal.
    """
    _check_batch(z, "z")
    z = z.to(_compute_dtype(z))
    n, d = z.shape
    z_c = z - z.mean(dim=0)
    cov = (z_c.T @ z_c) / (n - 1)
    off = cov.masked_fill(torch.eye(d, dtype=torch.bool, device=z.device), 0.0)
    return off.pow(2).sum() / d


def logdet_entropy(z: Tensor, alpha: float = 1.0) -> Tensor:
    """LogDet entropy estimate of the embedding distribution (Zhouyin & Liu 2021), in nats.

    ``H(z) = 1/2 * logdet(I_D + alpha * C)`` with ``C = z_c^T z_c / (N - 1)`` the unbiased covariance. When
    N < D, Sylvester's identity ``det(I_D + A^T A) = det(I_N + A A^T)`` gives the same value from the N x N
    Gram matrix, which is cheaper and better conditioned. The matrix is positive definite, so a Cholesky
    factor gives the log-determinant stably.
    """
    _check_batch(z, "z")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    z = z.to(_compute_dtype(z))
    n, d = z.shape
    z_c = (z - z.mean(dim=0)) * (alpha / (n - 1)) ** 0.5
    gram = z_c @ z_c.T if n < d else z_c.T @ z_c
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + gram)
    return torch.log(torch.diagonal(chol)).sum()


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, Tensor]:
    """VICReg (Bardes, Ponce, LeCun, ICLR 2022), matching the official facebookresearch/vicreg code.

    ``invariance = 1/(N*D) * sum_{n,d} (z_a - z_b)[n, d]^2`` (``F.mse_loss``)
    ``variance   = (v(z_a) + v(z_b)) / 2``  with ``v`` = :func:`variance_hinge`
    ``covariance = c(z_a) + c(z_b)``        with ``c`` = :func:`covariance_offdiag` (summed, not averaged,
    as in the official code)
    ``loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance``

    Returns the weighted ``loss`` and the three unweighted terms, all in the compute dtype (>= float32).
    """
    _check_pair(z_a, z_b)
    dtype = _compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)

    invariance = F.mse_loss(z_a, z_b)
    variance = (variance_hinge(z_a, gamma, eps) + variance_hinge(z_b, gamma, eps)) / 2
    covariance = covariance_offdiag(z_a) + covariance_offdiag(z_b)
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


def nt_xent_loss(z_a: Tensor, z_b: Tensor, temperature: float = 0.1) -> dict[str, Tensor]:
    """NT-Xent, the normalised-temperature cross-entropy of SimCLR (Chen et al., ICML 2020).

    Stack the L2-normalised views ``u = [z_a / |z_a|; z_b / |z_b|]`` (2N x D); logits ``s[i, k] = u_i . u_k / t``
    for ``k != i`` (self-similarity excluded); the positive of row ``i`` is its other view ``p(i) = (i + N) mod 2N``:

    ``loss = 1/(2N) * sum_i [ -s[i, p(i)] + log sum_{k != i} exp(s[i, k]) ]``

    ``accuracy`` (detached) is the fraction of the 2N rows whose positive logit is strictly greater than every
    negative logit; ties count as wrong, so a collapsed embedding scores 0 rather than 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_pair(z_a, z_b)
    dtype = _compute_dtype(z_a, z_b)
    n = z_a.shape[0]

    u = F.normalize(torch.cat([z_a, z_b]).to(dtype), dim=1)
    logits = (u @ u.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(2 * n, device=u.device)
    positive = (idx + n) % (2 * n)

    loss = F.cross_entropy(logits, positive)

    with torch.no_grad():
        pos_logit = logits[idx, positive]
        negatives = logits.clone()
        negatives[idx, positive] = float("-inf")
        accuracy = (pos_logit > negatives.max(dim=1).values).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}
