"""Where a training step's time goes: the phase marks the step sets and the breakdown of a profile into phases.

``ssltrain bench --profile`` (:mod:`ssltrain.engine.benchmark`) runs the real loop under ``torch.profiler`` and
splits each step's wall time on rank 0 into disjoint phases that add up to the step:

- ``data``: waiting for the next batch; ``forward``: the Method's modules (backbone, heads, teacher), inputs moved
  to the device included; ``loss``: the rest of the Method's forward (loss terms, gathers, monitors);
  ``backward``; ``optimizer``: finite checks, clipping, the step, EMA teachers;
- ``communication``: time with a collective in flight (gloo's worker threads, NCCL kernels), carved out of whichever
  phase it overlaps, so a DDP all-reduce hidden behind the backward still counts here;
- ``other``: the rest of the loop (learning-rate update, logging).

The loop marks its phases with :func:`phase` and steps with :func:`profile_step`; both cost nothing unless a
profile is running. On CUDA each phase ends with a synchronisation while profiling, so GPU time lands in the phase
that launched it (the profiled step is then a little slower than an unprofiled one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

PHASES = ("data", "forward", "loss", "backward", "optimizer", "communication", "other")
_LOOP_PHASES = ("data", "forward", "backward", "optimizer")
_PREFIX = "ssltrain."
_COMM = ("gloo:", "nccl:")

_profiler: torch.profiler.profile | None = None  # the running profile, set by profiling()
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
        rows += [
            f"{name:<15}{1e3 * self.seconds[name] / self.steps:>10.2f}{100 * self.share(name):>8.1f}%"
            for name in PHASES
        ]
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
        if name.startswith(_PREFIX) and name[len(_PREFIX) :] in ranges and e.thread == thread:
            ranges[name[len(_PREFIX) :]].append(span(e))
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


@contextlib.contextmanager
def profiling(prof: torch.profiler.profile, sync_cuda: bool) -> Iterator[None]:
    global _profiler, _sync_cuda
    _profiler, _sync_cuda = prof, sync_cuda
    try:
        yield
    finally:
        _profiler, _sync_cuda = None, False
