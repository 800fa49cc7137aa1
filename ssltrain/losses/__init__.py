"""Eager reference implementations of the self-supervised losses, in plain torch.

This module is the specification: fused kernels and distributed variants are tested against it, so every
function favours exactness and readability over speed. Each loss is one function whose docstring states the
formula; inputs are upcast to at least float32 (bf16/fp16 -> float32, float64 stays float64) before any
arithmetic, because variances, Gram matrices and log-sum-exps lose too much in half precision.

Shapes: ``z_a`` and ``z_b`` are ``(N, D)`` embeddings of two views of the same N samples; row ``i`` of
``z_a`` and row ``i`` of ``z_b`` are a positive pair. Losses over the stacked 2N rows ``[view a; view b]``
(NT-Xent, CISSL) take an optional ``rows`` index so that a distributed caller can evaluate only its own rows
against the gathered batch; the mean over equal-sized row partitions equals the full loss.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "covariance_offdiag",
    "logdet_entropy",
    "marginal_entropy",
    "nt_xent_loss",
    "variance_hinge",
    "vicreg_loss",
    "barlow_twins_loss",
    "cissl_loss",
    "vicreg_logdet_loss",
    "pairwise_entropy",
    "vicreg_pairwise_loss",
    "orthonormality_penalty",
    "vcreg_loss",
    "diet_loss",
    "dissl_loss",
    "byol_loss",
    "dino_loss",
    "sinkhorn_knopp",
    "swav_loss",
]


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


def _check_pair(z_a: Tensor, z_b: Tensor, min_rows: int = 2) -> None:
    _check_same(min_rows, z_a=z_a, z_b=z_b)


def _check_same(min_rows: int = 2, **tensors: Tensor) -> None:
    """All named tensors must share one (N, D) shape, with N >= ``min_rows``."""
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].shape != first.shape:
            listed = " and ".join(names) if len(names) == 2 else ", ".join(names)
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors.values())
            raise ValueError(f"{listed} must have the same (N, D) shape, got {shapes}")
    for name, t in tensors.items():
        _check_batch(t, name, min_rows)


def _check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_rows(rows: Tensor | None, total: int, device: torch.device) -> Tensor:
    """Validate an optional 1-D index into the ``total`` stacked rows; ``None`` means all of them."""
    if rows is None:
        return torch.arange(total, device=device)
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(
            "rows must be a 1-D integer (LongTensor) index into the 2N stacked rows, got "
            f"{rows.dtype if isinstance(rows, Tensor) else type(rows).__name__} "
            f"of shape {tuple(rows.shape) if isinstance(rows, Tensor) else ()}"
        )
    if rows.numel() == 0:
        raise ValueError("rows is empty: the mean over zero rows is undefined")
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= total:
        raise ValueError(f"rows must lie in [0, {total}) (the 2N stacked rows), got values in [{lo}, {hi}]")
    return rows.to(device=device, dtype=torch.long)


def _entropy(p: Tensor, log_p: Tensor) -> Tensor:
    """Row-wise Shannon entropy ``-sum_c p_c log p_c`` from probabilities and their (finite) logs."""
    return -(p * log_p).sum(dim=-1)


def marginal_entropy(marginal: Tensor) -> Tensor:
    """``H[M] = -sum_c M_c log M_c`` of a distribution; ``log M`` of ``M`` clamped at the smallest positive normal
    number, so a class whose mass underflows to 0 adds 0 (not NaN) and its gradient stays finite."""
    return _entropy(marginal, torch.log(marginal.clamp_min(torch.finfo(marginal.dtype).tiny)))


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


def nt_xent_loss(
    z_a: Tensor, z_b: Tensor, temperature: float = 0.1, rows: Tensor | None = None
) -> dict[str, Tensor]:
    """NT-Xent, the normalised-temperature cross-entropy of SimCLR (Chen et al., ICML 2020).

    Stack the L2-normalised views ``u = [z_a / |z_a|; z_b / |z_b|]`` (2N x D); logits ``s[i, k] = u_i . u_k / t``
    for ``k != i`` (self-similarity excluded); the positive of row ``i`` is its other view ``p(i) = (i + N) mod 2N``:

    ``loss = 1/|R| * sum_{i in R} [ -s[i, p(i)] + log sum_{k != i} exp(s[i, k]) ]``

    where ``R = rows`` (a 1-D LongTensor of indices into the 2N stacked rows, duplicates counted with
    multiplicity) or all 2N rows when ``rows`` is None. Each selected row is still scored against all 2N
    columns, so a distributed caller passes the gathered batch and the indices of its own samples' rows, and
    the mean over ranks (equal-sized partitions of the rows) equals the full loss.

    ``accuracy`` (detached) is the fraction of the rows in ``R`` whose positive logit is strictly greater than
    every negative logit; ties count as wrong, so a collapsed embedding scores 0 rather than 1.
    """
    _check_positive(temperature, "temperature")
    _check_pair(z_a, z_b)
    dtype = _compute_dtype(z_a, z_b)
    n = z_a.shape[0]

    u = F.normalize(torch.cat([z_a, z_b]).to(dtype), dim=1)
    idx = _check_rows(rows, 2 * n, u.device)
    anchors = u if rows is None else u[idx]
    logits = (anchors @ u.T) / temperature
    cols = torch.arange(2 * n, device=u.device)
    self_mask = cols.unsqueeze(0) == idx.unsqueeze(1)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = (idx + n) % (2 * n)

    loss = F.cross_entropy(logits, positive)

    with torch.no_grad():
        local = torch.arange(idx.shape[0], device=u.device)
        pos_logit = logits[local, positive]
        negatives = logits.clone()
        negatives[local, positive] = float("-inf")
        accuracy = (pos_logit > negatives.max(dim=1).values).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}


def barlow_twins_loss(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> dict[str, Tensor]:
    """Barlow Twins (Zbontar et al., ICML 2021), matching the official facebookresearch/barlowtwins code.

    Each dimension is standardised over the batch as ``BatchNorm1d(affine=False)`` does in training mode:
    ``bn(z)[:, j] = (z[:, j] - mean_j) / sqrt(Var_j + eps)`` with the biased variance (divisor N). Then

    ``C = bn(z_a)^T bn(z_b) / N`` (D x D cross-correlation)
    ``on_diag  = sum_i (1 - C[i, i])^2``
    ``off_diag = sum_{i != j} C[i, j]^2``
    ``loss = on_diag + lambd * off_diag``

    Returns the weighted ``loss`` and the two unweighted terms. The off-diagonal is masked, not obtained by
    subtracting the diagonal from the total.
    """
    _check_pair(z_a, z_b)
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0, got {lambd}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dtype = _compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)
    n, d = z_a.shape

    def bn(z: Tensor) -> Tensor:
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, correction=0) + eps)

    c = (bn(z_a).T @ bn(z_b)) / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.masked_fill(torch.eye(d, dtype=torch.bool, device=c.device), 0.0).pow(2).sum()
    loss = on_diag + lambd * off_diag
    return {"loss": loss, "on_diag": on_diag, "off_diag": off_diag}


def cissl_loss(
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    temperature: float = 0.07,
    rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """CISSL, the contrastive invariant SSL loss of Dubois et al. (NeurIPS 2022), with asymmetric heads.

    ``s_a, s_b`` are the (linear) student-head outputs of views a and b, ``t_a, t_b`` the (MLP) teacher-head
    outputs, all (N, D). With ``S = [s_a; s_b] / |.|`` and ``T = [t_a; t_b] / |.|`` row-wise L2-normalised
    (2N x D), logits ``l[i, k] = S_i . T_k / t`` over ALL 2N x 2N pairs, the self pair ``(i, i)`` included:
    student and teacher are different heads, so ``(i, i)`` is a genuine positive, as is ``p(i) = (i + N) mod 2N``.
    Row ``i``'s target puts mass 1/2 on column ``i`` and 1/2 on column ``p(i)``:

    ``loss = 1/|R| * sum_{i in R} [ log sum_k exp(l[i, k]) - (l[i, i] + l[i, p(i)]) / 2 ]``

    with ``R = rows`` as in :func:`nt_xent_loss` (default: all 2N rows).

    ``accuracy`` (detached) is the fraction of rows in ``R`` whose argmax column is ``i`` or ``p(i)``, i.e. whose
    larger positive logit is strictly greater than every negative logit (ties count as wrong, as in NT-Xent).
    """
    _check_positive(temperature, "temperature")
    _check_same(2, s_a=s_a, s_b=s_b, t_a=t_a, t_b=t_b)
    dtype = _compute_dtype(s_a, s_b, t_a, t_b)
    n = s_a.shape[0]

    s = F.normalize(torch.cat([s_a, s_b]).to(dtype), dim=1)
    t = F.normalize(torch.cat([t_a, t_b]).to(dtype), dim=1)
    idx = _check_rows(rows, 2 * n, s.device)
    anchors = s if rows is None else s[idx]
    logits = (anchors @ t.T) / temperature
    local = torch.arange(idx.shape[0], device=s.device)
    partner = (idx + n) % (2 * n)

    log_prob = F.log_softmax(logits, dim=1)
    loss = -0.5 * (log_prob[local, idx] + log_prob[local, partner]).mean()

    with torch.no_grad():
        best_pos = torch.maximum(logits[local, idx], logits[local, partner])
        negatives = logits.clone()
        negatives[local, idx] = float("-inf")
        negatives[local, partner] = float("-inf")
        accuracy = (best_pos > negatives.max(dim=1).values).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}


def _invariance_minus_entropy(
    z_a: Tensor, z_b: Tensor, entropy_of: Callable[[Tensor], Tensor], sim_weight: float, entropy_weight: float
) -> dict[str, Tensor]:
    """``sim_weight * mse(z_a, z_b) - entropy_weight * (H(z_a) + H(z_b)) / (2 D)``: the VICReg variants' shape."""
    _check_pair(z_a, z_b)
    dtype = _compute_dtype(z_a, z_b)
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
    _check_batch(z, "z", min_rows=1)
    _check_positive(sigma, "sigma")
    if distance not in _PAIRWISE_DISTANCES:
        raise ValueError(f"distance must be one of {sorted(_PAIRWISE_DISTANCES)}, got {distance!r}")
    z = z.to(_compute_dtype(z))
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


