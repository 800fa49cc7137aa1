"""Training throughput per GPU, four ways in one run, with ratios against a plain training step measured alongside.

    python bench/train.py                                   # GPU: VICReg ResNet-50 224 px b256, DINO ViT-S/16 b64
    python bench/train.py --models vicreg --steps 50        # one model, longer
    python bench/train.py --compile                         # train.compile=true (and the reference compiled too)
    python bench/train.py --device cpu --batch 8 --size 64 --steps 3     # exercise every path on a CPU
    python bench/train.py --json out.json                   # also write every row as JSON

Models, from their recipes in configs/ (heads, optimizer, crops, precision as a run would use them):

- ``vicreg``: configs/vicreg_resnet50_imagenet.yaml, ResNet-50, two 224 px views, 8192-8192-8192 projector, LARS,
  batch 256 per GPU.
- ``dino``: configs/dino_vit_small_imagenet.yaml, ViT-S/16, two 224 px global and eight 96 px local crops, the
  65536-way head, an EMA teacher, AdamW, gradient clipping, batch 64 per GPU (the recipe's 1024 over 16 GPUs).

Rows per model (images/s counts source images, each giving all of its views, as ``img_per_s`` in metrics.jsonl):

- ``reference``: a plain torchvision-style supervised step of the same backbone on the same crops (each crop size
  one batch, as ssltrain batches them): forward, cross-entropy over a 1000-way linear head, backward, SGD with
  momentum (ResNet) or fused AdamW (ViT); same precision (bf16 autocast on a GPU), same memory format, same
  compile setting. What the backbone costs on its own: the SSL ceiling should be within 10% of it.
- ``ceiling``: ssltrain's step (Method forward with heads and loss, backward, finite-gradient check, clipping,
  optimizer, EMA teacher) on synthetic views already on the device: the model ceiling.
- ``deferred``: the ceiling with ``train.finite_check=deferred`` (the finite check on the device, no host sync per
  step), where the recipe's optimizer can skip on the device (LARS, torch's fused AdamW: both rows).
- ``dali``: the same step fed by ``data.loader=dali`` from JPEG shards (GPU decode on a GPU; DALI's CPU mode
  without one). Reported as unavailable where DALI cannot run (the loader then falls back to the CPU path).
- ``cpu``: the same step fed by the CPU pipeline (DataLoader workers, torchvision augmentation).

The JPEGs are synthetic (smooth colour fields plus noise, ``--source-size`` px, about ImageNet's mean size); fewer
distinct images are written than are read, and the sample stream walks them epoch after epoch. Weights are
randomly initialised. Timings are wall clock over ``--steps`` steps after ``--warmup`` (CUDA-synchronised).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ssltrain.config import Config, load_config
from ssltrain.core.device import autocast_for, resolve_device
from ssltrain.data.embedded import synthetic_jpeg
from ssltrain.data.loaders import build_train_loader
from ssltrain.data.loaders.cpu import Views
from ssltrain.data.shards import write_shards
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog
from ssltrain.engine.guard import supports_device_skip
from ssltrain.engine.parallelize import channels_last_wanted
from ssltrain.engine.run import Run, build_run
from ssltrain.engine.step import train_step
from ssltrain.models.backbones import build_backbone

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "vicreg": ("configs/vicreg_resnet50_imagenet.yaml", 256),
    "dino": ("configs/dino_vit_small_imagenet.yaml", 64),
}


@dataclass
class Row:
    model: str
    path: str
    images_per_s: float | None  # None: the path could not run here
    vs_reference: float | None = None
    peak_gib: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


# --- inputs -----------------------------------------------------------------------------------------------------


def write_jpeg_shards(out: Path, images: int, side: int) -> str:
    write_shards((synthetic_jpeg(i, side * 4 // 3, side) for i in range(images)), out, "train", max_count=1000)
    return str(out)


def synthetic_views(cfg: Config, batch: int, device: torch.device) -> Views:
    g, lc = cfg.augment.global_crops, cfg.augment.local_crops
    make = lambda size: torch.randn(batch, 3, size, size, device=device)  # noqa: E731
    return Views(
        [make(g.size) for _ in range(g.count)],
        [make(lc.size) for _ in range(lc.count)],
        torch.arange(batch, device=device),
        None,
    )


# --- the two steps ----------------------------------------------------------------------------------------------


def build_trainee(recipe: Path, overrides: list[str], scratch: Path) -> Run:
    """The run ssltrain's paths time, built as ``ssltrain train`` builds it, in a scratch run directory."""
    return build_run(
        load_config(
            recipe, [*overrides, f"out_dir={scratch}", "name=bench", "checkpoint.resume=false", "log.tensorboard=false"]
        )
    )


