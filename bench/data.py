"""Training input throughput: the CPU pipeline (torch DataLoader) vs DALI (``data.loader=dali``), same run, same data.

    python bench/data.py                          # 2000 synthetic ImageNet-sized JPEGs, 20 batches per measurement
    python bench/data.py --images 200 --batch 32  # a quick look on a small machine
    python bench/data.py --seconds 30             # time-boxed measurements instead of a batch count

For each recipe (2 x 224 global views; 2 x 224 + 6 x 96 multi-crop, the default jitter/grey/blur/solarize
probabilities) it prints images/s of the CPU pipeline (DataLoader with ``--workers`` processes, all cores by
default), of the DALI pipeline (``mixed`` GPU decode when CUDA is available, DALI's CPU mode otherwise, with the
same number of host workers and DALI threads) and their ratio. On a GPU both deliver batches on the device (the
CPU path through pinned memory), and the clock stops after a device synchronisation. Two warm-up batches (worker
start, first allocations) are not timed; building the DALI graph is not either.

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
from multiprocessing import Pool
from pathlib import Path

import torch

from ssltrain.config import Config, load_config
from ssltrain.data.embedded import synthetic_jpeg
from ssltrain.data.loaders import build_train_loader
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


def measure(cfg: Config, catalog: ShardCatalog, device: torch.device, batches: int, seconds: float | None) -> float:
    """images/s from the third batch on, delivered on ``device``."""
    total = WARMUP + (batches if seconds is None else 10**6)
    sampler = GlobalBatchSampler(len(catalog), cfg.data.batch_size, cfg.seed, end=total * cfg.data.batch_size)
    loader = build_train_loader(cfg, catalog, sampler, device)
    it = iter(loader)
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
        print(f"{'recipe':<12} {'cpu img/s':>10} {'dali img/s':>11} {'dali/cpu':>9}", flush=True)
        for recipe in args.recipes:
            rate = {}
            for loader in ("torch", "dali"):
                cfg = load_config(None, common + RECIPES[recipe] + [f"data.loader={loader}"])
                rate[loader] = measure(cfg, catalog, device, args.batches, args.seconds)
            print(
                f"{recipe:<12} {rate['torch']:>10.0f} {rate['dali']:>11.0f} {rate['dali'] / rate['torch']:>8.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
