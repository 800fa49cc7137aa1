"""Checkpoints: DCP directories committed by a marker, retention, async save, checksums, safe loading, RNG round
trip."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssltrain.core.checkpoint_layout import CheckpointError, file_checksums, read_meta
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.engine.checkpoint import Checkpointer, load_training_state, rng_state, set_rng_state


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


def _rerecord_checksums(path: Path) -> None:
    """Record the files' current checksums in meta.json, as someone who crafted the checkpoint would: checksums
    catch damage, not an attacker, so the loader's own defences must hold on their own."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = file_checksums(path, meta["files"])
    (path / "meta.json").write_text(json.dumps(meta))


def test_loading_refuses_code_in_the_metadata(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    (path / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    _rerecord_checksums(path)
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


def _flip(file: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``file``, in place (the size stays: only a checksum can tell)."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_every_file_is_checksummed_at_save(tmp_path: Path, async_save: bool) -> None:
    model, optimizer = _model_and_optimizer()
    ck = Checkpointer(tmp_path, async_save=async_save)
    path = ck.save(3, model, optimizer, {"step": 3}, extra={"monitors.pt": {"knn": torch.zeros(2)}})
    ck.wait()
    recorded = read_meta(path)["files"]
    files = sorted(f.name for f in path.iterdir() if f.name not in ("meta.json", "COMPLETE"))
    assert sorted(recorded) == files and any(n.endswith(".distcp") for n in files) and ".metadata" in files
    assert {"rng-rank0.pt", "monitors.pt"} <= set(files)
    for name, entry in recorded.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damaged", ["__0_0.distcp", ".metadata", "rng-rank0.pt"])
def test_a_damaged_file_is_refused_at_load_naming_it(tmp_path: Path, damaged: str) -> None:
    """64 flipped bytes load without complaint in DCP (NaN weights or optimizer state, found steps later); the
    checksums recorded at save refuse them, for training's resume and for eval/export's loader alike."""
    model, optimizer = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    _flip(path / damaged)
    other, other_opt = _model_and_optimizer(seed=1)
    untouched = other[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match=f"{damaged}' does not match the sha256.*checkpoint.fallback=true"):
        load_training_state(path, other, other_opt)
    assert torch.equal(other[0].weight, untouched)  # refused before anything was loaded
    with pytest.raises(CheckpointError, match=f"{damaged}' does not match the sha256.*an earlier step-<N>"):
        load_checkpoint(path)


def test_a_missing_file_is_refused_at_load(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    (path / "rng-rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="rng-rank0.pt"):
        load_training_state(path, model, optimizer)


def test_a_checkpoint_without_checksums_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints written before the checksums existed load, unverified, and say so."""
    model, optimizer = _model_and_optimizer()
    path = Checkpointer(tmp_path).save(1, model, optimizer, {"step": 1})
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="ssltrain"):
        assert load_training_state(path, model, optimizer)["step"] == 1
    assert "has no checksums" in caplog.text


def _checksum_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, optimizer = _model_and_optimizer()
        results = {}
        for async_save in (False, True):
            ck = Checkpointer(Path(out) / f"async-{async_save}", async_save=async_save)
            path = ck.save(2, model, optimizer, {"step": 2})
            ck.wait()
            results[str(async_save)] = sorted(read_meta(path)["files"])
        dist.barrier()
        if rank == 0:
            _flip(path / "__1_0.distcp")  # rank 1's data file
        dist.barrier()
        try:
            load_training_state(path, model, optimizer)
            results["error"] = ""
        except CheckpointError as err:
            results["error"] = str(err)
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_checksums_with_two_ranks(tmp_path: Path) -> None:
    """Each rank hashes what it wrote, rank 0 records them all, sync and async; at load each rank checks its share
    and every rank raises the same error, naming the damaged file."""
    mp.spawn(_checksum_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for async_save in ("False", "True"):
        path = tmp_path / f"async-{async_save}/step-2"
        files = sorted(f.name for f in path.iterdir() if f.name not in ("meta.json", "COMPLETE"))
        assert results[0][async_save] == results[1][async_save] == files
        assert {"__0_0.distcp", "__1_0.distcp", "rng-rank0.pt", "rng-rank1.pt", ".metadata"} <= set(files)
    assert results[0]["error"] == results[1]["error"] and "__1_0.distcp' does not match" in results[0]["error"]


def test_fallback_without_resume_is_a_config_error() -> None:
    from ssltrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="checkpoint.fallback=true chooses .* checkpoint.resume=false"):
        load_config(None, ["data.train=x", "checkpoint.fallback=true", "checkpoint.resume=false"])
    assert load_config(None, ["data.train=x", "checkpoint.fallback=true"]).checkpoint.fallback
    assert not load_config(None, ["data.train=x"]).checkpoint.fallback  # off unless asked
