"""BEiT-style block masks of iBOT/DINOv2: rectangles of patches added until a target count is reached.

:func:`block_mask` transcribes the official ``MaskingGenerator`` (facebookresearch/dinov2, dinov2/data/masking.py;
BEiT's): each try draws a rectangle of area uniform in [min_patches, room left] and log-aspect uniform in
[log min_aspect, log max_aspect], places it uniformly, and keeps it if it adds between 1 and ``room`` new patches.

Deviation: the official collate (dinov2/data/collate.py) masks ``int(0.5 * rows)`` of a rank's global-crop rows with
ratios stratified over [0.1, 0.5] (one stratum per masked row), so which rows are masked and their ratios depend on
the per-GPU batch. :class:`BlockMasks` draws each (sample, global view) alone from ``sample_rng(seed, position)``:
masked with probability ``probability``, its ratio uniform in ``ratio``. The marginals are the official ones (half of
the rows masked, ratio uniform over [0.1, 0.5]); the masks no longer depend on the world size.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ssltrain.data.masks import sample_rng


class Draws(Protocol):
    """The random draws the official code takes from Python's ``random``: ``random.Random`` is one."""

    def uniform(self, a: float, b: float) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


class NumpyDraws:
    """:class:`Draws` from a numpy Generator: ``uniform`` as Python's (``a + (b - a) * U``, also for b < a),
    ``randint`` inclusive of both ends."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * float(self.rng.random())

    def randint(self, a: int, b: int) -> int:
        return int(self.rng.integers(a, b + 1))


def _add_block(mask: np.ndarray, room: float, draws: Draws, min_patches: int, log_aspect: tuple[float, float]) -> int:
    """One official ``_mask``: up to 10 tries to add a rectangle of new patches; returns how many were added."""
    height, width = mask.shape
    delta = 0
    for _ in range(10):
        target_area = draws.uniform(min_patches, room)
        aspect_ratio = math.exp(draws.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
            top = draws.randint(0, height - h)
            left = draws.randint(0, width - w)
            num_masked = mask[top : top + h, left : left + w].sum()
            if 0 < h * w - num_masked <= room:
                added = ~mask[top : top + h, left : left + w]
                delta += int(added.sum())
                mask[top : top + h, left : left + w] = True
            if delta > 0:
                break
    return delta


def block_mask(
    grid: tuple[int, int],
    count: int,
    draws: Draws,
    min_patches: int = 4,
    max_patches: float | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
    """An official ``MaskingGenerator(grid, ...)(count)``: a (H, W) bool mask of about ``count`` patches (fewer when
    no block fits), blocks of at most ``max_patches`` (default: ``count``)."""
    max_patches = count if max_patches is None else max_patches
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros(grid, dtype=bool)
    done = 0
    while done < count:
        room = min(count - done, max_patches)
        delta = _add_block(mask, room, draws, min_patches, log_aspect)
        if delta == 0:
            break
        done += delta
    return mask


class BlockMasks:
    """The :class:`~ssltrain.data.masks.MaskGenerator` of DINOv2: ``{"patches": [B, views, H * W] bool}``, one block
    mask per sample and global view (row-major patches), each a function of (seed, position).

    ``max_fraction`` bounds one block (official: half the grid, dinov2/train/train.py).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        views: int,
        probability: float = 0.5,
        ratio: tuple[float, float] = (0.1, 0.5),
        min_patches: int = 4,
        min_aspect: float = 0.3,
        max_fraction: float = 0.5,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"mask_sample_probability must be in [0, 1], got {probability}")
        if not 0.0 <= ratio[0] <= ratio[1] <= 1.0:
            raise ValueError(f"mask_ratio_min_max must be [low, high] with 0 <= low <= high <= 1, got {list(ratio)}")
        self.grid, self.views = grid, views
        self.probability, self.ratio = probability, ratio
        self.min_patches, self.min_aspect = min_patches, min_aspect
        self.max_patches = max_fraction * grid[0] * grid[1]

    def sample(self, seed: int, position: int) -> np.ndarray:
        """One sample's (views, H * W) masks."""
        rng = sample_rng(seed, position)
        draws = NumpyDraws(rng)
        n = self.grid[0] * self.grid[1]
        out = np.zeros((self.views, n), dtype=bool)
        for v in range(self.views):
            if rng.random() < self.probability:
                count = int(n * draws.uniform(*self.ratio))
                mask = block_mask(self.grid, count, draws, self.min_patches, self.max_patches, self.min_aspect)
                out[v] = mask.reshape(-1)
        return out

    def __call__(self, positions: np.ndarray, seed: int, group_size: int) -> dict[str, Tensor]:
        masks = np.stack([self.sample(seed, int(p)) for p in positions])
        return {"patches": torch.from_numpy(masks)}


__all__ = ["BlockMasks", "NumpyDraws", "block_mask"]
