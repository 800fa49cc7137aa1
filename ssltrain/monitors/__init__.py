"""Monitors: callbacks of the training loop that read each step's outputs (see :mod:`ssltrain.monitors.base`).

A new monitor is one file here and one line in :data:`MONITORS`: a name (the key its state is saved under in a
checkpoint, equal to the monitor's ``name``) and a builder that takes the :class:`MonitorContext` and returns the
monitor, or None when its setting is off.
"""

from __future__ import annotations

from collections.abc import Callable

from ssltrain.monitors.base import Monitor, MonitorContext, StepOutputs
from ssltrain.monitors.collapse import Collapse
from ssltrain.monitors.online_knn import OnlineKNN
from ssltrain.monitors.online_linear import OnlineLinear

__all__ = ["MONITORS", "Monitor", "MonitorContext", "StepOutputs", "build_monitors"]

MONITORS: dict[str, Callable[[MonitorContext], Monitor | None]] = {
    "collapse": Collapse.build,
    "online_knn": OnlineKNN.build,
    "online_linear": OnlineLinear.build,
}


def build_monitors(ctx: MonitorContext) -> list[Monitor]:
    """The monitors the run's config turns on, in :data:`MONITORS` order; looked up at call time (tests may patch
    the dict). Raises what a builder raises (missing or unlabeled eval data), before the first step."""
    monitors = []
    for name, build in MONITORS.items():
        monitor = build(ctx)
        if monitor is None:
            continue
        if monitor.name != name:
            raise ValueError(
                f"monitor registered as '{name}' is named '{monitor.name}'; its checkpoint state is "
                "saved under its name, so the two must agree"
            )
        monitors.append(monitor)
    return monitors
