"""Honest throughput: metrics.jsonl carries the training rate (``img_per_s``, without the monitors' scheduled
measurements and the logging) and the wall-clock rate (``img_per_s_wall``, everything included), the progress line
shows both and the report lists both."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import make_shards, tiny_config

from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.eval.report import write_report


def test_wall_rate_includes_the_online_knn_and_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    make_shards(train_dir, [24])
    make_shards(val_dir, [10], prefix="val")
    cfg = tiny_config(
        tmp_path,
        str(train_dir),
        steps=4,
        threads=1,
        progress=True,  # pytest's stderr is no terminal: one log line per log step
        **{
            "eval.train": str(train_dir),
            "eval.val": str(val_dir),
            "eval.online_knn_every": 2,
            "eval.knn_k": 5,
            "eval.online_knn_samples": "[24,10]",
            "eval.batch_size": 8,
            "checkpoint.every": 4,
        },
    )
    with caplog.at_level(logging.INFO, logger="ssltrain"):
        run = train(cfg)
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert 0 < r["img_per_s_wall"] <= r["img_per_s"], r
    knn_steps = [r for r in records if "online_knn_top1" in r]
    assert [r["step"] for r in knn_steps] == [2, 4]
    for r in knn_steps:  # the kNN pass (feature extraction over 34 images) is in the wall time only
        assert r["img_per_s_wall"] < 0.9 * r["img_per_s"], r
    lines = [m for m in caplog.messages if m.startswith("step ") and "img/s" in m]
    assert len(lines) == 4 and all("training" in m and "wall clock" in m for m in lines)
    report = write_report(run, compute_spectrum_if_missing=False).read_text()
    assert "`img_per_s`" in report and "`img_per_s_wall`" in report
