"""``ssltrain bench --profile CONFIG [overrides]``: where a training step's time goes.

It runs the real loop (``ssltrain.engine.loop.train``) for a few steps under ``torch.profiler`` and splits each step's wall
time on rank 0 into disjoint phases that add up to the step:

- ``data``: waiting for the next batch; ``forward``: the Method's modules (backbone, heads, teacher), inputs moved
  to the device included; ``loss``: the rest of the Method's forward (loss terms, gathers, monitors);
  ``backward``; ``optimizer``: finite checks, clipping, the step, EMA teachers;
- ``communication``: time with a collective in flight (gloo's worker threads, NCCL kernels), carved out of whichever
  phase it overlaps, so a DDP all-reduce hidden behind the backward still counts here;
- ``other``: the rest of the loop (learning-rate update, logging).

The loop marks its phases with :func:`phase` and steps with :func:`profile_step`; both cost nothing unless a
profile is running. On CUDA each phase ends with a synchronisation while profiling, so GPU time lands in the phase
that launched it (the profiled step is then a little slower than an unprofiled one). Periodic checkpoints are turned
off for the run; it writes to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

PHASES = ("data", "forward", "loss", "backward", "optimizer", "communication", "other")
_LOOP_PHASES = ("data", "forward", "backward", "optimizer")
_PREFIX = "ssltrain."
_COMM = ("gloo:", "nccl:")

_profiler: torch.profiler.profile | None = None  # the running profile, set by run_profile
_sync_cuda = False


def phase(name: str) -> contextlib.AbstractContextManager:
    """A named range of the training step (one of the loop phases); a no-op unless a profile is running."""
    if _profiler is None:
        return contextlib.nullcontext()
    return _Range(_PREFIX + name)


class _Range(torch.profiler.record_function):
    def __exit__(self, *exc: object) -> None:
        if _sync_cuda:
            torch.cuda.synchronize()
        super().__exit__(*exc)


def profile_step() -> None:
    """Mark the start of an optimizer step (the loop calls this first in every iteration)."""
    if _profiler is not None:
        _profiler.step()


# The hooks run inside a compiled backbone's call: they test the flag where torch.compile can see it (no graph
# break while not profiling) and open and close the range outside the graph.
def _open_model_range(module: nn.Module, args: tuple) -> None:
    if _profiler is not None:
        _enter(module)


def _close_model_range(module: nn.Module, args: tuple, output: object) -> None:
    if _profiler is not None:
        _exit(module)


@torch.compiler.disable
def _enter(module: nn.Module) -> None:
    rng = _Range(_PREFIX + "model")
    rng.__enter__()
    module.__dict__.setdefault("_ssltrain_ranges", []).append(rng)


@torch.compiler.disable
def _exit(module: nn.Module) -> None:
    ranges = module.__dict__.get("_ssltrain_ranges")
    if ranges:
        ranges.pop().__exit__(None, None, None)


def time_model_calls(method: nn.Module) -> None:
    """Mark calls of the Method's direct submodules as model compute; the rest of its forward is the loss."""
    for child in method.children():
        child.register_forward_pre_hook(_open_model_range)
        child.register_forward_hook(_close_model_range)


# --- the breakdown --------------------------------------------------------------------------------------------------

Interval = tuple[float, float]


