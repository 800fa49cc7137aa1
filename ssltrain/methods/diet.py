"""DIET (Ibrahim et al. 2023, datum index as target): the minimal recipe.

One view per sample, no projector, no teacher, no positive pairs: a linear classifier over the N dataset indices
on the backbone output, trained with label-smoothed cross-entropy (smoothing 0.8). The N x K head is the only
thing that grows with the data, so it is sharded over ranks: rank r holds rows [r*S, (r+1)*S) with
S = ceil(N / W) (padding rows beyond N are masked out), and :func:`ssltrain.losses.sharded_diet_loss` assembles
the loss of the gathered batch over the shards. The shards carry ``ssltrain_sharded = True``: DDP, which averages
replicated parameters, does not see them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ssltrain.config import Config, DIETConfig
from ssltrain.core.collectives import gather, rank, world_size
from ssltrain.data.loaders import Views
from ssltrain.losses import sharded_diet_loss
from ssltrain.methods.base import Method, outputs


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

    def loss(self, features: Tensor, targets: Tensor, smoothing: float) -> dict[str, Tensor]:
        """DIET's loss and top-1 accuracy of the gathered ``features`` against their dataset indices."""
        return sharded_diet_loss(features, targets, self.weight, self.bias, self.offset, self.num_samples, smoothing)


class DIET(Method):
    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_samples: int, cfg: DIETConfig, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        if num_samples < 2:
            raise ValueError(f"DIET classifies samples by index and needs a dataset of >= 2 samples, got {num_samples}")
        self.head = ShardedIndexHead(feature_dim, num_samples)
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> DIET:
        if num_samples is None:
            raise ValueError("DIET needs the number of training samples (its classifier has one output per sample)")
        return cls(backbone, feature_dim, num_samples, cfg.method.diet, cfg.loss.impl)

    def forward(self, views: Views) -> dict[str, Tensor]:
        h, features = self.encode_views(views)
        gathered = gather(torch.cat(h))
        targets = gather(views.index.repeat(len(h)).to(gathered.device).long())
        return outputs(self.head.loss(gathered, targets, self.cfg.label_smoothing), h[0], features)
