"""Masks of the masked and predictive methods (MAE, I-JEPA, iBOT/DINOv2), drawn on the host as part of the sample
stream.

A method that needs masks names a :class:`MaskGenerator`; the engine wraps the loader in :class:`MaskedBatches`,
which adds ``Views.masks`` to every batch. Every draw is a function of (seed, global position) for what varies per
sample, and of (seed, global batch) for what the official code draws once per batch (I-JEPA's block sizes): the
same masks on any world size, worker count or renderer (CPU, DALI, video), and a resumed run draws what the
uninterrupted one drew. Nothing runs in the model's forward, so the DALI graph needs no change.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ssltrain.data.loaders.dataset import Views

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


class MaskedBatches:
    """The loader's batches with ``masks`` drawn for each; everything else passes through unchanged."""

    def __init__(self, batches: Iterable[Views], generator: MaskGenerator, seed: int, group_size: int) -> None:
        self.batches, self.generator = batches, generator
        self.seed, self.group_size = seed, group_size

    def __iter__(self) -> Iterator[Views]:
        for views in self.batches:
            if views.position is None:
                raise ValueError("a masked method needs the samples' positions; this loader does not give them")
            positions = views.position.numpy()
            if len(positions):
                views.masks = self.generator(positions, self.seed, self.group_size)
            yield views


def stack_indices(rows: list[np.ndarray]) -> Tensor:
    """Equal-length index arrays as one [B, K] long tensor."""
    return torch.from_numpy(np.stack(rows).astype(np.int64))


__all__ = ["MaskGenerator", "MaskedBatches", "group_rng", "sample_rng", "stack_indices"]
