"""I-JEPA's multi-block masks (Assran et al. 2023; facebookresearch/ijepa src/masks/multiblock.py ``MaskCollator``):
``npred`` target blocks and one context block per image, the context minus the targets.

The official semantics, drawn from (seed, position) instead of a collator's counter and the global torch generator:

* block sizes (scale and aspect ratio of the targets, scale of the context; one uniform each, as there) once per
  global batch, from ``group_rng(seed, position // group_size)``;
* each sample's block positions from ``sample_rng(seed, position)``: its targets' (top, left) first, then the
  context's tries, ``randint(0, n)`` being ``floor(u * n)`` of the next uniform of that stream;
* the context retry loop as there: a try is valid when it keeps more than ``min_keep`` patches; after every 20
  failed tries one more target block (the last ones first) stops constraining the context;
* the official truncates every sample's context (and targets) to the smallest count in the batch a collator saw,
  i.e. per GPU; here to the smallest count in the global batch, which every rank can draw from (seed, position):
  the same masks on any world size. The group's masks are computed once and cached.

Indices are sorted patch indices of the row-major grid, truncated to the first ``k`` as the official ``cm[:k]``.
The official's quirks are kept: block sides are at most ``grid - 1`` and ``randint(0, grid - side)`` never puts a
block against the bottom or right edge.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ssltrain.data.masks import group_rng, sample_rng

TIMEOUT = 20  # the official's failed tries before it relaxes the context's constraint by one target block


@dataclass(frozen=True)
class MultiBlockSpec:
    """The grid and the MaskCollator's settings (official names in comments)."""

    height: int
    width: int
    num_targets: int = 4  # npred
    target_scale: tuple[float, float] = (0.15, 0.2)  # pred_mask_scale
    aspect_ratio: tuple[float, float] = (0.75, 1.5)  # of the target blocks; the context block is square
    context_scale: tuple[float, float] = (0.85, 1.0)  # enc_mask_scale
    min_keep: int = 10  # a block must keep more than this many patches
    allow_overlap: bool = False  # True: the context is not cut by the targets


def block_size(
    u: float, scale: tuple[float, float], aspect: tuple[float, float], height: int, width: int
) -> tuple[int, int]:
    """``_sample_block_size``: one uniform ``u`` sets both the scale and the aspect ratio; sides below the grid's."""
    mask_scale = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(height * width * mask_scale)
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * ratio)))
    w = int(round(math.sqrt(max_keep / ratio)))
    return min(h, height - 1), min(w, width - 1)


def randint(u: np.ndarray | float, n: int) -> np.ndarray:
    """``torch.randint(0, n)`` from uniforms in [0, 1): ``floor(u * n)``."""
    return np.minimum(np.floor(np.asarray(u) * n).astype(np.int64), n - 1)


def context_block(
    next_uniform: Callable[[], float],
    size: tuple[int, int],
    regions: list[np.ndarray],
    height: int,
    width: int,
    min_keep: int,
) -> np.ndarray:
    """One sample's context ([height, width] bool) by the official retry loop: ``regions`` are the acceptable areas
    (the targets' complements), of which the first ``len(regions) - tries`` constrain a try."""
    h, w = size
    tries, timeout = 0, TIMEOUT
    while True:
        top = int(randint(next_uniform(), height - h))
        left = int(randint(next_uniform(), width - w))
        mask = np.zeros((height, width), dtype=bool)
        mask[top : top + h, left : left + w] = True
        for region in regions[: max(len(regions) - tries, 0)]:
            mask &= region
        if mask.sum() > min_keep:
            return mask
        timeout -= 1
        if timeout == 0:
            tries, timeout = tries + 1, TIMEOUT


@dataclass(frozen=True)
class GroupMasks:
    """A global batch's masks, untruncated and as handed out: ``context`` [G, k] and ``targets`` [G, npred, t]."""

    context_full: np.ndarray  # [G, H*W] bool
    context: np.ndarray
    targets: np.ndarray


