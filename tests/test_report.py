"""The run report: report.md and its PNG plots for a short run, before and after eval, and the skip notes."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shards, tiny_config
from PIL import Image

from ssltrain.engine.loop import train
from ssltrain.eval.cli import add_report_parser
from ssltrain.eval.evaluate import EvalOptions, evaluate_run
from ssltrain.eval.hardware import hardware_info, write_hardware
from ssltrain.eval.metrics_log import MetricsLog
from ssltrain.eval.plots import plot_all
from ssltrain.eval.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: Path) -> None:
    """A PNG file with a real picture: the signature, a decodable image of plot size, and more than one colour."""
    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 300 and img.height >= 200, img.size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 5.0, f"{path} is (nearly) one colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines, text, axes: many distinct colours


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    data.mkdir()
    make_shards(data, [24, 24], prefix="train")
    make_shards(data, [20], prefix="val")
    cfg = tiny_config(
        tmp,
        str(data / "train-*.tar"),
        steps=4,
        **{"eval.train": str(data / "train-*.tar"), "eval.val": str(data / "val-*.tar"), "eval.linear_epochs": 3},
    )
    return train(cfg)


def test_report_of_a_short_run_before_and_after_eval(short_run: Path) -> None:
    run = short_run
    # Before eval: no probe records, no spectrum.json; the report computes the spectrum from eval.val.
    report = write_report(run)
    text = report.read_text()
    for name in ("loss", "lr", "throughput", "monitors", "spectrum"):
        assert_real_png(run / "plots" / f"{name}.png")
        assert f"(plots/{name}.png)" in text
    assert not (run / "plots" / "probes.png").exists()
    assert "_Skipped: no online probe (online_*) or eval records in metrics.jsonl" in text
    assert "No eval.json yet" in text
    spectrum = json.loads((run / "spectrum.json").read_text())
    assert spectrum["step"] == 4 and len(spectrum["ssl"]["features"]) == 19  # 20 val images: rank <= 19 centred
    assert "## Resolved config" in text and "name: tiny" in text
    assert "## Hardware" in text and f"| torch | {hardware_info()['torch']} |" in text
    assert "| method | `vicreg` |" in text and "| steps logged | 4 of 4 |" in text

    # Online probe keys in training records and an eval: the probe plot appears, the table too.
    log = MetricsLog(run, tensorboard=False)
    for step in (2, 4):
        log.log({"step": step, "loss": 1.0, "online_knn_top1": 0.1 * step, "online_linear_top1": 0.05 * step})
    evaluate_run(run, options=EvalOptions(knn_ks=(5,), linear_epochs=3))
    (run / "hardware.json").write_text(json.dumps({"torch": "9.9.9", "gpus": ["Some GPU"]}))
    text = write_report(run).read_text()
    assert_real_png(run / "plots" / "probes.png")
    assert "(plots/probes.png)" in text and "Skipped" not in text
    assert "| kNN k=5, T=0.07 |" in text and "| linear |" in text and "random init top-1" in text
    assert "The machine the run trained on" in text and "| gpus | ['Some GPU'] |" in text
    assert json.loads((run / "spectrum.json").read_text()).get("random")  # eval's spectrum (with random) is kept


def test_report_cli_and_errors(short_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(short_run), "--no-spectrum"])
    args.func(args)
    assert f"report: {short_run / 'report.md'}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)


def test_write_hardware_records_the_machine_for_the_report(tmp_path: Path) -> None:
    path = write_hardware(tmp_path)
    assert path == tmp_path / "hardware.json" and [p.name for p in tmp_path.iterdir()] == ["hardware.json"]
    info = json.loads(path.read_text())
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["cpu"] and info["cpu_count"] == os.cpu_count()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert info["gpu_count"] == gpus and len(info.get("gpus", [])) == gpus
    dali = [
        d.version for d in importlib.metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-dali")
    ]
    assert info["dali"] == (dali[0] if dali else None)
    assert write_hardware(tmp_path) == path  # a resumed run rewrites it in place


def test_png_check_rejects_blank_and_non_png(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (640, 480), "white").save(blank)
    with pytest.raises(AssertionError, match="one colour"):
        assert_real_png(blank)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(AssertionError, match="not a PNG"):
        assert_real_png(fake)


def test_plots_skip_with_notes_when_there_is_nothing_to_draw(tmp_path: Path) -> None:
    plots = plot_all([], None, tmp_path, {"emb_rankme": 10.0})
    assert [p.path for p in plots] == [None] * 6
    assert all(p.note for p in plots) and not list(tmp_path.glob("*.png"))
    # A collapsing run: the monitors plot draws the thresholds; the warning reaches the report's data.
    records = [
        {
            "step": s,
            "loss": 1.0 / s,
            "lr": 0.1,
            "img_per_s": 100.0 + s,
            "emb_rankme": 50.0 / s,
            "emb_std_normalized": "nan" if s == 3 else 1.0 / s,
        }
        for s in range(1, 11)
    ]
    plots = {p.name: p for p in plot_all(records, None, tmp_path, {"emb_rankme": 10.0, "emb_std_normalized": 0.1})}
    for name in ("loss", "lr", "throughput", "monitors"):
        assert_real_png(plots[name].path)
    assert plots["probes"].path is None and plots["spectrum"].path is None
