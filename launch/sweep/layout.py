"""A sweep on disk: ``runs/<sweep>/sweep.yaml`` and one ordinary run directory a point.

::

    runs/<sweep>/sweep.yaml           the spec (base config, fixed overrides, axes, probe)
    runs/<sweep>/baselines/*.json     random-init probe results, one per architecture (ssltrain.eval.baseline)
    runs/<sweep>/<point>/             the point's run: config.yaml, checkpoints/, metrics.jsonl, eval.json
    runs/<sweep>/<point>/point.json   its levels, overrides and status (pending, running, done, failed), wall time
    runs/<sweep>/<point>/sweep.log    the point's output (training and eval logs, a failure's traceback)

Everything a point needs is in its ``point.json`` and the spec, so a point runs the same from the local runner, a
Slurm array task or an Optuna trial, and a re-run finds its state there.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ssltrain.config import Config, ConfigError, load_config
from ssltrain.core.files import write_atomic
from ssltrain.launch.sweep.space import Point, SweepSpec

__all__ = ["SweepDir", "PointState", "STATUSES"]

STATUSES = ("pending", "running", "done", "failed")
SPEC_FILE = "sweep.yaml"
POINT_FILE = "point.json"
LOG_FILE = "sweep.log"


@dataclass
class PointState:
    """A point's ``point.json``: what it runs and how far it got."""

    name: str
    values: dict[str, str]
    overrides: list[str]
    status: str = "pending"
    attempts: int = 0
    wall_s: float = 0.0  # summed over attempts
    error: str = ""
    trial: int | None = None  # the Optuna trial number, for points an Optuna study proposed

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class SweepDir:
    """The directory of one sweep: its spec and its points' states."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def spec_path(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    def exists(self) -> bool:
        return self.spec_path.is_file()

    def spec(self) -> SweepSpec:
        if not self.exists():
            raise FileNotFoundError(
                f"'{self.root}' is not a sweep directory (no {SPEC_FILE}); start one with ssltrain sweep"
            )
        return SweepSpec.from_dict(yaml.safe_load(self.spec_path.read_text()))

    def create(self, spec: SweepSpec) -> None:
        """Write the spec, or check that an existing sweep of this name is the same experiment (same base config
        and fixed overrides; axes may have gained values)."""
        if self.exists():
            old = self.spec()
            if (old.config, old.overrides) != (spec.config, spec.overrides):
                raise ConfigError(
                    f"sweep '{self.root}' was started with config {old.config} and overrides {old.overrides}, not "
                    f"{spec.config} and {spec.overrides}; give another --name, or delete the directory to start over"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.spec_path, yaml.safe_dump(spec.to_dict(), sort_keys=False).encode())

    def point_dir(self, name: str) -> Path:
        return self.root / name

    def log_path(self, name: str) -> Path:
        return self.point_dir(name) / LOG_FILE

    def add_point(self, point: Point, trial: int | None = None) -> PointState:
        """Record a point (pending) unless it is there already; a point of that name must have the same overrides."""
        state = self.state(point.name)
        if state is not None:
            if tuple(state.overrides) != point.overrides:
                raise ConfigError(
                    f"point '{self.point_dir(point.name)}' ran with {state.overrides}, not {list(point.overrides)}; "
                    "give the sweep another --name"
                )
            return state
        state = PointState(point.name, dict(point.values), list(point.overrides), trial=trial)
        self.write_state(state)
        return state

    def state(self, name: str) -> PointState | None:
        path = self.point_dir(name) / POINT_FILE
        if not path.is_file():
            return None
        return PointState(**json.loads(path.read_text()))

    def write_state(self, state: PointState) -> None:
        directory = self.point_dir(state.name)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / POINT_FILE, json.dumps(state.to_dict(), indent=2).encode())

    def states(self) -> list[PointState]:
        """Every recorded point, in name order."""
        found = (self.state(p.parent.name) for p in sorted(self.root.glob(f"*/{POINT_FILE}")))
        return [s for s in found if s is not None]

    def config(self, state: PointState) -> Config:
        """The point's training config: the spec's base config and overrides, the point's, and its run directory."""
        spec = self.spec()
        placement = [f"out_dir={self.root}", f"name={state.name}"]
        return load_config(spec.config, [*spec.overrides, *state.overrides, *placement])

    @contextmanager
    def claim(self, name: str) -> Iterator[bool]:
        """Hold the point's lock while running it: yields False when another process runs it. The lock goes with the
        process holding it, so a killed runner leaves the point free to resume."""
        directory = self.point_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
