"""MoCo v3: InfoNCE between queries and a momentum encoder's keys, positives on the (offset) diagonal.

The tiled NT-Xent/CISSL kernels score the 2N stacked views against themselves; MoCo v3 scores N queries against
the keys of the other view only, so it is this eager loss (N x W*N logits: small beside the encoders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_positive, compute_dtype


def moco_contrastive_loss(q: Tensor, k: Tensor, temperature: float = 1.0, offset: int = 0) -> dict[str, Tensor]:
    """One direction of MoCo v3's loss (facebookresearch/moco-v3 ``MoCo.contrastive_loss``).

    ``q`` (n, D): this rank's queries (the predictor's outputs); ``k`` (M, D): the keys of all ranks, gathered in
    rank order (the momentum encoder's projections of the other view; the caller detaches them). Query ``i``'s
    positive is key ``offset + i`` (``offset``: where this rank's rows start in ``k``). With ``u``, ``v`` the
    row-wise L2-normalised ``q``, ``k`` and logits ``l[i, m] = u_i . v_m / t``:

    ``loss = 2 t * 1/n * sum_i [ log sum_m exp(l[i, m]) - l[i, offset + i] ]``

    the ``2 t`` factor as in the official code (it makes the gradient's scale independent of ``t``). The mean over
    ranks of their losses (equal row counts) is the loss of the whole batch.

    ``accuracy`` (detached): the fraction of queries whose positive logit is strictly greater than every negative.
    """
    check_positive(temperature, "temperature")
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"queries and keys must be (n, D) and (M, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    n = q.shape[0]
    if n < 1 or not 0 <= offset <= k.shape[0] - n:
        raise ValueError(f"{n} queries at offset {offset} do not fit {k.shape[0]} keys")
    dtype = compute_dtype(q, k)

    u = F.normalize(q.to(dtype), dim=1)
    v = F.normalize(k.to(dtype), dim=1)
    logits = (u @ v.T) / temperature
    positive = torch.arange(offset, offset + n, device=q.device)
    loss = F.cross_entropy(logits, positive) * (2 * temperature)

    with torch.no_grad():
        local = torch.arange(n, device=q.device)
        pos_logit = logits[local, positive]
        negatives = logits.clone()
        negatives[local, positive] = float("-inf")
        accuracy = (pos_logit > negatives.max(dim=1).values).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}


def mocov3_loss(
    q_a: Tensor, q_b: Tensor, k_a: Tensor, k_b: Tensor, temperature: float = 1.0, offset: int = 0
) -> dict[str, Tensor]:
    """MoCo v3's symmetric loss ``ctr(q_a, k_b) + ctr(q_b, k_a)`` (official ``MoCo.forward``), each direction
    :func:`moco_contrastive_loss`; ``accuracy`` is the mean of the two directions'."""
    ab = moco_contrastive_loss(q_a, k_b, temperature, offset)
    ba = moco_contrastive_loss(q_b, k_a, temperature, offset)
    return {"loss": ab["loss"] + ba["loss"], "accuracy": (ab["accuracy"] + ba["accuracy"]) / 2}
