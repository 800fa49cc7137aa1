"""Online figures during training: the kNN monitor (equal to the offline kNN of the checkpoint, trajectory-neutral,
rank-count independent), collapse warnings in the training log, and the Weights & Biases mirror."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_params, final_params, make_shards, tiny_config

from ssltrain.config import ConfigError, to_yaml
from ssltrain.data.shards import DataError
from ssltrain.data.stream import ShardCatalog
from ssltrain.engine.loop import train
from ssltrain.eval.evaluate import build_models, resolve_target
from ssltrain.eval.features import eval_transform, extract_features
from ssltrain.eval.knn import knn_accuracy, num_classes_of
from ssltrain.eval.metrics_log import WandbSettings, read_metrics, start_wandb
from ssltrain.eval.plots import plot_probes
from ssltrain.monitors import MonitorContext
from ssltrain.monitors.collapse import Collapse, CollapseWatch

# One thread: on a busy 2-core machine two threads per run oversubscribe the cores (a 1 s run takes 20 s).
ONE = {"threads": 1}
KNN = {**ONE, "eval.online_knn_every": 2, "eval.knn_k": 5, "eval.online_knn_samples": "[30,11]", "eval.batch_size": 16}


@pytest.fixture
def labeled(tmp_path: Path) -> dict[str, str]:
    """Training shards (also the kNN bank) and held-out val shards, labels i % 5."""
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    make_shards(train_dir, [20, 20, 13])
    make_shards(val_dir, [10, 9], prefix="val")
    return {"data.train": str(train_dir), "eval.train": str(train_dir), "eval.val": str(val_dir)}


def offline_knn(run: Path, step: int) -> dict[str, float]:
    """kNN of the checkpoint at ``step``, extracted anew on the same subsets, as ``ssltrain eval`` would."""
    target = resolve_target(run, checkpoint=run / f"checkpoints/step-{step}")
    cfg = target.cfg
    model, _ = build_models(target, random_baseline=False)
    kw = dict(batch_size=cfg.eval.batch_size, workers=0, device=torch.device("cpu"))
    limits = cfg.eval.online_knn_samples
    bank = extract_features(model, ShardCatalog.from_spec(cfg.eval.train), eval_transform(cfg), limit=limits[0], **kw)
    queries = extract_features(model, ShardCatalog.from_spec(cfg.eval.val), eval_transform(cfg), limit=limits[1], **kw)
    return knn_accuracy(
        bank.x,
        bank.y,
        queries.x,
        queries.y,
        num_classes_of(bank.y, queries.y),
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
    )


def test_online_knn_equals_offline_knn_of_the_checkpoint(tmp_path: Path, labeled: dict[str, str]) -> None:
    cfg = tiny_config(tmp_path, labeled["data.train"], **{**labeled, **KNN, "steps": 3, "log_every": 3})
    run = train(cfg)
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(records) == [2, 3]  # step 2 (every 2) forces a record between log steps; 3 is the last
    for step in (2, 3):
        offline = offline_knn(run, step)
        assert records[step]["online_knn_top1"] == pytest.approx(offline["top1"], abs=1e-6)
        assert records[step]["online_knn_top5"] == pytest.approx(offline["top5"], abs=1e-6)
    assert plot_probes(list(records.values()), tmp_path / "plots").path is not None  # the report draws online_*


@pytest.mark.parametrize(
    "backbone",
    [
        {"model.backbone": "resnet18"},  # BatchNorm: the extraction must not move the running statistics
        {"model.backbone": "vit_tiny", "model.patch_size": 8, "model.drop_path": 0.2},  # drop path draws from the RNG
    ],
)
def test_online_knn_leaves_the_training_trajectory_unchanged(
    tmp_path: Path, labeled: dict[str, str], backbone: dict[str, Any]
) -> None:
    base = {**labeled, **KNN, **backbone, "steps": 2, "eval.online_knn_every": 1}
    with_monitor = train(tiny_config(tmp_path / "on", labeled["data.train"], **base))
    without = train(tiny_config(tmp_path / "off", labeled["data.train"], **{**base, "eval.online_knn_every": 0}))
    assert "online_knn_top1" in read_metrics(with_monitor / "metrics.jsonl")[-1]
    assert_same_params(final_params(with_monitor), final_params(without))  # parameters and buffers, bit for bit


def test_online_knn_needs_labeled_eval_shards_and_says_which_key(tmp_path: Path, labeled: dict[str, str]) -> None:
    with pytest.raises(DataError, match=r"'eval\.val'.*eval\.online_knn_every=0"):
        train(tiny_config(tmp_path, labeled["data.train"], **{**labeled, **KNN, "eval.val": "''"}))
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    make_shards(unlabeled, [12], labeled=False)
    with pytest.raises(DataError, match=r"'eval\.train'.*without a \.cls label"):
        train(tiny_config(tmp_path, labeled["data.train"], **{**labeled, **KNN, "eval.train": str(unlabeled)}))
    with pytest.raises(ConfigError, match=r"eval\.knn_k=20 exceeds the online kNN bank of 10"):
        train(
            tiny_config(
                tmp_path,
                labeled["data.train"],
                **{**labeled, **KNN, "eval.knn_k": 20, "eval.online_knn_samples": "[10,10]"},
            )
        )
    assert not (tmp_path / "runs").exists()  # failed before the run directory was made


def test_collapse_warnings_fire_once_per_crossing(
    tmp_path: Path, labeled: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    watch = CollapseWatch(rankme_min=10.0, std_min=0.1)
    seq = [3.0, 2.0, "nan", 2.5, 30.0, 4.0]
    assert [len(watch.update({"emb_rankme": v})) for v in seq] == [1, 0, 0, 0, 0, 1]  # nan: no reading
    watch = CollapseWatch(rankme_min=10.0, std_min=0.1)
    assert watch.update({"emb_rankme": 3.0}, max_rank=4) == []  # a batch of 4 cannot have RankMe above 4
    # In the loop: a threshold no batch can meet, so the monitor is "collapsed" at every one of 4 log steps.
    cfg = tiny_config(tmp_path, labeled["data.train"], steps=4, **{**ONE, "eval.collapse_std": 1e9})
    with caplog.at_level("WARNING", logger="ssltrain"):
        train(cfg)
    assert caplog.text.count("emb_std_normalized = ") == 1 and "step 1: emb_std_normalized" in caplog.text
    assert "emb_rankme = " not in caplog.text
    defaults = tiny_config(tmp_path, labeled["data.train"])
    monitor = Collapse.build(
        MonitorContext(defaults, torch.device("cpu"), torch.nn.Module(), torch.nn.Module(), True, 0)
    )
    # report and log agree: both warn against the config's thresholds, which have one home (config.py)
    assert (monitor.watch.rankme_min, monitor.watch.std_min) == (
        defaults.eval.collapse_rankme,
        defaults.eval.collapse_std,
    )


# ---------------------------------------------------------------- Weights & Biases


def wandb_records(path: Path) -> Iterator[Any]:
    """Records of a W&B transaction log (``run-<id>.wandb``): a LevelDB-style log of protobuf ``Record``s, in
    32 KiB blocks after a 7-byte file header; read with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B transaction log"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_history(run_file: Path) -> tuple[Any, list[dict[str, Any]]]:
    run, history = None, []
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run, history


