"""``ssltrain sweep CONFIG key=a,b other=x,y ...`` and ``ssltrain sweep report runs/<sweep>``.

A sweep is many ordinary runs as one experiment: the points go to ``runs/<sweep>/<point>/``, run here (``--local``,
the default, ``--parallel N`` at a time) or as a Slurm job array (``--slurm``), each trains, resumes and is probed
like a single run; the same command again skips finished points and resumes the others. ``--optuna N`` replaces the
grid by N trials of an Optuna study over the axes (ranges allowed: ``optim.lr=logrange(1e-4,1e-2)``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ssltrain.config import ConfigError, load_config
from ssltrain.launch.sweep.layout import SweepDir
from ssltrain.launch.sweep.space import SweepSpec, build_spec

log = logging.getLogger("ssltrain")

__all__ = ["add_sweep_parser", "cmd_sweep"]


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sweep",
        help="many runs as one experiment (grid, random, Optuna; local or a Slurm array) and its report",
        description="Run a grid (or --random N of it, or --optuna N trials) of pretraining runs, each probed "
        "against the random-init backbone, then write a report. CONFIG is a training YAML or a sweep file "
        "(configs/sweeps/*.yaml). `ssltrain sweep report runs/<sweep>` rewrites the report.",
    )
    s.add_argument("config", help="training YAML, sweep YAML, or `report` followed by the sweep directory")
    s.add_argument(
        "overrides",
        nargs="*",
        help="key=v1,v2 (an axis), key=v (fixed for every point), key=logrange(lo,hi) (--optuna only)",
    )
    s.add_argument("--name", help="the sweep's name: runs/<name> (default: the sweep file's name or CONFIG-sweep)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run the points on this machine (the default)")
    where.add_argument("--slurm", action="store_true", help="a Slurm job array, one task a point")
    s.add_argument("--parallel", type=int, default=1, help="--local: points running at once (default 1)")
    s.add_argument("--random", type=int, help="run this many points of the grid, drawn with --seed")
    s.add_argument("--seed", type=int, help="seed of --random and of Optuna's sampler (default 0)")
    s.add_argument(
        "--probe", help="the figure points are ranked by: knn_top1 (default), linear_top1, knn_gain, linear_gain, loss"
    )
    s.add_argument("--optuna", type=int, metavar="N", help="N trials of an Optuna study instead of the grid")
    goal = s.add_mutually_exclusive_group()
    goal.add_argument("--maximize", metavar="PROBE", help="--optuna: the figure to maximise (e.g. knn_top1)")
    goal.add_argument("--minimize", metavar="PROBE", help="--optuna: the figure to minimise (e.g. loss)")
    s.add_argument("--dry-run", action="store_true", help="list the points and their overrides; run nothing")
    slurm = s.add_argument_group("Slurm (--slurm): one array task a point, requeued like a single run")
    slurm.add_argument("--array-parallelism", type=int, default=8, help="array tasks running at once (default 8)")
    slurm.add_argument("--gpus-per-node", type=int, default=0)
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem-gb", type=float)
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="1440", help="time limit per allocation (minutes or [D-]HH:MM:SS)")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--signal-delay-s", type=int, default=120, help="USR2 this long before --time")
    slurm.add_argument("--max-requeues", type=int, default=10, help="requeues of a task after time-outs (default 10)")
    slurm.add_argument("--wait", action="store_true", help="block until every task has ended, then report")
    s.set_defaults(func=cmd_sweep)


def sweep_root(spec: SweepSpec) -> Path:
    """``<out_dir>/<sweep name>``, out_dir as the base config (with the fixed overrides) sets it."""
    return Path(load_config(spec.config, spec.overrides).out_dir) / spec.name


def _warn_oversubscribed(spec: SweepSpec, parallel: int) -> None:
    """Points side by side with more intra-op threads than cores run many times slower (torch's threads spin), not
    just proportionally slower: measured 10x here with two 2-thread points on 2 cores."""
    cores = os.cpu_count() or 1
    threads = load_config(spec.config, spec.overrides).threads or cores  # 0: torch's default, one a core
    if parallel > 1 and parallel * threads > cores:
        log.warning(
            "--parallel %d points x threads=%d exceed the %d CPU cores: add threads=%d (a fixed override) for speed",
            parallel,
            threads,
            cores,
            max(1, cores // parallel),
        )


def _report(sweep: SweepDir, probe: str | None) -> None:
    from ssltrain.launch.sweep.report import format_table, write_report

    path = write_report(sweep, probe)
    print(format_table(sweep, probe))
    print(f"report: {path}")


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.config == "report":
        if len(args.overrides) != 1:
            raise ConfigError("usage: ssltrain sweep report runs/<sweep>")
        _report(SweepDir(Path(args.overrides[0])), args.probe)
        return 0
    if not Path(args.config).is_file():
        raise FileNotFoundError(2, "no such config file", args.config)
    spec = build_spec(args.config, args.overrides, args.name, args.probe, args.random, args.seed)
    if args.optuna and args.slurm:
        raise ConfigError(
            "--optuna runs its trials on this machine (--parallel N at a time); for Slurm, sweep a grid or --random N"
        )
    if args.optuna:
        from ssltrain.launch.sweep.results import check_metric, higher_is_better
        from ssltrain.launch.sweep.search import run_optuna

        goal = check_metric(args.maximize or args.minimize or spec.probe)
        minimize = bool(args.minimize) or (not args.maximize and not higher_is_better(goal))
        return run_optuna(spec, sweep_root(spec), args.optuna, goal, minimize, args.parallel, args.dry_run)
    if not spec.axes:
        raise ConfigError("nothing to sweep: give at least one key=v1,v2 (or a sweep file with axes)")
    points = spec.points()
    for point in points:  # every point's config must load: a typo fails now, not at point 17
        load_config(spec.config, [*spec.overrides, *point.overrides])
    sweep = SweepDir(sweep_root(spec))
    if args.dry_run:
        print(f"sweep {sweep.root}: {len(points)} points of {spec.grid_size()}")
        for point in points:
            print(f"  {point.name}: {' '.join(point.overrides)}")
        return 0
    sweep.create(spec)
    for point in points:
        sweep.add_point(point)
    names = [p.name for p in points]
    done = sum(1 for n in names if (s := sweep.state(n)) is not None and s.status == "done")
    log.info("sweep %s: %d points, %d done earlier", sweep.root, len(names), done)
    if args.slurm:
        from ssltrain.launch.sweep.slurm import slurm_spec_from_args, submit_array, wait_array

        jobs = submit_array(sweep, names, slurm_spec_from_args(args), args.array_parallelism)
        for job in jobs:
            print(f"submitted slurm job {job.job_id}")
        if not args.wait:
            return 0
        wait_array(jobs)
    else:
        from ssltrain.launch.sweep.local import run_local

        _warn_oversubscribed(spec, args.parallel)
        run_local(sweep, names, args.parallel)
    _report(sweep, spec.probe)
    failed = [s for s in sweep.states() if s.name in names and s.status != "done"]
    for state in failed:
        print(f"point {state.name}: {state.status}: {state.error} (log: {sweep.log_path(state.name)})", file=sys.stderr)
    return 1 if failed else 0
