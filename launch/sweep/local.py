"""Run a sweep's points on this machine: one after another, or ``parallel`` at a time, one process a point.

Each point is its own process (``python -m ssltrain.launch.sweep.point``) writing to its own ``sweep.log``, so a point
that fails (a bad setting, a NaN, an out-of-memory kill) is recorded and the others go on. The children die with
the runner (Linux's parent-death signal): a runner killed with ``kill -9`` leaves no orphan training in the point's
directory, and running the same command again resumes the interrupted point from its checkpoint.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ssltrain.launch.sweep.layout import SweepDir

log = logging.getLogger("ssltrain")

__all__ = ["PointOutcome", "run_local", "start_point"]

_PR_SET_PDEATHSIG = 1


@dataclass
class PointOutcome:
    name: str
    status: str  # done | failed | busy
    returncode: int
    log: Path


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the runner dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_point(sweep: SweepDir, name: str) -> subprocess.Popen:
    """The point's process, its output appended to its ``sweep.log``."""
    log_path = sweep.log_path(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ssltrain.launch.sweep.point", str(sweep.root), name],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _outcome(sweep: SweepDir, name: str, returncode: int) -> PointOutcome:
    status = {0: "done", 3: "busy"}.get(returncode, "failed")
    if status == "failed":
        state = sweep.state(name)
        if state is not None and state.status != "failed":  # killed before it could record why
            state.status, state.error = "failed", f"process ended with exit status {returncode}"
            sweep.write_state(state)
    return PointOutcome(name, status, returncode, sweep.log_path(name))


def run_local(
    sweep: SweepDir,
    names: Sequence[str],
    parallel: int = 1,
    on_done: Callable[[PointOutcome], None] | None = None,
) -> list[PointOutcome]:
    """Run the points ``names`` (those not done), ``parallel`` at a time; returns each one's outcome in the order
    they ended. ``on_done`` is called as each ends (progress lines; Optuna's tell)."""
    pending = [n for n in names if (s := sweep.state(n)) is None or s.status != "done"]
    running: dict[str, subprocess.Popen] = {}
    outcomes: list[PointOutcome] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                name = pending.pop(0)
                log.info("point %s: starting (log: %s)", name, sweep.log_path(name))
                running[name] = start_point(sweep, name)
            time.sleep(0.2)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                outcome = _outcome(sweep, name, proc.returncode)
                outcomes.append(outcome)
                if outcome.status == "failed":
                    log.error("point %s failed (exit %d); its log: %s", name, proc.returncode, outcome.log)
                elif outcome.status == "busy":
                    log.warning("point %s is being run by another process; skipped", name)
                else:
                    log.info("point %s done", name)
                if on_done is not None:
                    on_done(outcome)
    finally:
        for proc in running.values():  # an interrupted runner (Ctrl-C) stops its points; they resume next time
            proc.send_signal(signal.SIGTERM)
        for proc in running.values():
            proc.wait()
    return outcomes
