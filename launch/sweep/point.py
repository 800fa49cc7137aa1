"""Run one point of a sweep: train (resuming from its latest checkpoint), then probe it against the shared
random-init baseline, recording its status in ``point.json``.

The same function runs under the local runner (one process a point, ``python -m ssltrain.launch.sweep.point``), a Slurm
array task and an Optuna trial. The point's lock makes a second runner skip a point that one is already running.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

from ssltrain.launch.sweep.layout import SweepDir

log = logging.getLogger("ssltrain")

__all__ = ["run_point", "PointBusy"]


class PointBusy(RuntimeError):
    """Another process holds the point (a second sweep runner, or an array task still running it)."""


def run_point(sweep_root: Path, name: str, stop_after_steps: int | None = None) -> str:
    """Train and evaluate the point ``name`` of the sweep at ``sweep_root``; returns its status afterwards ("done",
    or "running" when training stopped early on a signal or ``stop_after_steps``). A failure is recorded in
    ``point.json`` (status "failed", the error) and raised."""
    from ssltrain.core.process_group import explain_timeouts
    from ssltrain.engine.loop import train
    from ssltrain.eval.evaluate import EvalOptions, evaluate_run
    from ssltrain.launch.preflight import preflight
    from ssltrain.launch.slurm import latest_step

    sweep = SweepDir(sweep_root)
    with sweep.claim(name) as mine:
        if not mine:
            raise PointBusy(f"point '{sweep.point_dir(name)}' is being run by another process")
        state = sweep.state(name)
        if state is None:
            raise FileNotFoundError(
                f"no point '{name}' in sweep '{sweep_root}' (no {sweep.point_dir(name)}/point.json)"
            )
        if state.status == "done":
            return "done"
        state.status, state.attempts, state.error = "running", state.attempts + 1, ""
        sweep.write_state(state)
        start = time.monotonic()
        try:
            cfg = sweep.config(state)
            for warning in preflight(cfg, 1):
                log.warning(warning)
            with explain_timeouts(cfg.dist.timeout_s):
                run_dir = train(cfg, stop_after_steps=stop_after_steps)
            if latest_step(run_dir) < cfg.steps:
                state.wall_s += time.monotonic() - start
                sweep.write_state(state)
                return "running"
            evaluate_run(run_dir, options=EvalOptions(baseline_dir=sweep.baselines))
        except (SystemExit, KeyboardInterrupt):
            # Stopped, not failed: submitit exits from inside training once it has requeued the task (USR2), and
            # Ctrl-C stops a local point; both resume from the checkpoint written on the way out.
            state.wall_s += time.monotonic() - start
            sweep.write_state(state)
            raise
        except BaseException as err:
            state.status, state.wall_s = "failed", state.wall_s + time.monotonic() - start
            state.error = f"{type(err).__name__}: {err}".strip()[:2000]
            sweep.write_state(state)
            raise
        state.status, state.wall_s = "done", state.wall_s + time.monotonic() - start
        sweep.write_state(state)
        log.info("point %s done in %.0f s", name, state.wall_s)
        return "done"


def main(argv: list[str] | None = None) -> int:
    """``python -m ssltrain.launch.sweep.point SWEEP_DIR POINT``: what the local runner starts for each point."""
    from ssltrain.core.logs import setup_logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ssltrain.launch.sweep.point SWEEP_DIR POINT", file=sys.stderr)
        return 2
    setup_logging(0)
    try:
        status = run_point(Path(args[0]), args[1])
    except PointBusy as err:
        print(f"ssltrain sweep: {err}", file=sys.stderr)
        return 3
    except Exception:
        traceback.print_exc()
        return 1
    return 0 if status == "done" else 4


if __name__ == "__main__":
    sys.exit(main())
