"""Checkpoints: atomic directories, retention, safe loading, RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ssltrain.checkpoint import CheckpointError, Checkpointer, load_checkpoint, rng_state, set_rng_state


def test_retention_keeps_the_last_k(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ck.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert [s for s, _ in ck.complete()] == [3, 4]
    assert load_checkpoint(ck.latest())["step"] == 4


def test_incomplete_and_stale_directories_never_count(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(5, {"step": 5})
    (tmp_path / "step-9").mkdir()  # no state.pt: not complete
    (tmp_path / ".tmp-step-7-123").mkdir()  # a crash mid-write
    (tmp_path / ".tmp-step-7-123" / "state.pt").write_bytes(b"partial")
    assert ck.latest().name == "step-5"
    Checkpointer(tmp_path)  # a new run cleans up what the crash left
    assert not (tmp_path / ".tmp-step-7-123").exists()


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    ck.save(3, {"v": torch.tensor(1)})
    ck.save(3, {"v": torch.tensor(2)})
    assert load_checkpoint(tmp_path / "step-3")["v"].item() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


class Payload:
    def __reduce__(self):  # would run code when unpickled
        return (os.system, ("echo pwned",))


def test_loading_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "step-1"
    path.mkdir()
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="step-1/state.pt"):
        load_checkpoint(path)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    path = ck.save(1, {"w": torch.randn(100, 100)})
    data = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="Delete that directory"):
        load_checkpoint(path)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    ck.save(1, {"rng": rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(load_checkpoint(ck.latest())["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
