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

The JPEGs are generated, not downloaded: about 500 x 375 px (ImageNet's typical size), smooth noise, gradients,
shapes and grain, quality 90, written with ``write_shards`` into a temporary directory.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ssltrain.config import Config, load_config
from ssltrain.data.loaders.pipeline import build_train_loader
from ssltrain.data.shards import write_shards
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog

RECIPES = {
    "2x224": ["augment.local_crops.count=0"],
    "2x224+6x96": ["augment.local_crops.count=6", "augment.local_crops.size=96"],
}
WARMUP = 2


def natural_jpeg(i: int) -> dict:
    """An ImageNet-sized JPEG that compresses and decodes like a photo: smooth fields, edges, grain."""
    rng = np.random.default_rng(i)
    width, height = int(rng.integers(440, 560)), int(rng.integers(330, 420))
    field = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    y, x = np.mgrid[0:height, 0:width]
    gradient = (np.cos(2 * np.pi * (x * rng.random() + y * rng.random()) / width + rng.random() * 6) * 40)[..., None]
    img = Image.fromarray(np.clip(np.asarray(field, dtype=np.float32) + gradient, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        [draw.ellipse, draw.rectangle][int(rng.integers(0, 2))](box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 6, (height, width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return {"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": int(rng.integers(0, 1000))}


def write_images(out: Path, images: int, procs: int) -> None:
    start = time.perf_counter()
    with Pool(procs) as pool:
        write_shards(pool.imap(natural_jpeg, range(images), chunksize=16), out, "train", max_count=1000)
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
    start, n, done = time.perf_counter(), 0, 0
    for views in it:
        views = views.to(device)
        n += views.batch_size
        done += 1
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
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers of the CPU path; host workers and threads of DALI")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU only ({os.cpu_count()} cores)"
    print(f"device: {name}; DALI: {'mixed (GPU decode)' if cuda else 'CPU mode (device_id=None)'}; "
          f"batch {args.batch}, {args.workers} workers", flush=True)
    with tempfile.TemporaryDirectory(prefix="ssltrain-bench-data-") as tmp:
        data = Path(tmp)
        write_images(data, args.images, args.workers)
        catalog = ShardCatalog.from_spec(str(data))
        common = [f"data.train={data}", f"data.batch_size={min(args.batch, len(catalog))}",
                  f"data.workers={args.workers}"]
        print(f"{'recipe':<12} {'cpu img/s':>10} {'dali img/s':>11} {'dali/cpu':>9}", flush=True)
        for recipe in args.recipes:
            rate = {}
            for loader in ("torch", "dali"):
                cfg = load_config(None, common + RECIPES[recipe] + [f"data.loader={loader}"])
                rate[loader] = measure(cfg, catalog, device, args.batches, args.seconds)
            print(f"{recipe:<12} {rate['torch']:>10.0f} {rate['dali']:>11.0f} {rate['dali'] / rate['torch']:>8.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