class MultiBlockMasks:
    """The :class:`~ssltrain.data.masks.MaskGenerator` of I-JEPA: ``{"context": [B, Nc], "targets": [B, npred,
    Nt]}`` long patch indices. Every rank draws the whole global batch, to know its minimum count; the last few
    global batches are cached (one asked for again costs nothing)."""

    def __init__(self, spec: MultiBlockSpec, cache_groups: int = 4) -> None:
        self.spec = spec
        self._cache: OrderedDict[tuple[int, int, int], GroupMasks] = OrderedDict()
        self._cache_groups = cache_groups
        s = spec
        if s.num_targets < 1 or s.min_keep < 0 or min(s.height, s.width) < 2:
            raise ValueError(f"multi-block masks need num_targets >= 1, min_keep >= 0 and a grid of 2+ ({spec})")
        # The official loops forever when a block can never keep more than min_keep patches: say so up front.
        for name, scale, aspect in (
            ("target", s.target_scale, s.aspect_ratio),
            ("context", s.context_scale, (1.0, 1.0)),
        ):
            smallest = min(math.prod(block_size(u, scale, aspect, s.height, s.width)) for u in np.linspace(0, 1, 1001))
            if smallest <= s.min_keep:
                raise ValueError(
                    f"a {name} block on the {s.height}x{s.width} grid can be as small as {smallest} patches, not more "
                    f"than min_keep {s.min_keep}: raise the {name} scale or lower min_keep"
                )

    def sizes(self, seed: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The (target, context) block sizes of global batch ``group``: the official draws p_size, then e_size."""
        s = self.spec
        u_target, u_context = group_rng(seed, group).random(2)
        return (
            block_size(float(u_target), s.target_scale, s.aspect_ratio, s.height, s.width),
            block_size(float(u_context), s.context_scale, (1.0, 1.0), s.height, s.width),
        )

    def __call__(self, positions: np.ndarray, seed: int, group_size: int) -> dict[str, Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        groups = positions // group_size
        parts = [self.group(seed, int(g), group_size) for g in np.unique(groups)]
        if len({(p.context.shape, p.targets.shape) for p in parts}) > 1:
            raise ValueError("a batch spans global batches whose masks have different lengths; draw them separately")
        context = np.empty((len(positions), *parts[0].context.shape[1:]), dtype=np.int64)
        targets = np.empty((len(positions), *parts[0].targets.shape[1:]), dtype=np.int64)
        for g, part in zip(np.unique(groups), parts):
            rows = groups == g
            offset = positions[rows] - int(g) * group_size
            context[rows], targets[rows] = part.context[offset], part.targets[offset]
        return {"context": torch.from_numpy(context), "targets": torch.from_numpy(targets)}

    def group(self, seed: int, group: int, group_size: int) -> GroupMasks:
        """The masks of every sample of global batch ``group`` (cached)."""
        key = (seed, group, group_size)
        if key not in self._cache:
            self._cache[key] = self._draw_group(seed, group, group_size)
            while len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _draw_group(self, seed: int, group: int, group_size: int) -> GroupMasks:
        s = self.spec
        H, W, npred = s.height, s.width, s.num_targets
        (hp, wp), (he, we) = self.sizes(seed, group)
        if min(hp * wp, he * we) <= s.min_keep:  # between the constructor's probes; the official would never end
            raise ValueError(f"blocks of {hp}x{wp} and {he}x{we} patches cannot keep more than min_keep {s.min_keep}")
        first = 2 * npred + 2 * TIMEOUT  # targets' (top, left), then the context's first round of tries
        positions = range(group * group_size, (group + 1) * group_size)
        u = np.stack([sample_rng(seed, p).random(first) for p in positions])  # [G, first]
        G = len(u)

        # Targets: rectangles, never constrained, so each keeps hp * wp patches (sorted: row-major offsets).
        top, left = randint(u[:, 0 : 2 * npred : 2], H - hp), randint(u[:, 1 : 2 * npred : 2], W - wp)
        rows, cols = np.arange(H), np.arange(W)
        in_rows = (rows >= top[..., None]) & (rows < top[..., None] + hp)  # [G, npred, H]
        in_cols = (cols >= left[..., None]) & (cols < left[..., None] + wp)
        target_grid = in_rows[..., :, None] & in_cols[..., None, :]  # [G, npred, H, W]
        offsets = (np.arange(hp)[:, None] * W + np.arange(wp)[None, :]).reshape(-1)
        targets = (top * W + left)[..., None] + offsets  # [G, npred, hp * wp]

        # Context: the first valid of the first TIMEOUT tries, counted on an integral image of the acceptable area.
        acceptable = np.ones((G, H, W), dtype=bool) if s.allow_overlap else ~target_grid.any(axis=1)
        integral = np.zeros((G, H + 1, W + 1), dtype=np.int32)
        integral[:, 1:, 1:] = acceptable.astype(np.int32).cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
        c_top = randint(u[:, 2 * npred :: 2], H - he)  # [G, TIMEOUT]
        c_left = randint(u[:, 2 * npred + 1 :: 2], W - we)
        g = np.arange(G)[:, None]
        counts = (
            integral[g, c_top + he, c_left + we]
            - integral[g, c_top, c_left + we]
            - integral[g, c_top + he, c_left]
            + integral[g, c_top, c_left]
        )
        valid = counts > s.min_keep
        chosen = valid.argmax(axis=1)
        t = c_top[np.arange(G), chosen]
        lft = c_left[np.arange(G), chosen]
        ctx_rows = (rows >= t[:, None]) & (rows < t[:, None] + he)
        ctx_cols = (cols >= lft[:, None]) & (cols < lft[:, None] + we)
        context = ctx_rows[:, :, None] & ctx_cols[:, None, :] & acceptable  # [G, H, W]
        for i in np.flatnonzero(~valid.any(axis=1)):  # rare: the sequential loop, continuing the sample's stream
            context[i] = self._relaxed_context(seed, group * group_size + int(i), target_grid[i], (he, we))

        flat = context.reshape(G, H * W)
        keep = int(flat.sum(axis=1).min())
        order = np.argsort(~flat, axis=1, kind="stable")[:, :keep]  # each row's first `keep` patches, ascending
        return GroupMasks(flat, order, targets)

    def _relaxed_context(self, seed: int, position: int, target_grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        s = self.spec
        rng = sample_rng(seed, position)
        rng.random(2 * s.num_targets)  # the targets' draws

        def next_uniform() -> float:
            return float(rng.random())

        regions = [] if s.allow_overlap else [~block for block in target_grid]
        return context_block(next_uniform, size, regions, s.height, s.width, s.min_keep)


__all__ = ["MultiBlockMasks", "MultiBlockSpec", "block_size", "context_block", "randint"]
