"""From the sample stream to batches of views: decode, augment (seeded per sample), skip bad samples, collate.

A corrupt or missing image is skipped and reported in the batch (``Views.skipped``) so the trainer can count and
log it; a bad sample in a million never stops a run or hangs a worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from ssltrain.data.augment import CPURenderer, EvalTransform
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog, sample_seed


@dataclass
class Views:
    """One batch: the global and local views (each [B, 3, H, W]), dataset indices, labels if every sample has one."""

    global_views: list[Tensor]
    local_views: list[Tensor]
    index: Tensor
    label: Tensor | None
    skipped: list[str] = field(default_factory=list)  # "shard:key: reason" for each sample dropped from the batch

    @property
    def batch_size(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device, non_blocking: bool = True) -> "Views":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Views(
            [move(v) for v in self.global_views],
            [move(v) for v in self.local_views],
            move(self.index),
            move(self.label) if self.label is not None else None,
            self.skipped,
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


def decode_image(data: bytes) -> Tensor:
    """Decode to a uint8 RGB tensor [3, H, W]; PIL's full ``load`` so truncated files fail here, not later."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return TF.pil_to_tensor(img.convert("RGB"))


_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_decoded(catalog: ShardCatalog, sample_id: int) -> tuple[Tensor, int | None] | Skipped:
    """Read and decode one sample: ``(image, label)``, or ``Skipped`` saying where and why."""
    raw = catalog.read(sample_id)
    where = f"{raw.shard}:{raw.key}"
    if raw.image is None:
        return Skipped(where, raw.problem)
    try:
        return decode_image(raw.image), raw.label
    except _DECODE_ERRORS as err:
        return Skipped(where, f"cannot decode image ({type(err).__name__}: {err})")


class AugmentedShards(Dataset):
    """Map-style dataset over a catalog; the sampler hands it ``(sample_id, position)`` pairs."""

    def __init__(self, catalog: ShardCatalog, renderer: CPURenderer, seed: int) -> None:
        self.catalog, self.renderer, self.seed = catalog, renderer, seed

    def __len__(self) -> int:
        return len(self.catalog)

    def __getitem__(self, item: tuple[int, int]) -> Sample | Skipped:
        sample_id, position = item
        decoded = read_decoded(self.catalog, sample_id)
        if isinstance(decoded, Skipped):
            return decoded
        image, label = decoded
        # The augmentations are a function of (seed, position): independent of worker count and resumable.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, position))
            global_views, local_views = self.renderer(image)
        return Sample(global_views, local_views, sample_id, label)


class EvalShards(Dataset):
    """Labeled samples in catalog order with the deterministic eval transform, for feature extraction."""

    def __init__(self, catalog: ShardCatalog, transform: EvalTransform) -> None:
        self.catalog, self.transform = catalog, transform

    def __len__(self) -> int:
        return len(self.catalog)

    def __getitem__(self, i: int) -> Sample | Skipped:
        decoded = read_decoded(self.catalog, i)
        if isinstance(decoded, Skipped):
            return decoded
        image, label = decoded
        return Sample([self.transform(image)], [], i, label)


def collate_views(items: list[Sample | Skipped]) -> Views:
    """Stack view ``v`` of every good sample into one tensor; record the skipped ones."""
    good = [x for x in items if isinstance(x, Sample)]
    skipped = [f"{x.where}: {x.reason}" for x in items if isinstance(x, Skipped)]
    if not good:
        return Views([], [], torch.empty(0, dtype=torch.long), None, skipped)
    n_global, n_local = len(good[0].global_views), len(good[0].local_views)
    labels = [x.label for x in good]
    return Views(
        [torch.stack([x.global_views[v] for x in good]) for v in range(n_global)],
        [torch.stack([x.local_views[v] for x in good]) for v in range(n_local)],
        torch.tensor([x.index for x in good], dtype=torch.long),
        torch.tensor(labels, dtype=torch.long) if all(lbl is not None for lbl in labels) else None,
        skipped,
    )


WORKER_TIMEOUT_S = 600


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode one image at a time; the main process owns the cores for compute


def make_loader(
    dataset: Dataset,
    workers: int,
    pin_memory: bool = False,
    batch_sampler: GlobalBatchSampler | None = None,
    batch_size: int | None = None,
    collate: Callable = collate_views,
) -> DataLoader:
    kwargs: dict = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory)
    if workers > 0:
        # A worker stuck on I/O (a dead network mount) raises after `timeout` seconds instead of hanging the run.
        kwargs.update(worker_init_fn=_worker_init, prefetch_factor=2, persistent_workers=False, timeout=WORKER_TIMEOUT_S)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)
