"""The one seeded dataset every renderer plugs into, and the batch it collates to (``Views``).

The sampler hands the dataset ``(sample_id, position)`` pairs. :class:`SeededSamples` reads the sample, makes the
sample's own generator from ``(seed, position)`` (:class:`ssltrain.data.augment.SampleRandom`; no global random
state is touched) and calls a renderer (CPU views, DALI's host preparation, video views) with it: every random draw
of a sample is then a function of (seed, position) alone, independent of the worker count, so a resumed run renders
exactly what it would have. A sample that cannot be used is skipped and reported in the batch (``Views.skipped``):
one bad sample in a million never stops a run or hangs a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data.dataloader import _BaseDataLoaderIter

from ssltrain.data.augment import SampleRandom
from ssltrain.data.signals import blocked, shield_worker
from ssltrain.data.stream import GlobalBatchSampler, RawSample, ShardCatalog


@dataclass
class Views:
    """One batch: the global and local views (each [B, 3, H, W]), dataset indices, labels if every sample has one,
    the samples' global positions, and the masks a masked method asked for (drawn from (seed, position) in the
    loader's workers by a :class:`ssltrain.data.masks.MaskDraw`; empty otherwise)."""

    global_views: list[Tensor]
    local_views: list[Tensor]
    index: Tensor
    label: Tensor | None
    skipped: list[str] = field(default_factory=list)  # "shard:key: reason" for each sample dropped from the batch
    position: Tensor | None = None  # [B] global positions in the sample stream
    masks: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device, non_blocking: bool = True) -> Views:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Views(
            [move(v) for v in self.global_views],
            [move(v) for v in self.local_views],
            move(self.index),
            move(self.label) if self.label is not None else None,
            self.skipped,
            self.position,  # host-side: what masks are drawn from
            {k: move(m) for k, m in self.masks.items()},
        )


@dataclass
class Skipped:
    where: str
    reason: str


@dataclass
class Sample:
    global_views: list[Tensor]
    local_views: list[Tensor]
    index: int
    label: int | None
    position: int = -1


class Unreadable(Exception):
    """Raised by a renderer for a sample it cannot use; the dataset reports it as skipped, with this reason."""


T_co = TypeVar("T_co", covariant=True)


class Renderer(Protocol[T_co]):
    """Turns one read sample into what a loader collates; every random draw comes from ``rng``, the sample's own."""

    def __call__(self, raw: RawSample, sample_id: int, position: int, rng: SampleRandom) -> T_co: ...


T = TypeVar("T")


class SeededSamples(Dataset, Generic[T]):
    """Map-style dataset over a catalog: read, make the sample's generator from (seed, position), render; skip what
    cannot be used."""

    def __init__(self, catalog: ShardCatalog, render: Renderer[T], seed: int) -> None:
        self.catalog, self.render, self.seed = catalog, render, seed

    def __len__(self) -> int:
        return len(self.catalog)

    def __getitem__(self, item: tuple[int, int]) -> T | Skipped:
        sample_id, position = item
        raw = self.catalog.read(sample_id)
        if raw.image is None:
            return Skipped(f"{raw.shard}:{raw.key}", raw.problem)
        try:
            return self.render(raw, sample_id, position, SampleRandom.of(self.seed, position))
        except Unreadable as err:
            return Skipped(f"{raw.shard}:{raw.key}", str(err))


def collate_views(items: list[Sample | Skipped]) -> Views:
    """Stack view ``v`` of every good sample into one tensor; record the skipped ones."""
    good = [x for x in items if isinstance(x, Sample)]
    skipped = [f"{x.where}: {x.reason}" for x in items if isinstance(x, Skipped)]
    if not good:
        return Views([], [], torch.empty(0, dtype=torch.long), None, skipped, torch.empty(0, dtype=torch.long))
    n_global, n_local = len(good[0].global_views), len(good[0].local_views)
    labels = [x.label for x in good]
    # default_collate stacks straight into shared memory in a loader worker: torch.stack would make a batch the
    # DataLoader then copies again into shared memory to send it (3-4% of a worker's time at 2 x 224 px).
    return Views(
        [default_collate([x.global_views[v] for x in good]) for v in range(n_global)],
        [default_collate([x.local_views[v] for x in good]) for v in range(n_local)],
        torch.tensor([x.index for x in good], dtype=torch.long),
        torch.tensor(labels, dtype=torch.long) if all(lbl is not None for lbl in labels) else None,
        skipped,
        torch.tensor([x.position for x in good], dtype=torch.long),
    )


BatchMasks = Callable[[np.ndarray], Mapping[str, Tensor]]
"""Draws the masks of the samples at these global positions (rows in their order): a masked method's generator with
the run's seed and global batch bound (:class:`ssltrain.data.masks.MaskDraw`)."""


class CollateWithMasks:
    """A collate that also draws the batch's masks: in the DataLoader's workers, beside the decoding, so the main
    process never waits on them (I-JEPA's multi-block draw of a 2,048-sample global batch takes tens of ms)."""

    def __init__(self, collate: Callable[[list[Any]], Views], masks: BatchMasks) -> None:
        self.collate, self.masks = collate, masks

    def __call__(self, items: list[Any]) -> Views:
        views = self.collate(items)
        if views.position is not None and len(views.position):
            views.masks = dict(self.masks(views.position.numpy()))
        return views


def collate_for(masks: BatchMasks | None) -> Callable[[list[Any]], Views]:
    """The training loaders' collate: :func:`collate_views`, drawing the batch's masks as well when a method has
    them."""
    return collate_views if masks is None else CollateWithMasks(collate_views, masks)


WORKER_TIMEOUT_S = 600


def _worker_init(_: int) -> None:
    shield_worker()  # the scheduler's signals are for the main process (torch has set its handlers by now)
    torch.set_num_threads(1)  # workers decode one sample at a time; the main process owns the cores for compute


class ShieldedLoader(DataLoader):
    """A DataLoader that starts its workers with the scheduler's signals blocked: a signal arriving while it forks
    waits until the worker has set its own handling (``_worker_init``), and reaches the main process after."""

    def __iter__(self) -> _BaseDataLoaderIter:
        if self.num_workers == 0:
            return super().__iter__()
        with blocked():
            return super().__iter__()


def make_loader(
    dataset: Dataset,
    workers: int,
    pin_memory: bool = False,
    batch_sampler: GlobalBatchSampler | None = None,
    batch_size: int | None = None,
    collate: Callable[[list[Any]], Any] = collate_views,
) -> DataLoader:
    """A DataLoader over ``dataset`` in the sampler's order; a worker stuck on I/O raises instead of hanging, and
    workers leave the scheduler's signals to the main process (``ssltrain.data.signals``)."""
    kwargs: dict[str, Any] = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory)
    if workers > 0:
        kwargs.update(
            worker_init_fn=_worker_init, prefetch_factor=2, persistent_workers=False, timeout=WORKER_TIMEOUT_S
        )
    if batch_sampler is not None:
        return ShieldedLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return ShieldedLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)
