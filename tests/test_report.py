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

from ssltrain.config import to_yaml
from ssltrain.engine.loop import train
from ssltrain.eval.cli import add_report_parser
from ssltrain.eval.evaluate import EvalOptions, evaluate_run
from ssltrain.eval.hardware import hardware_info, write_hardware
from ssltrain.eval.metrics_log import MetricsLog
from ssltrain.eval.plots import loss_keys, plot_all, training_records
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
    for name in ("loss", "loss_time", "lr", "norms", "throughput", "monitors", "spectrum"):
        assert_real_png(run / "plots" / f"{name}.png")
        assert f"(plots/{name}.png)" in text
    assert "| training time |" in text and ("| trained on | CPU only" in text) == (not torch.cuda.is_available())
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
    assert len(plots) == 8 and all(p.path is None for p in plots)
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


# ---------------------------------------------------------------- the report tells the truth (issue 18)


def _run_dir(tmp_path: Path, records: list[dict], ev: dict | None = None) -> Path:
    """A run directory as the trainer and ``ssltrain eval`` leave it: config.yaml, metrics.jsonl, eval.json."""
    cfg = tiny_config(tmp_path, str(tmp_path / "data"), steps=400)
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if ev is not None:
        (run / "eval.json").write_text(json.dumps(ev))
    return run


def _scores(knn: float, linear: float) -> dict:
    """One backbone's entry of eval.json, in the shape ``ssltrain eval`` writes."""
    return {
        "num_classes": 10,
        "train_samples": 1200,
        "val_samples": 597,
        "knn": {"20": {"top1": knn, "top5": 0.6}},
        "knn_k": 20,
        "knn_temperature": 0.07,
        "knn_top1": knn,
        "knn_top5": 0.6,
        "linear": {"top1": linear, "top5": 0.7, "lr": 0.1, "weight_decay": 1e-5, "grid": [], "holdout_top1": linear},
        "linear_top1": linear,
        "linear_top5": 0.7,
    }


def _eval_records(step: int, ev: dict) -> list[dict]:
    """The metrics.jsonl records ``ssltrain eval`` appends for eval.json's figures."""
    out = []
    for backbone in ("ssl", "random"):
        res = ev[backbone]
        out.append({"step": step, "eval": "knn", "backbone": backbone, "k": 20, **res["knn"]["20"]})
        out.append({"step": step, "eval": "linear", "backbone": backbone, "top1": res["linear_top1"], "top5": 0.7})
    return out


def _train_records(steps: range) -> list[dict]:
    return [
        {"step": s, "epoch": s / 100, "lr": 0.01, "img_per_s": 900.0, "loss": 20.0 / s, "invariance": 1.0 / s}
        for s in steps
    ]


def test_probes_below_random_init_are_the_first_warning_in_bold(tmp_path: Path) -> None:
    # SwAV on shapes, as it collapsed: kNN 0.146 and linear 0.193 against 0.182 and 0.218 at random init.
    ev = {"step": 400, "checkpoint": "ckpt", "ssl": _scores(0.146, 0.193), "random": _scores(0.182, 0.218)}
    ev["warnings"] = []
    run = _run_dir(tmp_path, _train_records(range(100, 401, 100)) + _eval_records(400, ev), ev)
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    assert "Warnings" in text and "None" not in text.split("## Warnings")[1].split("##")[0]
    assert text.index("## Warnings") < text.index("## Summary") < text.index("## Probes")
    bullets = [line for line in text.split("## Warnings")[1].splitlines() if line.startswith("- ")]
    assert bullets[0].startswith(
        "- **kNN (k=20) top-1 at step 400 is 0.146, below the random-init backbone's 0.182 (-0.036)"
    ), bullets
    assert bullets[1].startswith("- **linear probe top-1 at step 400 is 0.193, below the random-init backbone's 0.218")
    assert all(b.endswith("**") for b in bullets)

    # One probe above, one below: only the one below is flagged; both above: no warning, and the report says so.
    ev["ssl"] = _scores(0.5, 0.193)
    (run / "eval.json").write_text(json.dumps(ev))
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    assert "kNN (k=20) top-1" not in text and "**linear probe top-1 at step 400 is 0.193" in text
    ev["ssl"] = _scores(0.5, 0.6)
    (run / "eval.json").write_text(json.dumps(ev))
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    assert "below the random-init" not in text and "linear top-1 are at or above the random-init backbone's" in text


