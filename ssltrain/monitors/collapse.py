"""The collapse monitor: embedding std, RankMe and LogDet entropy of the batch the loss saw (``emb_*``), measured at
log steps, and a warning in the training log each time one of them falls under its threshold.

Warnings fire once per crossing: a monitor that falls under its threshold warns, stays quiet while it stays there,
and may warn again after recovering. The thresholds are ``eval.collapse_rankme`` and ``eval.collapse_std`` (the
report warns against the same ones); RankMe's is capped at half of ``min(N, D)`` of the monitored batch, which
bounds RankMe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ssltrain.eval.representation import collapse_warnings, embedding_monitors
from ssltrain.monitors.base import Monitor, MonitorContext, StepOutputs

__all__ = ["Collapse", "CollapseWatch"]


class CollapseWatch:
    """Collapse warnings for a stream of records, once per crossing of each threshold."""

    KEYS = ("rankme", "std_normalized")

    def __init__(self, rankme_min: float, std_min: float, prefix: str = "emb") -> None:
        self.rankme_min, self.std_min, self.prefix = rankme_min, std_min, prefix
        self.below: dict[str, bool] = {}

    def update(self, monitors: Mapping[str, Any], max_rank: int | None = None) -> list[str]:
        """New warnings for this record of monitor values (``max_rank``: min(N, D) of the monitored batch)."""
        out = []
        for key in self.KEYS:
            name = f"{self.prefix}_{key}"
            if not _finite(monitors.get(name)):
                continue  # no reading (missing, nan): neither a crossing nor a recovery
            warned = collapse_warnings({name: monitors[name]}, self.prefix, self.rankme_min, self.std_min, max_rank)
            if warned and not self.below.get(name, False):
                out += warned
            self.below[name] = bool(warned)
        return out


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class Collapse(Monitor):
    """``emb_std``, ``emb_std_min``, ``emb_std_normalized``, ``emb_rankme``, ``emb_logdet_entropy`` of rank 0's
    embedding batch at log steps (one SVD and one Cholesky: too costly for every step), and their warnings."""

    name = "collapse"

    def __init__(self, rankme_min: float, std_min: float, is_main: bool = True) -> None:
        self.watch = CollapseWatch(rankme_min, std_min)
        self.is_main = is_main
        self.max_rank: int | None = None  # min(N, D) of the last monitored batch

    @classmethod
    def build(cls, ctx: MonitorContext) -> Collapse:
        return cls(ctx.cfg.eval.collapse_rankme, ctx.cfg.eval.collapse_std, ctx.is_main)

    def on_step(self, out: StepOutputs) -> dict[str, float]:
        z = out.embeddings
        if not (out.log_due and self.is_main) or z is None or z.dim() != 2 or z.shape[0] < 2:
            return {}
        self.max_rank = min(z.shape)
        return embedding_monitors(z.float(), prefix="emb")

    def warnings(self, record: Mapping[str, Any]) -> list[str]:
        return self.watch.update(record, self.max_rank)
