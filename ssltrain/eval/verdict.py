"""Did pretraining help? The probes of a checkpoint against the same probes on the random-init backbone.

The random-init backbone is the network the run started from, so an SSL probe below it means the run made the
features worse: the one result a report must never pass over. Torch-free: the report reads ``eval.json`` with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["below_random"]


def _top1(res: Mapping[str, Any], probe: str) -> float | None:
    value = res.get(f"{probe}_top1")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def below_random(results: Mapping[str, Any], step: Any = None) -> list[str]:
    """One sentence per probe (kNN at its main k, linear) whose SSL top-1 is below the random-init backbone's.

    ``results`` is ``eval.json`` (or what ``evaluate_target`` returns): ``{"ssl": {...}, "random": {...}}``. Empty
    when there is no random-init column or every probe beats it.
    """
    ssl, rnd = results.get("ssl"), results.get("random")
    if not isinstance(ssl, Mapping) or not isinstance(rnd, Mapping):
        return []
    at = f" at step {step}" if step is not None else ""
    out = []
    for probe in ("knn", "linear"):
        mine, base = _top1(ssl, probe), _top1(rnd, probe)
        if mine is None or base is None or mine >= base:
            continue
        name = f"kNN (k={ssl.get('knn_k', '?')})" if probe == "knn" else "linear probe"
        out.append(
            f"{name} top-1{at} is {mine:.3f}, below the random-init backbone's {base:.3f} "
            f"({mine - base:+.3f}): pretraining made these features worse than the network it started from"
        )
    return out