def _colour_share(path: Path, rgb: tuple[int, int, int]) -> float:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    return float((pixels == np.array(rgb)).all(axis=-1).mean())


SSL_BLUE = (31, 119, 180)  # matplotlib's tab:blue, the bars' colour


def test_probe_plot_draws_one_eval_as_bars_and_several_as_lines(tmp_path: Path) -> None:
    ev = {"step": 400, "checkpoint": "ckpt", "ssl": _scores(0.62, 0.71), "random": _scores(0.41, 0.45)}
    run = _run_dir(tmp_path, _train_records(range(100, 401, 100)) + _eval_records(400, ev), ev)
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    png = run / "plots" / "probes.png"
    assert_real_png(png)
    # Bars fill a good part of the picture with the SSL colour; eight markers would cover a fraction of a percent.
    assert _colour_share(png, SSL_BLUE) > 0.04, _colour_share(png, SSL_BLUE)
    assert "SSL top-1 as bars, the random-init backbone as a dashed line across each bar" in text

    later = {**ev, "step": 800, "ssl": _scores(0.7, 0.78)}
    records = _train_records(range(100, 801, 100)) + _eval_records(400, ev) + _eval_records(800, later)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    assert_real_png(png)
    assert _colour_share(png, SSL_BLUE) < 0.01  # lines now
    assert "SSL top-1 over steps, the random-init backbone as a dashed line of the same colour" in text


def test_report_shows_norms_wall_clock_time_and_counters_not_in_the_loss_panel(tmp_path: Path) -> None:
    records = [
        {
            **r,
            "time_s": 37.25 * r["step"],  # 3725 s at step 100: 1 h 02 min 05 s
            "data_wait_s": 0.01,
            "data_skipped": 3,
            "data_shards_skipped": 1,
            "nonfinite_steps": 2,
            "grad_norm": 5.0 / r["step"],
            "weight_norm": 40.0 + r["step"],
            "some_new_counter": r["step"],  # an integer the loop may add one day: a counter, not a loss term
        }
        for r in _train_records(range(10, 101, 10))
    ]
    run = _run_dir(tmp_path, records)
    write_hardware(run)
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    summary = text.split("## Summary")[1].split("##")[0]
    assert "| training time | 1 h 02 min 05 s (wall clock to step 100, resumes included) |" in summary
    assert "| samples skipped (unreadable) | 3 (`data_skipped`) |" in summary
    assert "| shards skipped (unreadable) | 1 (`data_shards_skipped`) |" in summary
    assert "| steps skipped (non-finite loss or gradients) | 2 (`nonfinite_steps`) |" in summary
    assert "| trained on |" in summary and f"torch {torch.__version__}" in summary
    assert "The machine the run trained on (`hardware.json`)" in text
    for name in ("norms", "loss_time", "loss"):
        assert_real_png(run / "plots" / f"{name}.png")
        assert f"(plots/{name}.png)" in text
    # The loss panel holds the loss and its terms only: two panels, one row of the figure.
    assert loss_keys(training_records(records)) == ["loss", "invariance"]
    with Image.open(run / "plots" / "loss.png") as img:
        assert img.height <= 320, img.size  # a counter's panel would add a second row

    # A run from before time_s and the norms: those plots are skipped with a note, the rest is drawn.
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _train_records(range(10, 101, 10))))
    text = write_report(run, compute_spectrum_if_missing=False).read_text()
    assert "_Skipped: no grad_norm or weight_norm in metrics.jsonl" in text and "_Skipped: no time_s" in text
    assert "| training time |" not in text and not (run / "plots" / "norms.png").exists()
