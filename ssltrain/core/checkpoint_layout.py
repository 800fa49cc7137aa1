"""The on-disk checkpoint layout: find the complete checkpoints of a run and read their metadata, without torch
(the Slurm launcher uses it on login nodes). Training writes checkpoints (:mod:`ssltrain.engine.checkpoint`);
:mod:`ssltrain.core.checkpoints` loads them safely.

A checkpoint is a directory ``checkpoints/step-<N>/`` holding the DCP files, ``rng-rank<r>.pt``, ``meta.json`` and
the ``COMPLETE`` marker, written last: only directories with the marker count. ``meta.json`` records the size and
sha256 of every other file (``files``), so that a file damaged after the commit (a flipped bit, a truncated copy)
is refused at load instead of turning the run's weights into NaN. Checkpoints written before the checksums existed
have no ``files`` and load unverified.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"
META_FILE = "meta.json"
FORMAT = 2
# DCP says so on every single-process save and load; a single process is a supported, intended use here.
SINGLE_PROCESS_DCP_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


FILES = "files"  # meta.json's record of the checkpoint's files: name -> {"bytes": size, "sha256": hex digest}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; resuming from scratch silently would lose the run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint, the final one included, could not be written: the run must not end as if it had succeeded."""


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


def checkpoint_files(path: Path) -> list[str]:
    """The names of a checkpoint directory's data files: everything but ``meta.json``, the marker and temporaries."""
    skip = (META_FILE, MARKER)
    return sorted(f.name for f in Path(path).iterdir() if f.is_file() and f.name not in skip and ".tmp" not in f.name)


def file_checksums(path: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` in directory ``path``."""
    out = {}
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    for name in names:
        digest, size = hashlib.sha256(), 0
        with open(Path(path) / name, "rb") as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])  # hashlib releases the GIL here: a background hash leaves training alone
                size += n
        out[name] = {"bytes": size, "sha256": digest.hexdigest()}
    return out


def checksum_problem(path: Path, recorded: dict[str, dict[str, Any]], names: Iterable[str]) -> str | None:
    """What is wrong with the files ``names`` of checkpoint ``path`` against their ``recorded`` size and sha256
    (missing, another size, another content), or None when they match."""
    for name in names:
        file, want = Path(path) / name, recorded[name]
        try:
            size = file.stat().st_size
            if size != want["bytes"]:
                return f"'{file}' has {size} bytes where {want['bytes']} were written"
            got = file_checksums(path, [name])[name]["sha256"]
        except OSError as err:
            return f"cannot read '{file}': {err}"
        if got != want["sha256"]:
            return f"'{file}' does not match the sha256 recorded when it was written"
    return None