@pytest.fixture
def fresh_wandb() -> Iterator[Any]:
    """wandb, with its process-wide state (settings read from the environment at the first init) reset before and
    after, so each test's WANDB_* variables apply and none leak into other tests."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield wandb
    wandb.teardown()


def test_wandb_mirrors_every_record_offline_and_a_resume_continues_the_run(
    tmp_path: Path, labeled: dict[str, str], monkeypatch: pytest.MonkeyPatch, fresh_wandb: Any
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(
        tmp_path,
        labeled["data.train"],
        steps=3,
        **{**labeled, **KNN, "log.wandb": True, "log.wandb_project": "ssltrain-test"},
    )
    run = train(cfg)
    (first,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    wb_run, history = wandb_history(first)
    assert wb_run.display_name == "tiny" and wb_run.project == "ssltrain-test"
    run_id = (run / "wandb_id").read_text().strip()
    assert wb_run.run_id == run_id
    jsonl = read_metrics(run / "metrics.jsonl")
    assert [h["step"] for h in history] == [r["step"] for r in jsonl] == [1, 2, 3]
    for h, r in zip(history, jsonl):
        assert h["loss"] == pytest.approx(r["loss"]) and h["lr"] == pytest.approx(r["lr"])
    assert history[1]["online_knn_top1"] == pytest.approx(jsonl[1]["online_knn_top1"])

    cfg.steps = 4
    train(cfg)  # resumes from step 3: the same W&B run id, history from step 4 on
    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in runs)
    resumed = next(p for p in runs if p != first)
    assert [h["step"] for h in wandb_history(resumed)[1]] == [4]


def test_wandb_without_credentials_records_offline_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_wandb: Any
) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no credentials
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level("WARNING", logger="ssltrain"):
        run = start_wandb(WandbSettings("ssltrain-test", "nokey", {"steps": 1}), tmp_path, fresh=True)
    try:
        assert run.settings.mode == "offline" and "logging offline" in caplog.text
        run.log({"step": 1, "loss": 0.5})
    finally:
        run.finish()
    (log_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_history(log_file)[1][0]["loss"] == 0.5


def test_wandb_asked_for_but_not_installed_is_an_error_at_start(
    tmp_path: Path, labeled: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    with pytest.raises(ConfigError, match=r"pip install wandb"):
        train(tiny_config(tmp_path, labeled["data.train"], **{**ONE, "log.wandb": True}))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- several ranks


@pytest.fixture(scope="module")
def vit_knn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A ViT (no BatchNorm: a run on W ranks follows one process's trajectory) with the monitor at every step,
    and that config's single-process online kNN records."""
    from test_distributed_training import VIT

    tmp = tmp_path_factory.mktemp("vit_knn")
    train_dir, val_dir = tmp / "train", tmp / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    make_shards(train_dir, [30, 30])
    make_shards(val_dir, [11], prefix="val")  # odd: the ranks extract uneven shares
    overrides = {
        **VIT,
        **KNN,
        "eval.online_knn_every": 1,
        "steps": 2,
        "eval.train": str(train_dir),
        "eval.val": str(val_dir),
    }
    run = train(tiny_config(tmp / "single", str(train_dir), **overrides))
    return {"data": str(train_dir), "overrides": overrides, "single": knn_records(run)}


def knn_records(run: Path) -> list[tuple[int, float, float]]:
    return [
        (r["step"], r["online_knn_top1"], r["online_knn_top5"])
        for r in read_metrics(run / "metrics.jsonl")
        if "online_knn_top1" in r
    ]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_online_knn_on_two_ranks_equals_one_process(tmp_path: Path, vit_knn: dict[str, Any], strategy: str) -> None:
    """Every rank extracts its share and rank 0 scores the gathered set: the figure of one process. Under FSDP2
    the root's own parameters (patch embedding, norm) are all-gathered around the extraction."""
    from test_distributed_training import torchrun

    overrides = {**vit_knn["overrides"], "dist.strategy": strategy, "dist.fsdp_bf16_params": False}
    cfg = tiny_config(tmp_path, vit_knn["data"], **overrides)
    config = tmp_path / "knn.yaml"
    config.write_text(to_yaml(cfg))
    torchrun(config, 2)
    assert [s for s, *_ in vit_knn["single"]] == [1, 2]
    assert knn_records(cfg.run_dir) == vit_knn["single"]
