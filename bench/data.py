"""Training input throughput: the CPU pipeline (torch DataLoader) vs a torchvision v2 Compose pipeline vs DALI.

    python bench/data.py                          # 2000 synthetic ImageNet-sized JPEGs, 20 batches per measurement
    python bench/data.py --images 200 --batch 32  # a quick look on a small machine
    python bench/data.py --seconds 30             # time-boxed measurements instead of a batch count

For each recipe (2 x 224 global views; 2 x 224 + 6 x 96 multi-crop, the default jitter/grey/blur/solarize
probabilities) it prints images/s of the CPU pipeline (DataLoader with ``--workers`` processes, all cores by
default), of the same recipe written the usual way as ``torchvision.transforms.v2.Compose`` pipelines (one per view:
RandomResizedCrop, flip, ColorJitter with p, grayscale, GaussianBlur with p, solarize, normalise; same decode, same
DataLoader settings) and the CPU pipeline's ratio to it, and of the DALI pipeline (``mixed`` GPU decode when CUDA
is available, DALI's CPU mode otherwise, with the same number of host workers and DALI threads) and its ratio to the
CPU pipeline. On a GPU all deliver batches on the device (the CPU paths through pinned memory), and the clock stops
after a device synchronisation. Two warm-up batches (worker start, first allocations) are not timed; building the
DALI graph is not either.

The JPEGs are generated, not downloaded (:func:`ssltrain.data.embedded.synthetic_jpeg`): about 500 x 375 px
(ImageNet's typical size), smooth noise, gradients, shapes and grain, quality 90, written with ``write_shards`` into
a temporary directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ssltrain.config import AugmentConfig, Config, CropConfig, load_config
from ssltrain.data.augment import ViewSpec
from ssltrain.data.embedded import synthetic_jpeg
from ssltrain.data.loaders import build_train_loader
from ssltrain.data.loaders.cpu import decode_image
from ssltrain.data.loaders.dataset import make_loader
from ssltrain.data.shards import write_shards
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog

RECIPES = {
    "2x224": ["augment.local_crops.count=0"],
    "2x224+6x96": ["augment.local_crops.count=6", "augment.local_crops.size=96"],
}
WARMUP = 2


def write_images(out: Path, images: int, procs: int) -> None:
    start = time.perf_counter()
    with Pool(procs) as pool:
        write_shards(pool.imap(synthetic_jpeg, range(images), chunksize=16), out, "train", max_count=1000)
    size = sum(p.stat().st_size for p in out.glob("*.tar")) / images / 1024
    print(f"wrote {images} JPEGs (~500x375, {size:.0f} kB average) in {time.perf_counter() - start:.1f}s", flush=True)


def v2_view(crop: CropConfig, view: int, mean: list[float], std: list[float]) -> v2.Compose:
    """View ``view`` of a crop group as the usual torchvision v2 pipeline (the blur kernel is ssltrain's)."""
    spec = ViewSpec.of(crop, view)
    jitter = v2.ColorJitter(crop.brightness, crop.contrast, crop.saturation, crop.hue)
    k = spec.blur_kernel
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop.size, scale=tuple(crop.scale), ratio=tuple(crop.ratio), antialias=True),
            v2.RandomHorizontalFlip(crop.flip_p),
            v2.RandomApply([jitter], p=crop.jitter_p),
            v2.RandomGrayscale(crop.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(k, sigma=tuple(crop.blur_sigma))], p=spec.blur_p),
            v2.RandomSolarize(128, p=spec.solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class V2Views(Dataset):
    """Decode as the CPU pipeline does, then every view through its own v2 Compose; ``length`` items, cycling."""

    def __init__(self, catalog: ShardCatalog, spec: AugmentConfig, length: int) -> None:
        self.catalog, self.length = catalog, length
        self.views = [v2_view(spec.global_crops, i, spec.mean, spec.std) for i in range(spec.global_crops.count)]
        self.views += [v2_view(spec.local_crops, i, spec.mean, spec.std) for i in range(spec.local_crops.count)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        image = decode_image(self.catalog.read(i % len(self.catalog)).image or b"")
        return [view(image) for view in self.views]


class _Batch:
    def __init__(self, views: list[torch.Tensor]) -> None:
        self.views = views

    @property
    def batch_size(self) -> int:
        return len(self.views[0])

    def to(self, device: torch.device) -> _Batch:
        return _Batch([v.to(device, non_blocking=True) for v in self.views])


def _collate(items: list[list[torch.Tensor]]) -> _Batch:
    return _Batch([torch.stack(v) for v in zip(*items)])


def v2_loader(cfg: Config, catalog: ShardCatalog, total: int, device: torch.device) -> Iterable[_Batch]:
    """The v2 pipeline in the CPU pipeline's DataLoader settings (workers, one thread each, prefetch, pinning)."""
    dataset = V2Views(catalog, cfg.augment, total * cfg.data.batch_size)
    return make_loader(
        dataset, cfg.data.workers, pin_memory=device.type == "cuda", batch_size=cfg.data.batch_size, collate=_collate
    )


def measure(
    cfg: Config, catalog: ShardCatalog, device: torch.device, batches: int, seconds: float | None, v2_compose: bool
) -> float:
    """images/s from the third batch on, delivered on ``device`` (``v2_compose``: the torchvision v2 pipeline)."""
    total = WARMUP + (batches if seconds is None else 10**6)
    loader: Iterable[Any]
    if v2_compose:
        loader = v2_loader(cfg, catalog, total, device)
    else:
        sampler = GlobalBatchSampler(len(catalog), cfg.data.batch_size, cfg.seed, end=total * cfg.data.batch_size)
        loader = build_train_loader(cfg, catalog, sampler, device)
    it: Iterator[Any] = iter(loader)
    for _ in range(WARMUP):
        next(it).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, n = time.perf_counter(), 0
    for done, views in enumerate(it, start=1):
        n += views.to(device).batch_size
        if (seconds is None and done >= batches) or (seconds is not None and time.perf_counter() - start >= seconds):
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del it, loader
    return n / elapsed


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEGs to generate")
    parser.add_argument("--batch", type=int, default=256 if cuda else 64, help="batch size")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    group.add_argument("--seconds", type=float, help="time each measurement for this long instead")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader workers of the CPU path; host workers and threads of DALI",
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU only ({os.cpu_count()} cores)"
    print(
        f"device: {name}; DALI: {'mixed (GPU decode)' if cuda else 'CPU mode (device_id=None)'}; "
        f"batch {args.batch}, {args.workers} workers",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="ssltrain-bench-data-") as tmp:
        data = Path(tmp)
        write_images(data, args.images, args.workers)
        catalog = ShardCatalog.from_spec(str(data))
        common = [
            f"data.train={data}",
            f"data.batch_size={min(args.batch, len(catalog))}",
            f"data.workers={args.workers}",
        ]
        print(
            f"{'recipe':<12} {'cpu img/s':>10} {'v2 img/s':>9} {'cpu/v2':>7} {'dali img/s':>11} {'dali/cpu':>9}",
            flush=True,
        )
        for recipe in args.recipes:
            rate = {}
            for loader in ("torch", "v2", "dali"):
                cfg = load_config(
                    None, common + RECIPES[recipe] + [f"data.loader={'dali' if loader == 'dali' else 'torch'}"]
                )
                rate[loader] = measure(cfg, catalog, device, args.batches, args.seconds, loader == "v2")
            print(
                f"{recipe:<12} {rate['torch']:>10.1f} {rate['v2']:>9.1f} {rate['torch'] / rate['v2']:>6.2f}x"
                f" {rate['dali']:>11.1f} {rate['dali'] / rate['torch']:>8.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
