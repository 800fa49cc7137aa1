"""DIET (Ibrahim et al. 2023, datum index as target): the minimal recipe.

One view per sample, no projector, no teacher, no positive pairs: a linear classifier over the N dataset indices
on the backbone output, trained with label-smoothed cross-entropy (smoothing 0.8). The N x K head is the only
thing that grows with the data, so it is sharded over ranks: rank r holds rows [r*S, (r+1)*S) with
S = ceil(N / W) (padding rows beyond N are masked out), computes the logits of the gathered batch against its
rows, and the softmax's normaliser, the target logit and the mean logit are summed over ranks with autograd.
Every rank then holds the loss of the whole batch; each shard's gradient is divided by W because DDP, which
averages replicated parameters, does not see the shards (they carry ``ssltrain_sharded = True``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssltrain.config import DIETConfig
from ssltrain.data.loaders.cpu import Views
from ssltrain.core.collectives import all_reduce_max, all_reduce_sum, gather, rank, scale_grad, world_size
from ssltrain.methods.base import Method


class ShardedIndexHead(nn.Module):
    """This rank's rows of the N-way linear head (initialised as nn.Linear would initialise the whole head)."""

    def __init__(self, feature_dim: int, num_samples: int) -> None:
        super().__init__()
        world = world_size()
        self.num_samples = num_samples
        self.rows = math.ceil(num_samples / world)
        self.offset = rank() * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, feature_dim))
        self.bias = nn.Parameter(torch.empty(self.rows))
        self._init_rows(feature_dim, int(torch.initial_seed()))
        for p in (self.weight, self.bias):
            p.ssltrain_sharded = True  # type: ignore[attr-defined]
            p.ssltrain_total_rows = num_samples  # type: ignore[attr-defined]  # checkpoints reshard by these rows

    @torch.no_grad()
    def _init_rows(self, feature_dim: int, seed: int, block: int = 4096) -> None:
        """nn.Linear's uniform init, drawn in fixed blocks of rows each from its own seed, so the head is the
        same whatever the world size and no rank ever materialises more than its rows plus two blocks."""
        bound = 1 / math.sqrt(feature_dim)
        end = self.offset + self.rows
        for b in range(self.offset // block, (end - 1) // block + 1):
            generator = torch.Generator().manual_seed((seed * 1_000_003 + b) % (2**63))
            w = torch.empty(block, feature_dim).uniform_(-bound, bound, generator=generator)
            bias = torch.empty(block).uniform_(-bound, bound, generator=generator)
            lo, hi = max(b * block, self.offset), min((b + 1) * block, end)
            self.weight[lo - self.offset : hi - self.offset] = w[lo - b * block : hi - b * block]
            self.bias[lo - self.offset : hi - self.offset] = bias[lo - b * block : hi - b * block]

    def valid(self) -> Tensor:
        """Which of this shard's rows are real samples (the last shard may be padding)."""
        ids = torch.arange(self.offset, self.offset + self.rows, device=self.weight.device)
        return ids < self.num_samples


def sharded_smoothed_cross_entropy(features: Tensor, targets: Tensor, head: ShardedIndexHead,
                                   smoothing: float) -> tuple[Tensor, Tensor]:
    """Label-smoothed CE of ``features @ W.T + b`` over all N classes, W sharded by rows over ranks.

    ``CE = logsumexp_j(l_j) - (1 - s) * l_y - s * mean_j(l_j)``, each of the three sums assembled over ranks.
    Returns (mean loss over the rows of ``features``, top-1 accuracy).
    """
    scale = 1.0 / world_size()
    weight, bias = scale_grad(head.weight, scale), scale_grad(head.bias, scale)
    dtype = torch.promote_types(features.dtype, torch.float32)  # never below fp32 (softmax over N classes)
    logits = features.to(dtype) @ weight.to(dtype).T + bias.to(dtype)  # (B, S)
    valid = head.valid()
    masked = logits.masked_fill(~valid, float("-inf"))
    row_max = all_reduce_max(masked.max(dim=1).values.detach())
    sum_exp = all_reduce_sum(torch.exp(masked - row_max[:, None]).sum(dim=1))
    lse = torch.log(sum_exp) + row_max
    local_target = targets - head.offset
    mine = (local_target >= 0) & (local_target < head.rows)
    picked = logits.gather(1, local_target.clamp(0, head.rows - 1)[:, None]).squeeze(1)
    target_logit = all_reduce_sum(torch.where(mine, picked, torch.zeros_like(picked)))
    mean_logit = all_reduce_sum(logits.masked_fill(~valid, 0.0).sum(dim=1)) / head.num_samples
    loss = (lse - (1 - smoothing) * target_logit - smoothing * mean_logit).mean()
    with torch.no_grad():
        best_value = all_reduce_max(masked.max(dim=1).values)
        hit = mine & (picked >= best_value)
        accuracy = all_reduce_sum(hit.to(dtype)).mean()
    return loss, accuracy


class DIET(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_samples: int, cfg: DIETConfig,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        if num_samples < 2:
            raise ValueError(f"DIET classifies samples by index and needs a dataset of >= 2 samples, got {num_samples}")
        self.head = ShardedIndexHead(feature_dim, num_samples)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        h = self.encode_views(views)
        self.watch(h[0])
        features = gather(torch.cat(h))
        targets = gather(views.index.repeat(len(h)).to(features.device).long())
        loss, accuracy = sharded_smoothed_cross_entropy(features, targets, self.head, self.cfg.label_smoothing)
        return {"loss": loss, "accuracy": accuracy}
