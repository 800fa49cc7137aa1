"""A sweep's results, one row a point, read from what its run directories hold: the sweep report's table and plots
and Optuna's objective read them here, so the figures they show and optimise are the same.

Per point: its levels and ``point.json`` state (status, attempts, wall time, error), the probes of its ``eval.json``
(the SSL backbone and the random-init one of the same eval), the last training loss of ``metrics.jsonl`` with the
figures over steps (online probes and offline evals) for the curves plot, and the collapse warnings of its eval.

Figures by name (:data:`METRICS`, for ``--probe``, ``--maximize`` and sorting):

- ``knn_top1``: kNN top-1 (k = ``eval.knn_k``) of the SSL backbone; ``linear_top1``: the linear probe's top-1;
- ``knn_gain`` / ``linear_gain``: the same minus the random-init backbone's (what pretraining bought);
- ``loss``: the last training loss logged (lower is better; comparable only between points of one loss).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssltrain.config import ConfigError
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.launch.sweep.layout import PointState, SweepDir

log = logging.getLogger("ssltrain")

__all__ = ["METRICS", "Curve", "PointRow", "collect", "metric", "higher_is_better", "check_metric", "rank"]

# name -> (what it is, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "knn_top1": ("kNN top-1 of the SSL backbone (k = eval.knn_k)", True),
    "linear_top1": ("linear-probe top-1 of the SSL backbone", True),
    "knn_gain": ("kNN top-1, SSL minus random init", True),
    "linear_gain": ("linear-probe top-1, SSL minus random init", True),
    "loss": ("last training loss logged", False),
}

# The online figure of metrics.jsonl (training records) that tracks each offline probe over steps.
ONLINE_KEYS = {"knn": "online_knn_top1", "linear": "online_linear_top1"}


@dataclass
class Curve:
    """A figure over steps: ``online`` from the training records, ``offline`` the evals (``ssltrain eval``) of the
    SSL backbone, ``random`` the random-init figure of the last eval (None when there is none)."""

    online: list[tuple[float, float]] = field(default_factory=list)
    offline: list[tuple[float, float]] = field(default_factory=list)
    random: float | None = None

    def __bool__(self) -> bool:
        return bool(self.online or self.offline)


@dataclass
class PointRow:
    """One point of the sweep as the report shows it; a figure the point does not have (yet) is None."""

    name: str
    values: dict[str, str]  # axis -> level label
    status: str
    attempts: int
    wall_s: float
    error: str
    run_dir: Path
    trial: int | None = None
    architecture: str = "?"  # backbone and crop size: what the random-init baseline depends on
    eval_step: int | None = None
    ssl: dict[str, float] = field(default_factory=dict)  # knn_top1, linear_top1 (and _top5) of eval.json
    random: dict[str, float] = field(default_factory=dict)  # the same of the random-init backbone
    loss: float | None = None
    loss_step: int | None = None
    warnings: list[str] = field(default_factory=list)  # eval.json's collapse warnings
    curves: dict[str, Curve] = field(default_factory=dict)  # "knn", "linear", "loss"

    @property
    def done(self) -> bool:
        return self.status == "done"


def check_metric(name: str) -> str:
    """``name`` when it is one of :data:`METRICS`, else a ConfigError listing them."""
    if name not in METRICS:
        raise ConfigError(f"unknown sweep probe '{name}': use one of {', '.join(METRICS)}")
    return name


def higher_is_better(name: str) -> bool:
    return METRICS[check_metric(name)][1]


def metric(row: PointRow, name: str) -> float | None:
    """The figure ``name`` (see :data:`METRICS`) of the point, None when it has none (not evaluated, failed)."""
    check_metric(name)
    if name == "loss":
        return row.loss
    if name.endswith("_gain"):
        probe = name.removesuffix("_gain") + "_top1"
        ssl, random = row.ssl.get(probe), row.random.get(probe)
        return None if ssl is None or random is None else ssl - random
    return row.ssl.get(name)


def rank(rows: list[PointRow], name: str) -> list[PointRow]:
    """Best first by ``name``: finished points with the figure, then finished ones without it, then the others
    (failed, running, pending) by status; ties keep name order."""
    sign = -1.0 if higher_is_better(name) else 1.0

    def key(row: PointRow) -> tuple[int, float, str]:
        value = metric(row, name)
        if row.done and value is not None:
            return (0, sign * value, row.name)
        order = {"done": 1, "failed": 2, "running": 3, "pending": 4}
        return (order.get(row.status, 5), 0.0, row.name)

    return sorted(rows, key=key)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as err:
        log.warning("sweep report: cannot read %s (%s); the point is shown without it", path, err)
        return None
    return data if isinstance(data, dict) else None


def _figures(results: Any) -> dict[str, float]:
    if not isinstance(results, dict):
        return {}
    keys = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
    return {k: v for k in keys if (v := _number(results.get(k))) is not None}


def _architecture(sweep: SweepDir, state: PointState) -> str:
    """``resnet18 @ 16 px`` from the point's config.yaml (the resolved config the trainer wrote), else from the
    spec (a point that never started)."""
    path = sweep.point_dir(state.name) / "config.yaml"
    try:
        if path.is_file():
            cfg = yaml.safe_load(path.read_text()) or {}
            backbone, size = cfg["model"]["backbone"], cfg["augment"]["global_crops"]["size"]
        else:
            resolved = sweep.config(state)
            backbone, size = resolved.model.backbone, resolved.augment.global_crops.size
    except Exception:  # noqa: BLE001 - an unreadable config leaves the architecture unknown, not the report unwritten
        return "?"
    return f"{backbone} @ {size} px"


def _curves(records: list[dict[str, Any]], knn_k: int | None) -> dict[str, Curve]:
    """kNN, linear and loss over steps; an eval repeated at a step keeps its last figure."""
    curves = {"knn": Curve(), "linear": Curve(), "loss": Curve()}
    train = sorted((r for r in records if "eval" not in r and "step" in r), key=lambda r: r["step"])
    for r in train:
        step = float(r["step"])
        for probe, key in ONLINE_KEYS.items():
            if (v := _number(r.get(key))) is not None:
                curves[probe].online.append((step, v))
        if (v := _number(r.get("loss"))) is not None:
            curves["loss"].online.append((step, v))
    offline: dict[str, dict[str, dict[float, float]]] = {"knn": {}, "linear": {}}
    for r in records:
        kind, at, top1 = r.get("eval"), _number(r.get("step")), _number(r.get("top1"))
        if kind not in offline or at is None or top1 is None:
            continue
        if kind == "knn" and knn_k is not None and r.get("k") != knn_k:
            continue
        offline[kind].setdefault(str(r.get("backbone", "ssl")), {})[at] = top1
    for kind, by_backbone in offline.items():
        curves[kind].offline = sorted(by_backbone.get("ssl", {}).items())
        random = by_backbone.get("random", {})
        curves[kind].random = random[max(random)] if random else None
    return curves


def _row(sweep: SweepDir, state: PointState) -> PointRow:
    run_dir = sweep.point_dir(state.name)
    row = PointRow(
        name=state.name,
        values=dict(state.values),
        status=state.status,
        attempts=state.attempts,
        wall_s=state.wall_s,
        error=state.error,
        run_dir=run_dir,
        trial=state.trial,
        architecture=_architecture(sweep, state),
    )
    ev = _read_json(run_dir / "eval.json")
    knn_k = None
    if ev is not None:
        row.eval_step = int(ev["step"]) if _number(ev.get("step")) is not None else None
        row.ssl, row.random = _figures(ev.get("ssl")), _figures(ev.get("random"))
        row.warnings = [str(w) for w in ev.get("warnings", [])]
        k = ev.get("ssl", {}).get("knn_k") if isinstance(ev.get("ssl"), dict) else None
        knn_k = int(k) if isinstance(k, int) else None
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, json.JSONDecodeError) as err:  # a line cut short by a kill: the rest of the point still shows
        log.warning("sweep report: cannot read %s (%s)", run_dir / "metrics.jsonl", err)
        records = []
    row.curves = _curves(records, knn_k)
    if row.curves["loss"].online:
        step, row.loss = row.curves["loss"].online[-1]
        row.loss_step = int(step)
    return row


def collect(sweep: SweepDir) -> list[PointRow]:
    """One row for each point recorded in the sweep directory, in name order."""
    return [_row(sweep, state) for state in sweep.states()]
