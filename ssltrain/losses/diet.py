"""DIET: classify every sample by its dataset index, with label smoothing.

:func:`diet_loss` is the specification on the full logits; :func:`sharded_diet_loss` computes the same loss from
the features and a head whose N rows are sharded over ranks (N grows with the data), which is what DIET trains
with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.core.collectives import all_reduce_max, all_reduce_sum, scale_grad, world_size
from ssltrain.losses.common import compute_dtype


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
    dtype = compute_dtype(logits)
    logits = logits.to(dtype)
    targets = targets.to(device=logits.device, dtype=torch.long)

    loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == targets).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}


def sharded_diet_loss(
    features: Tensor, targets: Tensor, weight: Tensor, bias: Tensor, offset: int, num_samples: int, smoothing: float
) -> dict[str, Tensor]:
    """:func:`diet_loss` of ``features @ W.T + b`` over all N classes, with ``W`` sharded by rows over ranks.

    This rank holds rows ``[offset, offset + S)`` of the N x K head as ``weight`` (S, K) and ``bias`` (S,); rows
    at or beyond ``num_samples`` are padding and masked out. With ``l`` the logits of the gathered batch,
    ``CE = logsumexp_j(l_j) - (1 - s) * l_y - s * mean_j(l_j)``, each of the three sums over classes assembled
    over ranks with autograd, so every rank holds the whole batch's loss. The shards' gradients are divided by
    W, the world size: DDP averages replicated parameters but does not see the shards.
    Returns the mean ``loss`` over the rows of ``features`` and the top-1 ``accuracy`` (ties count as hits).
    """
    scale = 1.0 / world_size()
    weight, bias = scale_grad(weight, scale), scale_grad(bias, scale)
    rows = weight.shape[0]
    dtype = torch.promote_types(features.dtype, torch.float32)  # never below fp32 (softmax over N classes)
    logits = features.to(dtype) @ weight.to(dtype).T + bias.to(dtype)  # (B, S)
    valid = torch.arange(offset, offset + rows, device=weight.device) < num_samples
    masked = logits.masked_fill(~valid, float("-inf"))
    row_max = all_reduce_max(masked.max(dim=1).values.detach())
    sum_exp = all_reduce_sum(torch.exp(masked - row_max[:, None]).sum(dim=1))
    lse = torch.log(sum_exp) + row_max
    local_target = targets - offset
    mine = (local_target >= 0) & (local_target < rows)
    picked = logits.gather(1, local_target.clamp(0, rows - 1)[:, None]).squeeze(1)
    target_logit = all_reduce_sum(torch.where(mine, picked, torch.zeros_like(picked)))
    mean_logit = all_reduce_sum(logits.masked_fill(~valid, 0.0).sum(dim=1)) / num_samples
    loss = (lse - (1 - smoothing) * target_logit - smoothing * mean_logit).mean()
    with torch.no_grad():
        best_value = all_reduce_max(masked.max(dim=1).values)
        hit = mine & (picked >= best_value)
        accuracy = all_reduce_sum(hit.to(dtype)).mean()
    return {"loss": loss, "accuracy": accuracy}
