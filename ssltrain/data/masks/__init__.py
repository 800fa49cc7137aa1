"""Masks of the masked and predictive methods (MAE, I-JEPA, iBOT/DINOv2), drawn on the host as part of the sample
stream.

A method that needs masks names a :class:`MaskGenerator`; the engine hands the loader a :class:`MaskDraw` (the
generator with the run's seed and global batch), which its workers call beside the decoding to fill ``Views.masks``
of every batch: the main process never waits on a draw. Every draw is a function of (seed, global position) for
what varies per sample, and of (seed, global batch) for what the official code draws once per batch (I-JEPA's block
sizes): the same masks on any world size, worker count or renderer (CPU, DALI, video), and a resumed run draws what
the uninterrupted one drew. Nothing runs in the model's forward, so the DALI graph needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

# Salts that keep the mask streams apart from each other and from the augmentations' seeds.
SAMPLE_SALT = 0x6D61736B  # "mask"
GROUP_SALT = 0x67726F75  # "grou"


def sample_rng(seed: int, position: int, salt: int = SAMPLE_SALT) -> np.random.Generator:
    """The generator of one sample's masks: a function of (seed, global position) only."""
    return np.random.default_rng([salt, seed & 0xFFFFFFFFFFFFFFFF, position])


def group_rng(seed: int, group: int, salt: int = GROUP_SALT) -> np.random.Generator:
    """The generator of what is drawn once per global batch (``group`` = position // global batch)."""
    return np.random.default_rng([salt, seed & 0xFFFFFFFFFFFFFFFF, group])


class MaskGenerator(Protocol):
    """Draws the masks of a batch from the samples' global positions.

    ``positions`` are this rank's samples (skipped ones absent); ``group_size`` is the global batch in samples (one
    micro-batch under gradient accumulation), so ``positions // group_size`` says which global batch a sample is
    in. Returns tensors whose first dimension is the batch, in the order of ``positions``.
    """

    def __call__(self, positions: np.ndarray, seed: int, group_size: int) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class MaskDraw:
    """A generator bound to the run's seed and global batch: what the loader's workers call with a batch's positions
    (picklable, so it travels to them)."""

    generator: MaskGenerator
    seed: int
    group_size: int

    def __call__(self, positions: np.ndarray) -> dict[str, Tensor]:
        return self.generator(positions, self.seed, self.group_size)


def stack_indices(rows: list[np.ndarray]) -> Tensor:
    """Equal-length index arrays as one [B, K] long tensor."""
    return torch.from_numpy(np.stack(rows).astype(np.int64))


__all__ = ["MaskDraw", "MaskGenerator", "group_rng", "sample_rng", "stack_indices"]
