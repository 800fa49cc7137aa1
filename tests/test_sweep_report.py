"""``ssltrain sweep report``: the table equals the points' eval.json figures, points are sorted by the chosen probe
with failed ones last, and the plots are real PNGs: a heatmap for two axes, lines for one, the best points' curves.

The sweeps are real (``ssltrain sweep`` on tiny digits shards, 16 px, 2 steps, run once for the module): a 2 x 2 grid
(a sweep file, 3 of its points drawn) whose ``data=missing`` level points at shards that do not exist, so that point
really fails, and a one-axis sweep of two learning rates.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from PIL import Image

from ssltrain.config import ConfigError, to_yaml
from ssltrain.data.embedded import digits_samples
from ssltrain.data.shards import write_shards
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.launch.sweep.layout import SweepDir
from ssltrain.launch.sweep.report import format_table, table_rows, write_report
from ssltrain.launch.sweep.results import collect, metric

STEPS = 2


@dataclass
class Sweeps:
    grid: SweepDir  # optim.lr x data: 3 points of 2 x 2, the one of data=missing fails (its shards do not exist)
    line: SweepDir  # one axis, optim.lr: 2 points, both done
    grid_out: str
    grid_returncode: int


def _sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ssltrain.cli", "sweep", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Sweeps:
    root = tmp_path_factory.mktemp("sweep_report")
    data = root / "digits"
    write_shards(itertools.islice(digits_samples("train", size=16), 40), data, "train")
    write_shards(itertools.islice(digits_samples("val", size=16), 30), data, "val")
    cfg = tiny_config(
        root,
        str(data / "train-*.tar"),
        steps=STEPS,
        **{
            "threads": 1,  # tiny tensors on a busy machine
            "data.workers": 1,
            "checkpoint.every": STEPS,
            "eval.train": str(data / "train-*.tar"),
            "eval.val": str(data / "val-*.tar"),
            "eval.linear_epochs": 3,
            "log.tensorboard": False,
        },
    )
    base = root / "base.yaml"
    base.write_text(to_yaml(cfg))
    sweep_file = root / "grid.yaml"
    missing = str(root / "nowhere" / "train-*.tar")
    axes = {"optim.lr": [0.01, 0.001], "data": {"digits": {}, "missing": {"data.train": missing}}}
    # 3 of the 4 points, drawn with seed 1: both lr with digits, and lr=0.01 with the missing shards.
    spec = {"config": str(base), "axes": axes, "random": 3, "seed": 1}
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    grid = _sweep([str(sweep_file), "--parallel", "2"], root)
    # With the online kNN (at the last step), which the curves plot draws as lines; the grid's curves are the evals.
    args = ["optim.lr=0.003,0.0003", f"eval.online_knn_every={STEPS}", "--name", "line", "--probe", "knn_gain"]
    line = _sweep([str(base), *args], root)
    assert line.returncode == 0, line.stdout + line.stderr
    return Sweeps(SweepDir(root / "runs" / "grid"), SweepDir(root / "runs" / "line"), grid.stdout, grid.returncode)


def _markdown_table(report: Path) -> list[dict[str, str]]:
    """The first table of report.md as {header: cell} per row."""
    lines = report.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| #"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


def _pair(cell: str) -> tuple[float | None, float | None]:
    ssl, random = (part.strip() for part in cell.split("/"))
    return (None if ssl == "-" else float(ssl)), (None if random == "-" else float(random))


def _point(sweep: SweepDir, values: dict[str, str]) -> str:
    """The point whose point.json holds these level labels (the table shows each axis by its last key part)."""
    matches = [s.name for s in sweep.states() if all(s.values[a] == values[a.rsplit(".", 1)[-1]] for a in s.values)]
    assert len(matches) == 1, (values, matches)
    return matches[0]


def _check_row(sweep: SweepDir, row: dict[str, str], run: Path) -> None:
    """A done point's row of report.md against its eval.json and metrics.jsonl."""
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == STEPS and row["status"] == "done"
    for probe, column in (("knn_top1", "kNN top-1 (SSL / random)"), ("linear_top1", "linear top-1 (SSL / random)")):
        ssl, random = _pair(row[column])
        assert ssl == pytest.approx(ev["ssl"][probe], abs=5e-4)
        assert random == pytest.approx(ev["random"][probe], abs=5e-4)
    train = [r for r in read_metrics(run / "metrics.jsonl") if "eval" not in r and "loss" in r]
    assert train[-1]["step"] == STEPS
    assert float(row["loss"]) == pytest.approx(train[-1]["loss"], rel=1e-3)
    assert int(row["warnings"]) == len(ev["warnings"])
    if "knn_gain" in row:  # the chosen probe's column when it is a gain
        assert float(row["knn_gain"]) == pytest.approx(ev["ssl"]["knn_top1"] - ev["random"]["knn_top1"], abs=1e-3)