def orthonormality_penalty(z: Tensor) -> Tensor:
    """VCReg-style spectral penalty ``|E[z z^T] - I|_F^2 / D``, estimated without bias from two half-batches.

    ``E[z z^T]`` is the uncentred D x D second moment (rows of ``z`` as column vectors). With ``h = N // 2``,
    ``z1 = z[:h]``, ``z2 = z[h:2h]`` (a last odd row is unused), ``M1 = z1^T z1 / h`` and ``M2 = z2^T z2 / h``:

    ``penalty = tr((M1 - I)(M2 - I)) / D = (<M1, M2>_F - tr M1 - tr M2 + D) / D``

    ``M1`` and ``M2`` are independent unbiased estimates of ``E[z z^T]``, so the expectation of the product is
    exactly ``|E[z z^T] - I|_F^2``; a single batch value can be negative. When ``h < D`` the inner product is
    ``|z1 z2^T|_F^2 / h^2`` from the h x h cross-Gram (no D x D matrix is formed), otherwise it uses the D x D
    products. Needs N >= 4 (h >= 2). Depends on row order (which rows fall in which half).
    """
    _check_batch(z, "z", min_rows=4)
    z = z.to(_compute_dtype(z))
    n, d = z.shape
    h = n // 2
    z1, z2 = z[:h], z[h : 2 * h]

    if h < d:
        inner = (z1 @ z2.T).pow(2).sum() / h**2
    else:
        inner = ((z1.T @ z1) * (z2.T @ z2)).sum() / h**2
    tr1 = z1.pow(2).sum() / h
    tr2 = z2.pow(2).sum() / h
    return (inner - tr1 - tr2 + d) / d


