"""What every method shares: a backbone, a forward over all views grouped by resolution, pairing of views."""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor, nn

from ssltrain.data.loader import Views


def view_pairs(num_global: int, num_local: int) -> list[tuple[int, int]]:
    """Pairs compared by two-view losses under multi-crop: every two global views, and every local with every global.

    Indices count global views first, then local views.
    """
    pairs = list(combinations(range(num_global), 2))
    pairs += [(g, num_global + l) for l in range(num_local) for g in range(num_global)]
    return pairs


class Method(nn.Module):
    """Backbone + heads + loss. ``forward(views)`` returns ``{"loss": scalar, <term>: scalar, ...}``."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

    def features(self, images: Tensor) -> Tensor:
        """Backbone features: what probes evaluate and what is exported."""
        return self.backbone(images)

    def encode_views(self, views: Views, head: nn.Module) -> list[Tensor]:
        """Run backbone and head once per resolution (views of one size share a batch), split back per view."""
        out: list[Tensor] = []
        for group in (views.global_views, views.local_views):
            if not group:
                continue
            z = head(self.backbone(torch.cat(group)))
            out.extend(z.chunk(len(group)))
        return out

    def forward(self, views: Views) -> dict[str, Tensor]:
        raise NotImplementedError


def average_terms(results: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Mean of each term over view pairs."""
    return {k: torch.stack([r[k] for r in results]).mean() for k in results[0]}