def test_report_table_equals_each_points_eval_json(sweeps: Sweeps) -> None:
    for sweep, axes in ((sweeps.grid, ("lr", "data")), (sweeps.line, ("lr",))):
        rows = _markdown_table(sweep.root / "report.md")
        assert len(rows) == len(sweep.states())
        for row in rows:
            run = sweep.point_dir(_point(sweep, {a: row[a] for a in axes}))
            if row.get("data") == "missing":
                assert not (run / "eval.json").exists()
                continue
            _check_row(sweep, row, run)
        # One architecture: one random-init baseline, probed once and named in its own section.
        report = (sweep.root / "report.md").read_text()
        assert "| resnet18 @ 16 px |" in report and "optim.lr=0.001" in report.replace("0.0003", "0.001")
        assert len(list(sweep.baselines.glob("random-*.json"))) == 1
    assert format_table(sweeps.grid, None) in sweeps.grid_out  # the sweep printed its report's table


def test_points_are_sorted_by_the_chosen_probe(sweeps: Sweeps) -> None:
    for sweep in (sweeps.grid, sweeps.line):
        rows = collect(sweep)
        by_name = {r.name: r for r in rows}
        for probe in ("knn_top1", "linear_top1", "knn_gain", "linear_gain", "loss"):
            cells = table_rows(sweep, probe)
            axes = cells[0][1 : 1 + len(rows[0].values)]
            ranked = [by_name[_point(sweep, dict(zip(axes, c[1 : 1 + len(axes)])))] for c in cells[1:]]
            values = [v for r in ranked if r.done and (v := metric(r, probe)) is not None]
            assert len(values) == 2  # every finished point has every figure
            assert values == sorted(values, reverse=probe != "loss"), (probe, values)
            assert [r.done for r in ranked] == sorted((r.done for r in ranked), reverse=True)  # failed ones last
        for row in rows:
            if row.done:
                assert metric(row, "knn_gain") == pytest.approx(row.ssl["knn_top1"] - row.random["knn_top1"])
    assert "by linear_top1, best first" in format_table(sweeps.grid, "linear_top1")
    assert "by loss, lowest first" in format_table(sweeps.grid, "loss")
    # report.md lists the points in the order of the printed table: the line sweep by its --probe knn_gain.
    md = [r["lr"] for r in _markdown_table(sweeps.line.root / "report.md")]
    assert md == [c[1] for c in table_rows(sweeps.line, "knn_gain")[1:]]
    assert "## Points, by knn_gain (best first)" in (sweeps.line.root / "report.md").read_text()
    with pytest.raises(ConfigError, match="knn_top1, linear_top1"):
        format_table(sweeps.grid, "top1")


def test_failed_points_are_listed_last_with_their_status(sweeps: Sweeps) -> None:
    sweep = sweeps.grid
    assert sweeps.grid_returncode == 1  # the sweep says a point failed, after running the others
    rows = _markdown_table(sweep.root / "report.md")
    assert [(r["data"], r["status"]) for r in rows] == [("digits", "done")] * 2 + [("missing", "failed")]
    for row in rows[2:]:
        assert _pair(row["kNN top-1 (SSL / random)"]) == (None, None) and row["loss"] == "-"
    report = (sweep.root / "report.md").read_text()
    assert "## Failed points" in report
    for state in sweep.states():
        if state.values["data"] == "missing":
            assert state.status == "failed" and state.error
            assert str(sweep.log_path(state.name)) in report and state.error.split(":")[0] in report
    assert format_table(sweep, "knn_top1").splitlines()[-1].rstrip().endswith("failed")


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plots_are_valid_pngs_heatmap_for_two_axes_lines_for_one(sweeps: Sweeps) -> None:
    grid = sorted(p.name for p in (sweeps.grid.root / "report").glob("*.png"))
    assert grid == ["curves.png", "heatmap_data_lr.png"]
    line = sorted(p.name for p in (sweeps.line.root / "report").glob("*.png"))
    assert line == ["curves.png", "lines_lr.png"]
    for sweep in (sweeps.grid, sweeps.line):
        report = (sweep.root / "report.md").read_text()
        for png in (sweep.root / "report").glob("*.png"):
            width, height = _png(png)
            assert width > 200 and height > 150
            assert f"(report/{png.name})" in report
    # The curves come from the online kNN records (the line sweep's) and the final eval of each point.
    for sweep in (sweeps.grid, sweeps.line):
        for row in collect(sweep):
            if row.done:
                online = [] if sweep is sweeps.grid else [float(STEPS)]
                assert [step for step, _ in row.curves["knn"].online] == online
                assert row.curves["knn"].offline == [(float(STEPS), pytest.approx(row.ssl["knn_top1"]))]
                assert row.curves["knn"].random == pytest.approx(row.random["knn_top1"])
    assert "only the offline evals" in (sweeps.grid.root / "report.md").read_text()
    assert "Lines: the online figure" in (sweeps.line.root / "report.md").read_text()


def test_report_command_rewrites_the_report_for_another_probe(sweeps: Sweeps, capsys: pytest.CaptureFixture) -> None:
    from ssltrain.cli import main

    assert main(["sweep", "report", str(sweeps.grid.root), "--probe", "loss"]) == 0
    out = capsys.readouterr().out
    assert "by loss, lowest first" in out and f"report: {sweeps.grid.root / 'report.md'}" in out
    assert "## Points, by loss (lowest first)" in (sweeps.grid.root / "report.md").read_text()
    assert write_report(sweeps.grid, None) == sweeps.grid.root / "report.md"  # back to the spec's probe
    assert "## Points, by knn_top1" in (sweeps.grid.root / "report.md").read_text()
