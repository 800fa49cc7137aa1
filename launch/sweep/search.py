"""Adaptive search with Optuna (``ssltrain sweep ... --optuna N --maximize knn_top1``): its sampler proposes the
points, each runs as an ordinary sweep point, and its probe is told back.

The study lives in the sweep directory (``optuna.journal``, Optuna's file journal: no database server, safe for
several processes on one filesystem), so the same command again continues it: trials left running by a killed
runner are resumed from their points' checkpoints and told, then new trials are asked until N have ended. An axis
of values is a categorical choice; ``key=range(lo,hi)`` / ``logrange`` / ``intrange`` are numeric ranges.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ssltrain.config import ConfigError, load_config
from ssltrain.launch.sweep.layout import SweepDir
from ssltrain.launch.sweep.local import run_local
from ssltrain.launch.sweep.space import Axis, Level, Point, SweepSpec, short_names

log = logging.getLogger("ssltrain")

__all__ = ["run_optuna", "JOURNAL"]

JOURNAL = "optuna.journal"


def _distribution(axis: Axis) -> Any:
    import optuna

    if axis.search is None:
        return optuna.distributions.CategoricalDistribution(axis.labels)
    kind, low, high = axis.search
    if kind == "intrange":
        return optuna.distributions.IntDistribution(int(low), int(high))
    return optuna.distributions.FloatDistribution(low, high, log=kind == "logrange")


def _point(spec: SweepSpec, number: int, params: dict[str, Any]) -> Point:
    """The trial's point: each axis at the level (or value) Optuna chose."""
    short = short_names([a.name for a in spec.axes])
    values: dict[str, str] = {}
    overrides: list[str] = []
    for axis in spec.axes:
        chosen = params[axis.name]
        if axis.search is None:
            level = next(level for level in axis.levels if level.label == chosen)
        else:
            text = str(int(chosen)) if axis.search[0] == "intrange" else f"{chosen:.6g}"
            level = Level(text, (f"{axis.name}={text}",))
        values[short[axis.name]] = level.label
        overrides += level.overrides
    return Point(f"trial-{number:04d}", {a.name: values[short[a.name]] for a in spec.axes}, tuple(overrides))


def _objective(sweep: SweepDir, name: str, goal: str) -> float | None:
    from ssltrain.launch.sweep.results import collect, metric

    for row in collect(sweep):
        if row.name == name:
            return metric(row, goal)
    return None


def run_optuna(
    spec: SweepSpec, root: Path, trials: int, goal: str, minimize: bool, parallel: int = 1, dry_run: bool = False
) -> int:
    """Run the study until ``trials`` trials have ended; returns 1 when any trial failed, else 0."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("--optuna needs Optuna: pip install 'ssltrain[optuna]' (or pip install optuna)") from None

    if not spec.axes:
        raise ConfigError("nothing to search: give at least one key=a,b or key=logrange(lo,hi)")
    distributions = {axis.name: _distribution(axis) for axis in spec.axes}
    if dry_run:
        print(f"optuna study {root / JOURNAL}: {trials} trials, {'minimise' if minimize else 'maximise'} {goal}")
        for name, dist in distributions.items():
            print(f"  {name}: {dist}")
        return 0
    load_config(spec.config, spec.overrides)  # the base must load before anything is written
    sweep = SweepDir(root)
    sweep.create(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(root / JOURNAL)))
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        load_if_exists=True,
        direction="minimize" if minimize else "maximize",
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
    )
    failed = 0

    def run(numbers_and_points: list[tuple[int, Point]]) -> None:
        nonlocal failed
        for number, point in numbers_and_points:
            sweep.add_point(point, trial=number)
        run_local(sweep, [p.name for _, p in numbers_and_points], parallel)
        for number, point in numbers_and_points:
            state = sweep.state(point.name)
            value = _objective(sweep, point.name, goal) if state is not None and state.status == "done" else None
            if value is None:
                failed += 1
                study.tell(number, state=optuna.trial.TrialState.FAIL)
                log.error("trial %d (%s) failed; its log: %s", number, point.name, sweep.log_path(point.name))
            else:
                study.tell(number, value)
                log.info("trial %d: %s = %.4f (%s)", number, goal, value, point.values)

    # Trials a killed runner left running: their points resume from their checkpoints.
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for start in range(0, len(stale), max(1, parallel)):
        run([(t.number, _point(spec, t.number, t.params)) for t in stale[start : start + max(1, parallel)]])
    while True:
        ended = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        if ended >= trials:
            break
        batch = []
        for _ in range(min(max(1, parallel), trials - ended)):
            trial = study.ask(distributions)
            batch.append((trial.number, _point(spec, trial.number, trial.params)))
        run(batch)
    best = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if best:
        top = study.best_trial
        print(f"best trial {top.number}: {goal} = {top.value:.4f} with {top.params}")
    from ssltrain.launch.sweep.report import format_table, write_report

    path = write_report(sweep, goal)
    print(format_table(sweep, goal))
    print(f"report: {path}")
    return 1 if failed else 0
