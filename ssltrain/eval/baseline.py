"""The random-init baseline shared by many runs: a sweep probes it once per architecture, not once per point.

The probes of a random-init backbone depend only on its weights (drawn from the seed), the probe data, the eval
transform and the probe settings, so those are the key; points of a sweep that share them (other learning rates,
augmentations or methods on the same backbone) read the first one's results. A lock makes parallel points wait for
the one computing it instead of computing it again. Only the backbone's figures are kept (probes, ``feat_*``
monitors, the feature spectrum): the projector differs between methods.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ssltrain.core.files import write_atomic

__all__ = ["baseline_key", "load_baseline", "save_baseline", "baseline_lock"]


def baseline_key(fingerprint: str, data: dict[str, Any], transform: dict[str, Any], probes: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the backbone's weights, the probe data, the transform and the probe settings."""
    blob = json.dumps(
        {"model": fingerprint, "data": data, "transform": transform, "probes": probes, "version": 1},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _path(directory: Path, key: str) -> Path:
    return Path(directory) / f"random-{key}.json"


def load_baseline(directory: Path, key: str) -> dict[str, Any] | None:
    """``{"results", "monitors", "spectra"}`` of an earlier probe of this backbone, or None."""
    path = _path(directory, key)
    return json.loads(path.read_text()) if path.is_file() else None


def save_baseline(
    directory: Path, key: str, results: dict[str, Any], monitors: dict[str, float], spectra: dict[str, list[float]]
) -> None:
    payload = {
        "results": results,
        "monitors": {k: v for k, v in monitors.items() if k.startswith("feat_")},
        "spectra": {k: v for k, v in spectra.items() if k == "features"},
    }
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_atomic(_path(directory, key), json.dumps(payload).encode())


@contextmanager
def baseline_lock(directory: Path, key: str) -> Iterator[None]:
    """Held while one process looks up and, on a miss, computes the baseline of ``key``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(directory) / f".random-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