def ssltrain_run(trainee: Run, batches: Iterator[Views], steps: int, warmup: int) -> float:
    """images/s of the engine's training step (``ssltrain.engine.step.train_step``: the loop's own) over ``batches``,
    without logging, monitors and checkpoints."""
    images, start = 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(trainee.device)
            start, images = time.perf_counter(), 0
        images += train_step(trainee, batches).samples
        trainee.step += 1
    _sync(trainee.device)
    return images / (time.perf_counter() - start)


def reference_run(cfg: Config, device: torch.device, batch: int, steps: int, warmup: int, compile: bool) -> float:
    """images/s of a plain supervised step of the same backbone on the same crops (see the module docstring)."""
    torch.manual_seed(cfg.seed)
    backbone, dim = build_backbone(
        cfg.model.backbone,
        patch_size=cfg.model.patch_size,
        image_size=cfg.augment.global_crops.size,
        drop_path=cfg.model.drop_path,
    )
    model = nn.Sequential(backbone, nn.Linear(dim, 1000)).to(device)
    channels_last = channels_last_wanted(cfg.train.channels_last, model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(dynamic=False)
    if cfg.model.backbone.startswith("resnet"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    views = synthetic_views(cfg, batch, device)
    groups = [torch.cat(group) for group in (views.global_views, views.local_views) if group]
    if channels_last:
        groups = [x.contiguous(memory_format=torch.channels_last) for x in groups]
    labels = [torch.randint(0, 1000, (x.shape[0],), device=device) for x in groups]
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(device, cfg.precision):
            loss = sum(nn.functional.cross_entropy(model(x), y) for x, y in zip(groups, labels))
            loss.backward()
        optimizer.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


# --- the four paths ---------------------------------------------------------------------------------------------


def loader_batches(cfg: Config, device: torch.device, steps: int) -> tuple[Iterable[Views], str]:
    catalog = ShardCatalog.from_spec(cfg.data.train, "data.train")
    sampler = GlobalBatchSampler(len(catalog), cfg.data.batch_size, cfg.seed, start=0, end=steps * cfg.data.batch_size)
    loader = build_train_loader(cfg, catalog, sampler, device)
    kind = type(loader).__name__
    return loader, kind


def measure(label: str, fn: Callable[[], float], device: torch.device) -> tuple[float | None, float | None, str]:
    """(images/s, peak GiB, note); a path that cannot run here is reported, not fatal."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        rate = fn()
    except Exception as err:  # noqa: BLE001 - one failing path must not hide the others' figures
        logging.getLogger("bench").exception("%s failed", label)
        return None, None, f"failed: {type(err).__name__}: {str(err)[:120]}"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return rate, peak, ""


def bench_model(name: str, args: argparse.Namespace, device: torch.device, data: str, scratch: Path) -> list[Row]:
    recipe, default_batch = RECIPES[name]
    batch = args.batch or default_batch
    size = args.size
    local = max(16, round(size * 96 / 224 / 16) * 16)  # ViT patch multiples, 96 px at 224
    overrides = [
        f"data.train={data}",
        f"data.batch_size={batch}",
        f"data.workers={args.workers}",
        f"device={device.type}",
        f"augment.global_crops.size={size}",
        f"augment.local_crops.size={local}",
        f"train.compile={str(args.compile).lower()}",
        "progress=false",
    ]
    cfg = load_config(ROOT / recipe, overrides)
    label = (
        f"{name} {cfg.model.backbone} {size}px b{batch} ({cfg.augment.global_crops.count}x{size}"
        + (f" + {cfg.augment.local_crops.count}x{local}" if cfg.augment.local_crops.count else "")
        + ")"
    )
    steps, warmup = args.steps, args.warmup
    rows: list[Row] = []

    def run(path: str, fn: Callable[[], float], note: str = "") -> None:
        rate, peak, problem = measure(f"{label} {path}", fn, device)
        rows.append(Row(label, path, rate, peak_gib=peak, note=problem or note))
        shown = f"{rate:9.1f} img/s" if rate is not None else "unavailable"
        print(f"  {path:<10} {shown}  {problem or note}", flush=True)

    print(label, flush=True)
    run("reference", lambda: reference_run(cfg, device, batch, steps, warmup, args.compile))
    trainee = build_trainee(ROOT / recipe, overrides, scratch / "ceiling")
    fixed = synthetic_views(cfg, batch, device)
    run("ceiling", lambda: ssltrain_run(trainee, iter(lambda: fixed, None), steps, warmup))
    if supports_device_skip(trainee.optimizer):  # train.finite_check=deferred: no host sync in the step
        deferred = build_trainee(ROOT / recipe, [*overrides, "train.finite_check=deferred"], scratch / "deferred")
        run(
            "deferred",
            lambda: ssltrain_run(deferred, iter(lambda: fixed, None), steps, warmup),
            "ceiling with train.finite_check=deferred",
        )

    dali_cfg = load_config(ROOT / recipe, [*overrides, "data.loader=dali"])
    try:
        loader, kind = loader_batches(dali_cfg, device, warmup + steps)
    except Exception as err:  # noqa: BLE001 - e.g. ssltrain.data.loaders.dali missing or DALI failing to start
        loader, kind = None, f"an error: {type(err).__name__}: {str(err)[:120]}"
    if kind == "DaliLoader":
        run(
            "dali",
            lambda: ssltrain_run(trainee, iter(loader), steps, warmup),
            "DALI GPU decode" if device.type == "cuda" else "DALI CPU mode (device_id=None)",
        )
    else:
        note = (
            f"unavailable: DALI cannot run here (the loader {'fell back to ' + kind if loader else 'raised ' + kind})"
        )
        rows.append(Row(label, "dali", None, note=note))
        print(f"  {'dali':<10} {note}", flush=True)
    loader = None  # let DALI go before the CPU loader starts

    cpu_cfg = load_config(ROOT / recipe, [*overrides, "data.loader=torch"])
    loader, _ = loader_batches(cpu_cfg, device, warmup + steps)
    run("cpu", lambda: ssltrain_run(trainee, iter(loader), steps, warmup), f"{args.workers} DataLoader workers")

    reference = rows[0].images_per_s
    for row in rows:
        if row.images_per_s is not None and reference:
            row.vs_reference = row.images_per_s / reference
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'model':<48} {'path':<10} {'img/s':>9} {'vs ref':>7} {'peak GiB':>9}  note"]
    for r in rows:
        rate = f"{r.images_per_s:9.1f}" if r.images_per_s is not None else f"{'-':>9}"
        ratio = f"{r.vs_reference:7.2f}" if r.vs_reference is not None else f"{'-':>7}"
        peak = f"{r.peak_gib:9.1f}" if r.peak_gib is not None else f"{'-':>9}"
        lines.append(f"{r.model:<48} {r.path:<10} {rate} {ratio} {peak}  {r.note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--models", default="vicreg,dino", help="comma-separated: vicreg, dino")
    parser.add_argument("--batch", type=int, help="per-GPU batch (default: 256 for vicreg, 64 for dino)")
    parser.add_argument("--size", type=int, default=224, help="global crop size (local crops scale as 96/224)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5, 10 with --compile, 1 on CPU)")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(15, (os.cpu_count() or 2) - 1)),
        help="data workers (CPU path) / DALI threads",
    )
    parser.add_argument("--source-size", type=int, help="height of the synthetic JPEGs (default 375; CPU: 1.5 x size)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true, and compile the reference")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ssltrain-bench-train"))
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    if args.warmup is None:
        args.warmup = 1 if device.type == "cpu" else (10 if args.compile else 5)
    side = args.source_size or (375 if device.type == "cuda" else args.size * 3 // 2)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(RECIPES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(RECIPES)}")
    distinct = max(2 * max(args.batch or RECIPES[m][1] for m in models), 64)
    data = Path(args.data_dir) / f"jpeg-{distinct}-{side}px"
    if not any(data.glob("train-*.tar")):
        start = time.perf_counter()
        write_jpeg_shards(data, distinct, side)
        print(f"wrote {distinct} synthetic {side}px-high JPEGs to {data} in {time.perf_counter() - start:.1f}s")
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(
        f"bench/train.py on {device_name(device)}; torch {torch.__version__}; {precision}; "
        f"compile {'on' if args.compile else 'off'}; {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ssltrain-bench-runs-") as scratch:
        rows = [row for m in models for row in bench_model(m, args, device, str(data), Path(scratch) / m)]
    print()
    print(table(rows))
    print(f"({time.perf_counter() - start:.0f} s)")
    for model in dict.fromkeys(r.model for r in rows):
        ceiling = next(r for r in rows if r.model == model and r.path == "ceiling")
        if ceiling.vs_reference is not None:
            verdict = "within" if ceiling.vs_reference >= 0.9 else "NOT within"
            print(f"{model}: ssltrain ceiling {verdict} 10% of the plain step ({ceiling.vs_reference:.2f}x)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "compile": args.compile,
                    "rows": [asdict(r) for r in rows],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
