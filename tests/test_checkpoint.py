"""Checkpoints: DCP directories committed by a marker, retention, async save, safe loading, RNG round trip."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ssltrain.engine.checkpoint import Checkpointer, load_training_state, rng_state, set_rng_state
from ssltrain.core.checkpoint_layout import CheckpointError, read_meta
from ssltrain.core.checkpoints import load_checkpoint


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def test_retention_keeps_the_last_k_and_every_mth(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    ck = Checkpointer(tmp_path, keep=2, keep_every=3)
    for step in range(1, 8):
        ck.save(step, model, optimizer, {"step": step})
    assert [s for s, _ in ck.complete()] == [3, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-6", "step-7"]
    assert read_meta(ck.latest())["step"] == 7


def test_a_directory_without_the_marker_never_counts_and_is_removed(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(5, model, optimizer, {"step": 5})
    ck.save(9, model, optimizer, {"step": 9})
    (tmp_path / "step-9" / "COMPLETE").unlink()  # as if killed after the data, before the commit
    assert ck.latest().name == "step-5"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-9")
    Checkpointer(tmp_path)  # a new run cleans up what the crash left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(seed=0)
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    other, other_opt = _model_and_optimizer(seed=1)
    assert not torch.equal(other[0].weight, model[0].weight)
    assert load_training_state(path, other, other_opt)["step"] == 1
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    full = load_checkpoint(tmp_path, parts=("model", "optim"))  # the run-directory form finds the latest
    assert torch.equal(full["model"]["2.bias"], model[2].bias.detach())
    assert set(full["optim"]["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_async_save_commits_when_the_write_finishes(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    ck = Checkpointer(tmp_path, async_save=True)
    at_save = model[0].weight.detach().clone()
    path = ck.save(2, model, optimizer, {"step": 2})
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training goes on while the copy is written
    ck.wait()
    assert (path / "COMPLETE").is_file() and ck.latest() == path
    restored, restored_opt = _model_and_optimizer(seed=3)
    load_training_state(path, restored, restored_opt)
    assert torch.equal(restored[0].weight, at_save)  # the weights as they were at save time


class Payload:
    def __reduce__(self):  # would run code when unpickled
        return (os.system, (f"touch {Path(os.environ.get('TMPDIR', '/tmp')) / 'ssltrain-pwned'}",))


def test_loading_refuses_code_in_the_metadata(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    (path / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    marker = Path(os.environ.get("TMPDIR", "/tmp")) / "ssltrain-pwned"
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="os.system|posix.system"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_training_state(path, model, optimizer)
    assert not marker.exists()


def test_loading_refuses_pickled_objects_among_the_tensors(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "step-1"
    dcp.save({"model": {"w": torch.zeros(2)}, "extra": {"obj": [1, 2, 3]}}, checkpoint_id=str(path))
    (path / "meta.json").write_text('{"step": 1}')
    (path / "COMPLETE").write_text("")
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_checkpoint(path)


def test_truncated_data_is_a_clear_error(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    (data,) = path.glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="Delete that directory"):
        load_training_state(path, model, optimizer)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    set_rng_state(torch.load(path / "rng-rank0.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    torch.manual_seed(99)
    load_training_state(path, model, optimizer)  # restores this rank's RNG too
    assert torch.equal(torch.rand(3), expected[0])
    assert rng_state()["torch"].dtype == torch.uint8