def vcreg_loss(z_a: Tensor, z_b: Tensor, sim_weight: float = 1.0, ortho_weight: float = 1.0) -> dict[str, Tensor]:
    """VCReg-style loss: invariance plus the unbiased spectral orthonormality penalty of each branch.

    ``invariance = F.mse_loss(z_a, z_b)``
    ``orthonormality = (P(z_a) + P(z_b)) / 2`` with ``P`` = :func:`orthonormality_penalty`
    ``loss = sim_weight * invariance + ortho_weight * orthonormality``
    """
    _check_pair(z_a, z_b, min_rows=4)
    dtype = _compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)

    invariance = F.mse_loss(z_a, z_b)
    orthonormality = (orthonormality_penalty(z_a) + orthonormality_penalty(z_b)) / 2
    loss = sim_weight * invariance + ortho_weight * orthonormality
    return {"loss": loss, "invariance": invariance, "orthonormality": orthonormality}


def diet_loss(logits: Tensor, targets: Tensor, smoothing: float = 0.8) -> dict[str, Tensor]:
    """DIET (Ibrahim et al., 2023): classify every sample by its dataset index, with label smoothing.

    ``logits`` are (B, N) scores over the N dataset indices, ``targets`` the (B,) indices of the batch's samples.
    With ``p = softmax(logits)`` and smoothing ``s`` (``F.cross_entropy(..., label_smoothing=s)``):

    ``loss = 1/B * sum_b [ (1 - s) * (-log p_b[target_b]) + s * 1/N * sum_j (-log p_b[j]) ]``

    ``accuracy`` (detached) is the top-1 fraction (argmax of the logits equals the target).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D (B, N) tensor, got shape {tuple(logits.shape)}")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must have B >= 1 rows and N >= 1 classes, got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be a 1-D integer tensor of dataset indices, got {targets.dtype} "
            f"of shape {tuple(targets.shape)}"
        )
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries but logits has B={logits.shape[0]} rows")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"targets must lie in [0, {logits.shape[1]}), got values in [{lo}, {hi}]")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    dtype = _compute_dtype(logits)
    logits = logits.to(dtype)
    targets = targets.to(device=logits.device, dtype=torch.long)

    loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == targets).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}


def dissl_loss(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    teacher_temp: float = 0.5,
    student_temp: float = 1.0,
    lambd: float = 2.3,
    beta: float = 0.8,
) -> dict[str, Tensor]:
    """DISSL, the distillation invariant SSL loss of Dubois et al. (NeurIPS 2022).

    All inputs are (N, C) logits. ``p_v = softmax(teacher_v / teacher_temp)``,
    ``log q_v = log_softmax(student_v / student_temp)``, ``CE(p, log q) = -sum_c p_c log q_c``:

    ``distill = 1/2 [ mean_i CE(p_a, log q_b) + mean_i CE(p_b, log q_a) ]`` (cross-view distillation)
    ``M = mean of the 2N rows of [p_a; p_b]`` (the teacher marginal)
    ``marginal_entropy = H[M] = -sum_c M_c log M_c``
    ``conditional_entropy = H[M|Z] = mean over the 2N rows of -sum_c p_c log p_c`` (a monitor, not in the loss)
    ``teacher_ce = 1/2 [ mean_i CE(p_a, log p_b) + mean_i CE(p_b, log p_a) ]`` (log p via log_softmax)
    ``loss = distill - lambd * marginal_entropy + beta * teacher_ce``

    No stop-gradient: gradients flow into both teacher and student logits. ``log M`` is taken of ``M`` clamped
    at the smallest positive normal number, so a class whose marginal underflows to 0 adds 0 (not NaN).
    """
    _check_positive(teacher_temp, "teacher_temp")
    _check_positive(student_temp, "student_temp")
    _check_same(2, student_a=student_a, student_b=student_b, teacher_a=teacher_a, teacher_b=teacher_b)
    dtype = _compute_dtype(student_a, student_b, teacher_a, teacher_b)

    log_p_a = F.log_softmax(teacher_a.to(dtype) / teacher_temp, dim=1)
    log_p_b = F.log_softmax(teacher_b.to(dtype) / teacher_temp, dim=1)
    p_a, p_b = log_p_a.exp(), log_p_b.exp()
    log_q_a = F.log_softmax(student_a.to(dtype) / student_temp, dim=1)
    log_q_b = F.log_softmax(student_b.to(dtype) / student_temp, dim=1)

    def ce(p: Tensor, log_q: Tensor) -> Tensor:
        return -(p * log_q).sum(dim=1).mean()

    distill = 0.5 * (ce(p_a, log_q_b) + ce(p_b, log_q_a))
    p = torch.cat([p_a, p_b])
    marginal = p.mean(dim=0)
    h_marginal = marginal_entropy(marginal)
    conditional_entropy = _entropy(p, torch.cat([log_p_a, log_p_b])).mean()
    teacher_ce = 0.5 * (ce(p_a, log_p_b) + ce(p_b, log_p_a))
    loss = distill - lambd * h_marginal + beta * teacher_ce
    return {
        "loss": loss,
        "distill": distill,
        "marginal_entropy": h_marginal,
        "conditional_entropy": conditional_entropy,
        "teacher_ce": teacher_ce,
    }


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL regression loss (Grill et al., NeurIPS 2020): ``1/N * sum_i (2 - 2 cos(p_i, z_i))``.

    ``p`` is the online predictor output, ``z`` the target projection, both (N, D); this equals the mean
    squared distance between the L2-normalised rows. Nothing is detached here: the caller passes an
    EMA-teacher (or otherwise stop-gradient) ``z``. N = 1 is allowed.
    """
    _check_same(1, p=p, z=z)
    dtype = _compute_dtype(p, z)
    p_n = F.normalize(p.to(dtype), dim=1)
    z_n = F.normalize(z.to(dtype), dim=1)
    return (2 - 2 * (p_n * z_n).sum(dim=1)).mean()


