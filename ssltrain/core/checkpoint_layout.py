"""The on-disk checkpoint layout: find the complete checkpoints of a run and read their metadata, without torch
(the Slurm launcher uses it on login nodes). Training writes checkpoints (:mod:`ssltrain.engine.checkpoint`);
:mod:`ssltrain.core.checkpoints` loads them safely.

A checkpoint is a directory ``checkpoints/step-<N>/`` holding the DCP files, ``rng-rank<r>.pt``, ``meta.json`` and
the ``COMPLETE`` marker, written last: only directories with the marker count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"
META_FILE = "meta.json"
FORMAT = 2
# DCP says so on every single-process save and load; a single process is a supported, intended use here.
SINGLE_PROCESS_DCP_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; resuming from scratch silently would lose the run."""


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``directory``, by step."""
    directory = Path(directory)
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / MARKER).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(path: Path) -> Path | None:
    """The latest complete checkpoint of a run directory (or of its ``checkpoints/`` directory itself)."""
    path = Path(path)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    done = complete_checkpoints(directory)
    return done[-1][1] if done else None


def check_complete(path: Path) -> Path:
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"'{path}' is not a complete checkpoint (no {MARKER} marker): it was being written when "
            "the run stopped. Use an earlier step directory, or the run directory to take the latest."
        )
    return path


def read_meta(path: Path) -> dict[str, Any]:
    path = check_complete(path)
    try:
        return json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read '{path / META_FILE}': {err}. Delete '{path}' to resume from the previous checkpoint."
        ) from err
