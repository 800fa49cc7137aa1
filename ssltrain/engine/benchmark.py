"""``ssltrain bench --profile CONFIG [overrides]``: a few steps of the real loop under ``torch.profiler``, split into
the phases of :mod:`ssltrain.engine.profile`. Periodic checkpoints are turned off for the run; it writes to a
temporary directory."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ssltrain.config import load_config
from ssltrain.core.collectives import rank, world_size
from ssltrain.core.device import resolve_device
from ssltrain.engine.loop import train
from ssltrain.engine.profile import PHASES, StepBreakdown, breakdown, profiling


def run_profile(
    config: str | Path | None, overrides: list[str], steps: int = 10, warmup: int = 3, trace: Path | None = None
) -> StepBreakdown:
    """Train ``warmup + steps + 1`` steps of the config in a temporary run directory; profile ``steps`` of them."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps and --warmup must be >= 1, got {steps} and {warmup}")
    total = warmup + steps + 1
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before the profiler's first start: no CUPTI errors on CPU
    with tempfile.TemporaryDirectory(prefix="ssltrain-profile-") as tmp:
        cfg = load_config(
            config,
            [
                *overrides,
                f"out_dir={tmp}",
                "name=profile",
                f"steps={total}",
                f"checkpoint.every={total + 1}",
                "checkpoint.resume=false",
                "progress=false",
                "log.tensorboard=false",
                "log.wandb=false",
            ],
        )
        device = resolve_device(cfg.device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1)
        on_ready = (lambda p: p.export_chrome_trace(str(trace))) if trace is not None else None
        with (
            torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_ready) as prof,
            profiling(prof, device.type == "cuda"),
        ):
            train(cfg)
        result = breakdown(list(prof.events()))
    result.device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result.world_size, result.rank = world_size(), rank()
    return result


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Mount ``ssltrain bench`` on the CLI's subparsers."""
    bench = sub.add_parser(
        "bench",
        help="profile a config's training step: where the time goes",
        description="Runs a few training steps of CONFIG under torch.profiler and prints the "
        "share of each phase of a step (data wait, forward, loss, backward, optimizer, "
        "communication). Under torchrun every rank profiles and rank 0 prints. "
        "Throughput benchmarks are in bench/ (bench/train.py).",
    )
    bench.add_argument("--profile", metavar="CONFIG", required=True, help="YAML config, e.g. configs/demo.yaml")
    bench.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=256")
    bench.add_argument("--steps", type=int, default=10, help="profiled steps (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="steps run first, not profiled (default 3)")
    bench.add_argument("--trace", type=Path, help="also write a Chrome trace (chrome://tracing, Perfetto)")
    bench.add_argument("--json", type=Path, help="also write the breakdown as JSON")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    result = run_profile(args.profile, args.overrides, steps=args.steps, warmup=args.warmup, trace=args.trace)
    if result.rank != 0:
        return
    print(
        f"{args.profile}: {result.steps} steps after {args.warmup} warm-up, {result.device}, "
        f"{result.world_size} rank{'s' if result.world_size > 1 else ''} (rank 0's view)"
    )
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "share": {k: result.share(k) for k in PHASES}}, indent=1))