def _check_views(views: list[Tensor] | tuple[Tensor, ...], name: str) -> None:
    if not isinstance(views, (list, tuple)) or len(views) == 0:
        raise ValueError(f"{name} must be a non-empty list of (B, K) tensors, got {type(views).__name__}")
    for v, t in enumerate(views):
        if not isinstance(t, Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{v}] must be a 2-D (B, K) tensor, got {shape}")


def _check_multicrop(student: list[Tensor], teacher: list[Tensor], s_name: str, t_name: str) -> None:
    """V student views and G <= V teacher views, all (B, K), with at least one (g, v != g) pair."""
    _check_views(student, s_name)
    _check_views(teacher, t_name)
    shape = student[0].shape
    for name, views in ((s_name, student), (t_name, teacher)):
        for v, t in enumerate(views):
            if t.shape != shape:
                raise ValueError(
                    f"all views must share one (B, K) shape, got {s_name}[0] {tuple(shape)} and "
                    f"{name}[{v}] {tuple(t.shape)}"
                )
    if len(teacher) > len(student):
        raise ValueError(
            f"{t_name} has G={len(teacher)} views but {s_name} only V={len(student)}; the G global views must "
            f"come first in {s_name}, so G <= V"
        )
    if len(student) < 2:
        raise ValueError(f"{s_name} needs V >= 2 views: with V=1 there is no pair (g, v) with v != g")


