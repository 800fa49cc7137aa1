"""The CPU image renderer: decode with PIL, render the views with torchvision, in DataLoader worker processes.

Also the decoder every image path shares (DALI hands the images it does not trust to it, ``shards verify`` checks
with it) and the deterministic evaluation dataset.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from ssltrain.config import Config
from ssltrain.data.augment import CPURenderer, EvalTransform, SampleRandom
from ssltrain.data.loaders.dataset import (
    BatchMasks,
    collate_for,
    Sample,
    SeededSamples,
    Skipped,
    Unreadable,
    Views,
    collate_views,
    make_loader,
)
from ssltrain.data.stream import GlobalBatchSampler, RawSample, ShardCatalog

DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: bytes) -> Tensor:
    """Decode to a uint8 RGB tensor [3, H, W]; PIL's full ``load`` so truncated files fail here, not later."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return TF.pil_to_tensor(img.convert("RGB"))


def decode_reason(err: BaseException) -> str:
    """Why an image was skipped: the same words on every image path."""
    return f"cannot decode image ({type(err).__name__}: {err})"


def read_decoded(catalog: ShardCatalog, sample_id: int) -> tuple[Tensor, int | None] | Skipped:
    """Read and decode one sample: ``(image, label)``, or ``Skipped`` saying where and why."""
    raw = catalog.read(sample_id)
    where = f"{raw.shard}:{raw.key}"
    if raw.image is None:
        return Skipped(where, raw.problem)
    try:
        return decode_image(raw.image), raw.label
    except DECODE_ERRORS as err:
        return Skipped(where, decode_reason(err))


class ImageViews:
    """The CPU renderer of the seeded dataset: decode the image, draw and apply every view."""

    def __init__(self, renderer: CPURenderer) -> None:
        self.renderer = renderer

    def __call__(self, raw: RawSample, sample_id: int, position: int, rng: SampleRandom) -> Sample:
        assert raw.image is not None  # the dataset skips samples without one
        try:
            image = decode_image(raw.image)
        except DECODE_ERRORS as err:
            raise Unreadable(decode_reason(err)) from None
        global_views, local_views = self.renderer(image, rng)
        return Sample(global_views, local_views, sample_id, raw.label, position)


class AugmentedShards(SeededSamples[Sample]):
    """The seeded dataset with the CPU renderer; the sampler hands it ``(sample_id, position)`` pairs."""

    def __init__(self, catalog: ShardCatalog, renderer: CPURenderer, seed: int) -> None:
        super().__init__(catalog, ImageViews(renderer), seed)


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
        return Sample([self.transform(image)], [], i, label, i)


def build_cpu_loader(
    cfg: Config,
    catalog: ShardCatalog,
    sampler: GlobalBatchSampler,
    device: torch.device,
    masks: BatchMasks | None = None,
) -> Iterable[Views]:
    """The CPU image path; also what ``data.loader=dali`` falls back to where DALI cannot run."""
    dataset = AugmentedShards(catalog, CPURenderer(cfg.augment), cfg.seed)
    loader: DataLoader = make_loader(
        dataset, cfg.data.workers, pin_memory=device.type == "cuda", batch_sampler=sampler, collate=collate_for(masks)
    )
    return loader


__all__ = [
    "DECODE_ERRORS",
    "AugmentedShards",
    "EvalShards",
    "ImageViews",
    "Sample",
    "Skipped",
    "Views",
    "build_cpu_loader",
    "collate_views",
    "decode_image",
    "make_loader",
    "read_decoded",
]
