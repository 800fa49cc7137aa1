"""VCReg-style orthonormality: invariance plus an unbiased estimate of ``|E[z z^T] - I|_F^2``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_batch, check_pair, compute_dtype


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
    check_batch(z, "z", min_rows=4)
    z = z.to(compute_dtype(z))
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
    check_pair(z_a, z_b, min_rows=4)
    dtype = compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)

    invariance = F.mse_loss(z_a, z_b)
    orthonormality = (orthonormality_penalty(z_a) + orthonormality_penalty(z_b)) / 2
    loss = sim_weight * invariance + ortho_weight * orthonormality
    return {"loss": loss, "invariance": invariance, "orthonormality": orthonormality}
