"""MAE's random masking noise (He et al. 2022; facebookresearch/mae, models_mae.py ``random_masking``).

The official code draws ``noise = torch.rand(N, L)`` in the forward, one uniform [0, 1) number per patch, and keeps
the patches of the smallest noise. Here the same noise is drawn on the host from ``sample_rng(seed, position)``, one
row per global view, so a sample's masks do not depend on the batch it lands in, the world size or a resume; the
method does the official argsort on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ssltrain.data.masks import sample_rng


class RandomMaskNoise:
    """Per sample, ``views`` rows of ``grid * grid`` uniform [0, 1) draws: ``{"noise": [B, views, grid**2]}``
    (float64: ties in the argsort are then practically impossible). View ``v``'s row does not depend on ``views``."""

    def __init__(self, grid: int, views: int) -> None:
        if grid < 1 or views < 1:
            raise ValueError(f"random masks need a grid >= 1 and views >= 1, got grid {grid}, views {views}")
        self.grid, self.views = grid, views

    def __call__(self, positions: np.ndarray, seed: int, group_size: int) -> dict[str, Tensor]:
        n = self.grid * self.grid
        rows = [sample_rng(seed, int(p)).random((self.views, n)) for p in positions]
        return {"noise": torch.from_numpy(np.stack(rows))}


__all__ = ["RandomMaskNoise"]
