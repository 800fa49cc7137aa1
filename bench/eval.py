"""Offline evaluation cost: feature extraction images/s and probe time, with baselines measured in the same run.

    python bench/eval.py                      # GPU: 50,000 JPEGs at 224 px through ResNet-50; CPU: 256 of them
    python bench/eval.py --images 2000        # another extraction size
    python bench/eval.py --probe-images 50000 --classes 1000 --dim 2048   # the probe problem (GPU defaults)
    python bench/eval.py --json out.json      # also write every figure as JSON

What it measures (ssltrain.eval.features / knn / linear, the code ``ssltrain eval`` runs):

- ``model only``: the backbone's forward on random tensors already on the device (bf16 + channels_last on a
  GPU, as extraction runs it): the ceiling for extraction.
- ``extract (no cache)``: shards -> JPEG decode + resize/crop (DataLoader workers) -> backbone -> features,
  including writing the cache file. ``extract (cache hit)``: the same call again, read from the cache.
- ``kNN sweep``: k in {10, 20, 100} from one neighbour search vs three separate ``knn_accuracy`` calls.
- ``linear sweep``: the 3 x 2 lr / weight-decay grid trained as one batched problem plus the final probe, vs the
  same seven probes one at a time (``linear_probe`` per setting).

The images are synthetic JPEGs (smooth colour fields plus noise, ``--source-size`` px, random labels), written
once to ``--data-dir`` and reused. They decode faster than ImageNet's (~400 x 350 px, ~110 kB) average, so the
data side here is optimistic. Probe features are synthetic clusters of the requested size on the device (the
probe cost depends on N, D, classes and epochs, not on where the features came from). The backbone is randomly
initialised (no weights are downloaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import torch

from ssltrain.core.device import resolve_device
from ssltrain.data.augment import EvalTransform
from ssltrain.data.embedded import synthetic_jpeg
from ssltrain.data.shards import write_shards
from ssltrain.data.stream import ShardCatalog
from ssltrain.eval.features import extract_features
from ssltrain.eval.knn import knn_accuracy, knn_sweep
from ssltrain.eval.linear import linear_probe, linear_probe_sweep
from ssltrain.models.backbones import build_backbone

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
KS = (10, 20, 100)
LRS, WDS = (0.01, 0.1, 1.0), (1e-5, 1e-3)


def ensure_shards(directory: Path, images: int, size: int, classes: int, procs: int) -> str:
    """Synthetic labeled JPEG shards, written once per (images, size, classes) and reused."""
    out = directory / f"jpeg-{images}-{size}px-{classes}c"
    if not any(out.glob("val-*.tar")):
        start = time.perf_counter()
        with Pool(procs) as pool:
            samples = pool.imap(
                partial(synthetic_jpeg, width=size, height=size, classes=classes), range(images), chunksize=64
            )
            write_shards(samples, out, "val", max_count=5000)
        print(f"wrote {images} synthetic {size}px JPEGs to {out} in {time.perf_counter() - start:.1f}s", flush=True)
    return str(out / "val-*.tar")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def model_only(model: torch.nn.Module, device: torch.device, batch: int, size: int, seconds: float) -> float:
    """images/s of the forward alone, on random input already on the device."""
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with ctx:
        model(x)  # warm-up (cudnn autotune, allocator)
        _sync(device)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds or n == 0:
            model(x)
            n += batch
        _sync(device)
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    return n / (time.perf_counter() - start)


def clusters(n: int, dim: int, classes: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters (the same centres for every seed; ``seed`` draws the samples)."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + 3.0 * torch.randn(n, dim, generator=g)
    return x.to(device), y.to(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000 if cuda else 256, help="images to extract")
    parser.add_argument("--size", type=int, default=224, help="crop size fed to the backbone")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256 if cuda else 32)
    parser.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--classes", type=int, default=1000 if cuda else 100, help="probe classes")
    parser.add_argument("--probe-images", type=int, default=50_000 if cuda else 5_000, help="probe train features")
    parser.add_argument("--probe-val", type=int, default=10_000 if cuda else 1_000, help="probe val features")
    parser.add_argument("--dim", type=int, default=2048, help="probe feature dimension (ResNet-50: 2048)")
    parser.add_argument("--probe-epochs", type=int, default=100 if cuda else 10)
    parser.add_argument("--no-baselines", action="store_true", help="skip the one-at-a-time probe baselines")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ssltrain-bench-eval"))
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device("auto")
    if cuda:
        torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(device) if cuda else None
    print(
        f"device: {gpu or 'cpu'}; torch {torch.__version__}; {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"threads; {args.workers} loader workers",
        flush=True,
    )
    rows: list[tuple[str, str, str]] = []
    figures: dict[str, float | int | str] = {"device": gpu or "cpu", "torch": torch.__version__}

    # ---- extraction
    spec = ensure_shards(Path(args.data_dir), args.images, args.source_size, args.classes, max(1, args.workers))
    catalog = ShardCatalog.from_spec(spec, "bench")
    transform = EvalTransform(args.size, MEAN, STD)
    torch.manual_seed(0)
    model, feat_dim = build_backbone(args.backbone, image_size=args.size)
    model.to(device).eval()
    ceiling = model_only(model, device, args.batch_size, args.size, seconds=3.0 if cuda else 8.0)
    rows.append((f"model only ({args.backbone}, batch {args.batch_size})", f"{ceiling:,.0f} images/s", "-"))
    with tempfile.TemporaryDirectory() as cache:
        kw = dict(
            batch_size=args.batch_size, workers=args.workers, device=device, cache_dir=Path(cache), require_labels=True
        )
        cold = extract_features(model, catalog, transform, **kw)
        warm = extract_features(model, catalog, transform, **kw)
    assert warm.cached and torch.equal(warm.x, cold.x)
    cold_rate = len(cold) / cold.seconds
    rows.append(
        (
            f"extract, no cache ({len(cold)} images, {feat_dim}-d)",
            f"{cold_rate:,.0f} images/s",
            f"{cold_rate / ceiling:.2f}x of model only",
        )
    )
    rows.append(
        (
            "extract, cache hit",
            f"{warm.seconds * 1e3:,.1f} ms ({len(warm) / warm.seconds:,.0f} images/s)",
            f"{cold.seconds / warm.seconds:,.0f}x faster than extracting",
        )
    )
    figures.update(
        images=len(cold),
        model_only_img_s=ceiling,
        extract_img_s=cold_rate,
        extract_s=cold.seconds,
        cache_hit_s=warm.seconds,
    )

    # ---- probes
    n, nv, d, c = args.probe_images, args.probe_val, args.dim, args.classes
    x, y = clusters(n, d, c, device, 1)
    xv, yv = clusters(nv, d, c, device, 2)
    what = f"{n:,} train / {nv:,} val x {d}-d, {c} classes"
    knn, knn_s = timed(lambda: knn_sweep(x, y, xv, yv, c, ks=KS), device)
    base = ""
    if not args.no_baselines:
        _, sep_s = timed(lambda: [knn_accuracy(x, y, xv, yv, c, k=k) for k in KS], device)
        base = f"{sep_s / knn_s:.2f}x faster than 3 separate searches ({sep_s:.2f} s)"
        figures["knn_separate_s"] = sep_s
    rows.append(
        (f"kNN k={','.join(map(str, KS))} ({what})", f"{knn_s:.2f} s (top-1 k=20: {knn[20]['top1']:.3f})", base)
    )
    lin, lin_s = timed(
        lambda: linear_probe_sweep(x, y, xv, yv, c, lrs=LRS, weight_decays=WDS, epochs=args.probe_epochs), device
    )
    base = ""
    if not args.no_baselines:

        def one_at_a_time() -> None:
            for lr in LRS:
                for wd in WDS:
                    linear_probe(x, y, xv, yv, c, lr=lr, weight_decay=wd, epochs=args.probe_epochs)
            linear_probe(x, y, xv, yv, c, lr=lin["lr"], weight_decay=lin["weight_decay"], epochs=args.probe_epochs)

        _, seq_s = timed(one_at_a_time, device)
        base = f"{seq_s / lin_s:.2f}x faster than one setting at a time ({seq_s:.1f} s)"
        figures["linear_sequential_s"] = seq_s
    rows.append(
        (
            f"linear sweep 3x2 + final, {args.probe_epochs} epochs ({what})",
            f"{lin_s:.1f} s (top-1 {lin['top1']:.3f})",
            base,
        )
    )
    figures.update(
        knn_s=knn_s,
        linear_sweep_s=lin_s,
        probe_train=n,
        probe_val=nv,
        probe_dim=d,
        probe_classes=c,
        probe_epochs=args.probe_epochs,
    )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measured':<{width}}  {'result':<36}  vs baseline in this run")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:<36}  {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
