"""Checkpoints: atomic, retained, auto-resumed, loaded with ``weights_only=True``.

A checkpoint is a directory ``checkpoints/step-<N>/`` holding ``state.pt``. It is written under a temporary name,
flushed to disk, then renamed: a directory with the final name is always complete, so a crash at any moment leaves
the last good checkpoint loadable. Everything in ``state.pt`` is tensors, numbers, strings and containers of them,
so it loads without unpickling arbitrary objects.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; resuming from scratch silently would lose the run."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints in one directory; keeps the ``keep`` most recent complete ones."""

    def __init__(self, directory: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".tmp-*"):  # left by a crash mid-write; never a real checkpoint
            shutil.rmtree(stale, ignore_errors=True)

    def complete(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        final = self.directory / f"step-{step}"
        tmp = self.directory / f".tmp-step-{step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run's final save): replace it atomically
            trash = self.directory / f".tmp-old-step-{step}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.directory)
        for _, old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint directory (or the file itself) safely; any failure is a CheckpointError."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure must surface with the path and the way out
        raise CheckpointError(
            f"cannot load checkpoint '{file}': {type(err).__name__}: {err}. Delete that directory to resume from the "
            "previous checkpoint, or start a fresh run (another name, or checkpoint.resume=false)."
        ) from err
