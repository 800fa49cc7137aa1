"""Barlow Twins: the cross-correlation of the two views' standardised embeddings pushed to the identity."""

from __future__ import annotations

import torch
from torch import Tensor

from ssltrain.losses.common import check_pair, compute_dtype


def check_barlow_twins(z_a: Tensor, z_b: Tensor, lambd: float, eps: float) -> None:
    """The inputs' checks, shared with the fused kernel's path."""
    check_pair(z_a, z_b)
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0, got {lambd}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


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
    check_barlow_twins(z_a, z_b, lambd, eps)
    dtype = compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)
    n, d = z_a.shape

    def bn(z: Tensor) -> Tensor:
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, correction=0) + eps)

    c = (bn(z_a).T @ bn(z_b)) / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.masked_fill(torch.eye(d, dtype=torch.bool, device=c.device), 0.0).pow(2).sum()
    loss = on_diag + lambd * off_diag
    return {"loss": loss, "on_diag": on_diag, "off_diag": off_diag}
