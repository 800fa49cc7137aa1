"""Short runs of the ViT-S/16 ImageNet recipes under FSDP and bf16: each method trained as a user runs it
(``torchrun ... ssltrain train <recipe>``, JPEG shards, loader workers), its images/s against a plain supervised
ViT-S/16 step on the same global crops measured in the same process set-up (bench/train.py's ``reference``).

    python bench/vit_methods.py                                  # GPU: mae ijepa dinov2 lejepa mocov3, 50 steps
    python bench/vit_methods.py --methods ijepa --steps 100 --batch 128
    python bench/vit_methods.py --device cpu --batch 4 --steps 3 --images 16 --set augment.global_crops.size=32 \\
        augment.local_crops.size=16 precision=fp32            # exercise every path on a CPU

Each method keeps its recipe's heads, crops, optimizer and precision; what changes is the run control: ``steps``,
the per-GPU batch (``--batch``; the recipes' global batches are for 16-64 GPUs), ``dist.strategy=fsdp`` and the data
(synthetic ImageNet-sized JPEGs, ``synthetic_jpeg``). images/s is the median of the logged ``img_per_s`` after the
first log line (warm-up, compilation of nothing: eager); a run whose loss is not finite is reported as failed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    name: ROOT / "configs" / f"{name}_vit_small_imagenet.yaml"
    for name in ("mae", "ijepa", "dinov2", "lejepa", "mocov3")
}


def run_method(recipe: Path, nproc: int, overrides: list[str], log_path: Path) -> int:
    """``ssltrain train`` under torchrun with ``nproc`` ranks; the exit status (its output in ``log_path``)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "ssltrain.cli", "train", str(recipe), *overrides,
    ]  # fmt: skip
    with open(log_path, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def summarise(metrics: Path) -> tuple[float | None, float | None]:
    """(median images/s after the first logged step, the last loss) from a run's metrics.jsonl."""
    if not metrics.is_file():
        return None, None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
    speeds = speeds[1:] or speeds  # the first interval holds the start-up
    losses = [r["loss"] for r in records if "loss" in r]
    return (statistics.median(speeds) if speeds else None), (losses[-1] if losses else None)


def main() -> None:
    import train as train_bench  # bench/train.py: the JPEG shards and the supervised reference step

    from ssltrain.config import load_config
    from ssltrain.core.device import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="per GPU (rank)")
    parser.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun --nproc-per-node)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers a rank")
    parser.add_argument("--images", type=int, default=2048, help="distinct synthetic JPEGs (read epoch after epoch)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        side = 375 if device.type == "cuda" else 48
        shards = train_bench.write_jpeg_shards(scratch / "shards", args.images, side)
        run_control = [
            f"data.train={shards}/train-*.tar",
            f"eval.train={shards}/train-*.tar",  # checked before training starts; no probe runs here
            f"eval.val={shards}/train-*.tar",
            f"data.batch_size={args.batch * args.nproc}",
            f"data.workers={args.workers}",
            f"steps={args.steps}",
            "optim.warmup_steps=10",
            f"log_every={max(1, args.steps // 10)}",
            "progress=false",
            "checkpoint.every=100000",
            "log.tensorboard=false",
            "eval.online_knn_every=0",
            "dist.strategy=fsdp",
            f"device={args.device}",
            f"out_dir={scratch / 'runs'}",
            *args.set,
        ]
        for name in args.methods:
            overrides = [f"name={name}", *run_control]
            status = run_method(RECIPES[name], args.nproc, overrides, scratch / f"{name}.log")
            speed, loss = summarise(scratch / "runs" / name / "metrics.jsonl")
            cfg = load_config(RECIPES[name], overrides)
            reference = train_bench.reference_run(cfg, device, args.batch, max(3, args.steps // 5), 2, False)
            ok = status == 0 and loss is not None and math.isfinite(loss)
            if not ok:
                print((scratch / f"{name}.log").read_text()[-3000:], file=sys.stderr)
            rows.append(
                {
                    "method": name,
                    "images_per_s_per_rank": None if speed is None else speed / args.nproc,
                    "reference_images_per_s": reference,
                    "vs_reference": None if speed is None else speed / args.nproc / reference,
                    "last_loss": loss,
                    "ok": ok,
                }
            )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    changed = " ".join(args.set) or "the recipes' settings"
    print(f"{where}, {args.nproc} rank(s), batch {args.batch} a rank, {args.steps} steps, FSDP; {changed}")
    print("| method | img/s a rank | supervised ViT-S/16 img/s | ratio | last loss | ok |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(
            f"| {r['method']} | {fmt(r['images_per_s_per_rank'], '.1f')} | {r['reference_images_per_s']:.1f} | "
            f"{fmt(r['vs_reference'], '.2f')} | {fmt(r['last_loss'], '.4f')} | {r['ok']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