def dino_loss(
    student: list[Tensor],
    teacher: list[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> dict[str, Tensor]:
    """DINO self-distillation loss (Caron et al., ICCV 2021), matching the official DINOLoss.

    ``student`` is a list of V (B, K) logits (global views first, then local views); ``teacher`` a list of the
    G <= V global views' (B, K) logits; ``center`` the (K,) (or (1, K)) running centre. With
    ``P_g = softmax((teacher[g] - center) / teacher_temp)`` (detached) and
    ``log S_v = log_softmax(student[v] / student_temp)``:

    ``loss = 1/#pairs * sum_{g < G} sum_{v < V, v != g} mean_b [ -sum_k P_g[b, k] log S_v[b, k] ]``

    (the official ``total_loss / n_loss_terms``). ``teacher_entropy`` (detached) is the mean over g and b of
    ``-sum_k P_g[b, k] log P_g[b, k]``, a collapse monitor: log K for a uniform teacher, 0 for a one-hot one.
    """
    _check_positive(student_temp, "student_temp")
    _check_positive(teacher_temp, "teacher_temp")
    _check_multicrop(student, teacher, "student", "teacher")
    k = student[0].shape[1]
    if not isinstance(center, Tensor) or center.shape not in ((k,), (1, k)):
        shape = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
        raise ValueError(f"center must have shape ({k},) or (1, {k}) to match K={k}, got {shape}")
    dtype = _compute_dtype(*student, *teacher, center)
    center = center.to(dtype).reshape(1, k)

    with torch.no_grad():
        log_p_t = [F.log_softmax((t.to(dtype) - center) / teacher_temp, dim=1) for t in teacher]
        p_t = [lp.exp() for lp in log_p_t]
        teacher_entropy = torch.stack([_entropy(p, lp).mean() for p, lp in zip(p_t, log_p_t)]).mean()
    log_s = [F.log_softmax(s.to(dtype) / student_temp, dim=1) for s in student]

    terms = [
        -(p_t[g] * log_s[v]).sum(dim=1).mean()
        for g in range(len(teacher))
        for v in range(len(student))
        if v != g
    ]
    loss = torch.stack(terms).mean()
    return {"loss": loss, "teacher_entropy": teacher_entropy}


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp equipartition of SwAV (Caron et al., NeurIPS 2020): official ``distributed_sinkhorn``
    on a single process. No gradient.

    ``scores`` are (B, K) prototype scores. ``Q = exp(scores / epsilon)^T`` (K x B); ``Q /= sum(Q)``; then
    ``iterations`` times: ``Q /= Q.sum(dim=1)`` (each prototype's row), ``Q /= K``, ``Q /= Q.sum(dim=0)`` (each
    sample's column), ``Q /= B``. Returns ``(Q * B)^T`` (B x K): every row sums to 1 exactly (the last step
    normalises the samples); each prototype's column sums to B/K only in the limit of many iterations.

    The maximum of ``scores / epsilon`` is subtracted before ``exp`` to avoid overflow; a common factor
    ``exp(-max)`` cancels in the first normalisation, so the result is unchanged. ``iterations`` must be
    >= 1, otherwise the rows are not normalised.
    """
    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty 2-D (B, K) tensor, got shape {tuple(scores.shape)}")
    _check_positive(epsilon, "epsilon")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations}")
    scores = scores.to(_compute_dtype(scores))
    b, k = scores.shape

    logits = scores / epsilon
    q = torch.exp(logits - logits.max()).T
    q = q / q.sum()
    for _ in range(int(iterations)):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / b
    return (q * b).T


def swav_loss(
    scores: list[Tensor], assignments: list[Tensor], temperature: float = 0.1
) -> dict[str, Tensor]:
    """SwAV swapped-prediction loss (Caron et al., NeurIPS 2020), matching the official training loop.

    ``scores`` is a list of V (B, K) prototype scores (global views first); ``assignments`` a list of G <= V
    (B, K) codes ``q_g`` (e.g. :func:`sinkhorn_knopp` of ``scores[g]``) for the first G views. Codes are
    targets: they are detached, as the official code computes them under ``no_grad``.

    ``loss = 1/(G (V-1)) * sum_{g<G} sum_{v!=g} mean_b [ -sum_k q_g[b, k] log_softmax(scores[v] / t)[b, k] ]``

    (the official per-view ``subloss / (V - 1)`` averaged over the G assigned views).
    """
    _check_positive(temperature, "temperature")
    _check_multicrop(scores, assignments, "scores", "assignments")
    dtype = _compute_dtype(*scores, *assignments)
    log_p = [F.log_softmax(s.to(dtype) / temperature, dim=1) for s in scores]
    codes = [q.detach().to(dtype) for q in assignments]

    terms = [
        -(codes[g] * log_p[v]).sum(dim=1).mean()
        for g in range(len(assignments))
        for v in range(len(scores))
        if v != g
    ]
    return {"loss": torch.stack(terms).mean()}