def _union(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _clip(intervals: list[Interval], window: Interval) -> list[Interval]:
    return [(max(s, window[0]), min(e, window[1])) for s, e in intervals if e > window[0] and s < window[1]]


def _minus(intervals: list[Interval], holes: list[Interval]) -> list[Interval]:
    """The parts of (disjoint, sorted) ``intervals`` outside (disjoint, sorted) ``holes``."""
    out = []
    for start, end in intervals:
        cursor = start
        for h_start, h_end in holes:
            if h_end <= cursor or h_start >= end:
                continue
            if h_start > cursor:
                out.append((cursor, h_start))
            cursor = max(cursor, h_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def _length(intervals: list[Interval]) -> float:
    return sum(e - s for s, e in intervals)


@dataclass
class StepBreakdown:
    """Seconds per phase summed over the profiled steps, and the steps' total wall time."""

    steps: int
    total_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    device: str = ""
    world_size: int = 1
    rank: int = 0

    def share(self, name: str) -> float:
        return self.seconds[name] / self.total_s if self.total_s > 0 else 0.0

    def table(self) -> str:
        rows = [f"{'phase':<15}{'ms/step':>10}{'share':>9}"]
        for name in PHASES:
            rows.append(f"{name:<15}{1e3 * self.seconds[name] / self.steps:>10.2f}{100 * self.share(name):>8.1f}%")
        rows.append(f"{'step':<15}{1e3 * self.total_s / self.steps:>10.2f}{100.0:>8.1f}%")
        return "\n".join(rows)


def breakdown(events: list) -> StepBreakdown:
    """Split the profiler's ``ProfilerStep`` windows (the loop's thread) into :data:`PHASES` (module docstring)."""
    def span(e) -> Interval:
        return (e.time_range.start / 1e6, e.time_range.end / 1e6)

    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    if not steps:
        raise RuntimeError("the profile holds no complete step; run more steps (--steps)")
    windows, thread = sorted(span(e) for e in steps), steps[0].thread
    ranges: dict[str, list[Interval]] = {name: [] for name in (*_LOOP_PHASES, "model")}
    comm: list[Interval] = []
    for e in events:
        name = e.name
        if name.startswith(_PREFIX) and name[len(_PREFIX):] in ranges and e.thread == thread:
            ranges[name[len(_PREFIX):]].append(span(e))
        elif name.startswith(_COMM) or ("nccl" in name.lower() and "cuda" in str(e.device_type).lower()):
            comm.append(span(e))
    seconds = dict.fromkeys(PHASES, 0.0)
    for window in windows:
        busy = _union(_clip(comm, window))
        seconds["communication"] += _length(busy)
        covered = list(busy)
        for name in _LOOP_PHASES:
            own = _minus(_union(_clip(ranges[name], window)), busy)
            covered += own
            if name == "forward":  # the Method's modules; the rest of its forward is the loss
                model = _union(_clip(ranges["model"], window))
                model = _minus(model, _minus(model, own))  # inside the forward, outside communication
                seconds["forward"] += _length(model)
                seconds["loss"] += _length(own) - _length(model)
            else:
                seconds[name] += _length(own)
        seconds["other"] += (window[1] - window[0]) - _length(_union(covered))
    return StepBreakdown(steps=len(windows), total_s=sum(w[1] - w[0] for w in windows), seconds=seconds)


# --- running it ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _profiling(prof: torch.profiler.profile, sync_cuda: bool) -> Iterator[None]:
    global _profiler, _sync_cuda
    _profiler, _sync_cuda = prof, sync_cuda
    try:
        yield
    finally:
        _profiler, _sync_cuda = None, False


def run_profile(config: str | Path | None, overrides: list[str], steps: int = 10, warmup: int = 3,
                trace: Path | None = None) -> StepBreakdown:
    """Train ``warmup + steps + 1`` steps of the config in a temporary run directory; profile ``steps`` of them."""
    from ssltrain.config import load_config
    from ssltrain.core.collectives import rank, world_size
    from ssltrain.engine.loop import resolve_device, train

    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps and --warmup must be >= 1, got {steps} and {warmup}")
    total = warmup + steps + 1
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before the profiler's first start: no CUPTI errors on CPU
    with tempfile.TemporaryDirectory(prefix="ssltrain-profile-") as tmp:
        cfg = load_config(config, [*overrides, f"out_dir={tmp}", "name=profile", f"steps={total}",
                                   f"checkpoint.every={total + 1}", "checkpoint.resume=false", "progress=false",
                                   "log.tensorboard=false", "log.wandb=false"])
        device = resolve_device(cfg.device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1)
        on_ready = (lambda p: p.export_chrome_trace(str(trace))) if trace is not None else None
        with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=on_ready) as prof, \
                _profiling(prof, device.type == "cuda"):
            train(cfg)
        result = breakdown(list(prof.events()))
    result.device = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result.world_size, result.rank = world_size(), rank()
    return result


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Mount ``ssltrain bench`` on the CLI's subparsers."""
    bench = sub.add_parser("bench", help="profile a config's training step: where the time goes",
                           description="Runs a few training steps of CONFIG under torch.profiler and prints the "
                                       "share of each phase of a step (data wait, forward, loss, backward, optimizer, "
                                       "communication). Under torchrun every rank profiles and rank 0 prints. "
                                       "Throughput benchmarks are in bench/ (bench/train.py).")
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
    print(f"{args.profile}: {result.steps} steps after {args.warmup} warm-up, {result.device}, "
          f"{result.world_size} rank{'s' if result.world_size > 1 else ''} (rank 0's view)")
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "share": {k: result.share(k) for k in PHASES}}, indent=1))
