"""The eval runner and the end-to-end claim: pretraining on digits beats the random-init backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_shards, tiny_config
from ssltrain.cli import main
from ssltrain.data.embedded import digits_samples
from ssltrain.data.shards import DataError, write_shards
from ssltrain.eval.evaluate import evaluate_run, format_table
from ssltrain.metrics import read_metrics
from ssltrain.train import train


def test_eval_writes_results_and_records(shard_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, str(shard_dir), steps=2, **{"eval.train": str(shard_dir), "eval.val": str(shard_dir), "eval.linear_epochs": 5})
    run = train(cfg)
    results = evaluate_run(run)
    assert set(results) == {"ssl", "random"}
    for scores in results.values():
        assert 0.0 <= scores["knn_top1"] <= 1.0 and 0.0 <= scores["linear_top1"] <= 1.0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["step"] == 2 and saved["ssl"] == results["ssl"]
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval" in r]
    assert {(r["eval"], r["backbone"]) for r in evals} == {("knn", "ssl"), ("knn", "random"), ("linear", "ssl"), ("linear", "random")}
    table = format_table(results, 2)
    assert "kNN top-1" in table and "random init" in table and "SSL (step 2)" in table


def test_probes_on_unlabeled_data_are_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "unlabeled"
    data.mkdir()
    make_shards(data, [16], labeled=False)
    cfg = tiny_config(tmp_path, str(data), steps=1, **{"eval.train": str(data), "eval.val": str(data)})
    run = train(cfg)
    with pytest.raises(DataError, match="without a .cls label"):
        evaluate_run(run)
    assert main(["eval", str(run)]) == 2


def test_eval_without_probe_data_or_checkpoint(shard_dir: Path, tmp_path: Path) -> None:
    run = train(tiny_config(tmp_path, str(shard_dir), steps=1))
    with pytest.raises(DataError, match="eval.train / eval.val"):
        evaluate_run(run)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        evaluate_run(tmp_path)


@pytest.mark.slow
def test_pretraining_on_digits_beats_the_random_init_backbone(tmp_path: Path) -> None:
    data = tmp_path / "digits"
    write_shards(digits_samples("train"), data, "train", max_count=400)
    write_shards(digits_samples("val"), data, "val")
    cfg = tiny_config(
        tmp_path, str(data / "train-*.tar"),
        **{
            "name": "digits", "steps": DIGITS_STEPS, "log_every": 10, "data.batch_size": 256, "data.workers": 1,
            "augment.global_crops.size": 32, "augment.global_crops.scale": "[0.5,1.0]", "augment.global_crops.flip_p": 0.0,
            "augment.global_crops.blur_p": "[0.0]", "augment.global_crops.solarize_p": "[0.0]",
            "augment.global_crops.grayscale_p": 0.0, "method.projector": "[1024,1024,1024]",
            "optim.lr": 0.002, "optim.warmup_steps": 10, "checkpoint.every": 1000,
            "eval.train": str(data / "train-*.tar"), "eval.val": str(data / "val-*.tar"),
        },
    )
    results = evaluate_run(train(cfg))
    print(format_table(results, DIGITS_STEPS))
    assert results["ssl"]["knn_top1"] > results["random"]["knn_top1"]
    assert results["ssl"]["linear_top1"] > results["random"]["linear_top1"]


DIGITS_STEPS = 100
