"""The ``ssltrain shards`` command on every source, read back through the catalog."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_config
from PIL import Image

from ssltrain.cli import COMMANDS, build_parser, main
from ssltrain.config import to_yaml
from ssltrain.core.logs import ALL_RANKS_ENV
from ssltrain.data.stream import ShardCatalog


def _image_tree(root: Path, classes: dict[str, int]) -> None:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            Image.new("RGB", (20, 12), (40 * i, 10 * j, 90)).save(root / name / f"img{j}.jpg")


def test_shards_imagefolder_keeps_labels_and_classes(tmp_path: Path) -> None:
    _image_tree(tmp_path / "in", {"cat": 3, "dog": 4})
    assert (
        main(["shards", "imagefolder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--shard-size", "3"]) == 0
    )
    assert json.loads((tmp_path / "out/classes.json").read_text()) == ["cat", "dog"]
    catalog = ShardCatalog.from_spec(str(tmp_path / "out"))
    assert len(catalog.paths) == 3 and len(catalog) == 7
    assert sorted(catalog.labels().tolist()) == [0, 0, 0, 1, 1, 1, 1]
    assert catalog.read(0).image == (tmp_path / "in/cat/img0.jpg").read_bytes()  # original bytes, not re-encoded


def test_shards_unlabeled_and_embedded(tmp_path: Path) -> None:
    _image_tree(tmp_path / "in", {"a": 2, "b": 1})
    assert main(["shards", "unlabeled", str(tmp_path / "in"), "--out", str(tmp_path / "u")]) == 0
    unlabeled = ShardCatalog.from_spec(str(tmp_path / "u"))
    assert len(unlabeled) == 3 and not unlabeled.has_labels
    assert main(["shards", "shapes", "--out", str(tmp_path / "s"), "--train", "30", "--val", "10", "--size", "24"]) == 0
    assert len(ShardCatalog.from_spec(str(tmp_path / "s/train-*.tar"))) == 30
    assert len(ShardCatalog.from_spec(str(tmp_path / "s/val-*.tar"))) == 10
    assert main(["shards", "digits", "--out", str(tmp_path / "d")]) == 0
    assert len(ShardCatalog.from_spec(str(tmp_path / "d/train-*.tar"))) == 1200


def test_shards_errors_exit_2_with_the_path(tmp_path: Path, capsys) -> None:
    assert main(["shards", "imagefolder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["shards", "unlabeled", "--out", str(tmp_path / "o")]) == 2
    assert "give the input folder" in capsys.readouterr().err


# --- the command line as users type it: real processes, real files ------------------------------------------------

SSLTRAIN = Path(sys.executable).parent / "ssltrain"  # the installed command


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SSLTRAIN), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single line a usage or config error prints (exit 2): no traceback, no log noise."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    return lines[0]


def tiny_yaml(tmp_path: Path, shard_dir: Path, **overrides: object) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(tiny_config(tmp_path, str(shard_dir), **overrides)))
    return path


def test_help_is_instant_and_imports_no_torch() -> None:
    start = time.monotonic()
    proc = run_cli("--help")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0 and "launch" in proc.stdout and "bench" in proc.stdout
    assert elapsed < 1.5, f"ssltrain --help took {elapsed:.2f}s"
    check = (
        "import sys; from ssltrain.cli import build_parser\n"
        "for command in ('', 'train', 'launch', 'shards', 'export'): build_parser(command)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'webdataset') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)


def test_the_listed_help_lines_are_the_commands_own() -> None:
    """`ssltrain --help` lists each command from cli.COMMANDS without importing it: the lines must match."""

    def lines(parser: argparse.ArgumentParser) -> dict[str, str | None]:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return {choice.dest: choice.help for choice in sub._choices_actions}

    assert lines(build_parser()) == lines(build_parser("")) == {name: h for name, (h, _) in COMMANDS.items()}


def test_overrides_after_options_are_accepted(shard_dir: Path, tmp_path: Path, capsys) -> None:
    config = tiny_yaml(tmp_path, shard_dir)
    assert main(["train", str(config), "--stop-after-steps", "1", "name=after", "steps=3"]) == 0
    assert (tmp_path / "runs" / "after" / "checkpoints" / "step-1").is_dir()
    assert f"run directory: {tmp_path / 'runs' / 'after'}" in capsys.readouterr().out
    parsed = build_parser("bench").parse_args(["bench", "--profile", "c.yaml", "a=1", "--steps", "2", "name=x"])
    assert parsed.overrides == ["a=1", "name=x"] and parsed.steps == 2
    parsed = build_parser("launch").parse_args(["launch", "slurm", "c.yaml", "--dry-run", "name=x", "--time", "9"])
    assert parsed.overrides == ["name=x"] and parsed.time == "9"
    with pytest.raises(SystemExit):  # anything else after the options is still an error, with the command's usage
        build_parser("train").parse_args(["train", "c.yaml", "--stop-after-steps", "1", "stray"])
    assert "usage: ssltrain train" in capsys.readouterr().err


def test_malformed_yaml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: [a, b\nsteps: 3\n")
    line = one_error_line(run_cli("train", str(bad)))
    assert str(bad) in line and "not valid YAML at line" in line and "fix the file" in line


def test_out_pointing_at_a_file_is_one_line(shard_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    line = one_error_line(run_cli("shards", "shapes", "--out", str(afile), "--train", "4", "--val", "2"))
    assert f"--out '{afile}' is a file; give a directory" in line
    line = one_error_line(run_cli("train", str(tiny_yaml(tmp_path, shard_dir)), f"out_dir={afile}"))
    assert f"'{afile}' is a file" in line and "set out_dir" in line
    assert afile.read_text() == "not a directory"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write to: a read-only tmpfs for root (which ignores permissions), mode 555 otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_run_directory_is_one_line(shard_dir: Path, tmp_path: Path, read_only_dir: Path) -> None:
    config = tiny_yaml(tmp_path, shard_dir)
    line = one_error_line(run_cli("train", str(config), f"out_dir={read_only_dir}/runs"))
    assert f"'{read_only_dir}' is not writable" in line and "set out_dir to a writable directory" in line
    line = one_error_line(run_cli("shards", "shapes", "--out", str(read_only_dir / "s"), "--train", "4", "--val", "2"))
    assert str(read_only_dir / "s") in line and "write elsewhere" in line


def test_resuming_another_model_is_refused_before_training(shard_dir: Path, tmp_path: Path) -> None:
    config = tiny_yaml(tmp_path, shard_dir, steps=1)
    assert main(["train", str(config)]) == 0
    line = one_error_line(run_cli("train", str(config), "steps=2", "method.name=simclr"))
    assert f"run directory '{tmp_path / 'runs' / 'tiny'}' holds checkpoints of another model" in line
    assert "(method.name 'vicreg' -> 'simclr')" in line and "start a new run under another name (name=NEW)" in line
    line = one_error_line(run_cli("train", str(config), "steps=2", "data.batch_size=16"))
    assert "global batch 8, this config has 16" in line
    # the launchers refuse in the login shell, before the job waits in the queue
    line = one_error_line(run_cli("launch", "slurm", str(config), "steps=2", "model.backbone=resnet50", "--dry-run"))
    assert line.startswith("ssltrain launch slurm: error: run directory") and "(model.backbone 'resnet18'" in line


def test_warnings_are_one_clean_line_each(shard_dir: Path, tmp_path: Path) -> None:
    """An empty shard's warning and the warm-up warning: the message once, no Python source line, no category."""
    (shard_dir / "train-empty.tar").write_bytes(b"")
    proc = run_cli("train", str(tiny_yaml(tmp_path, shard_dir, steps=1)), "optim.warmup_steps=3")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warned) == 2, proc.stderr
    skipped = next(line for line in warned if "train-empty.tar' is skipped" in line)
    assert skipped.count("re-write it") == 1 and "UserWarning" not in skipped and ".py:" not in skipped
    assert any("optim.warmup_steps 3 is longer than steps 1" in line for line in warned)
    assert not [line for line in proc.stderr.splitlines() if line.startswith(" ")], proc.stderr  # no source lines


def test_only_rank_0_prints_unless_asked(tmp_path: Path) -> None:
    """A command started as rank 1 of a job prints no progress lines; SSLTRAIN_LOG_ALL_RANKS=1 prints them,
    marked with the rank. (The 2-rank training run is in test_launch.py.)"""
    args = ("shards", "shapes", "--out", str(tmp_path / "s"), "--train", "4", "--val", "2")
    quiet = run_cli(*args, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = run_cli(*args, env={"RANK": "1", "WORLD_SIZE": "2", ALL_RANKS_ENV: "1"})
    assert loud.returncode == 0 and "[rank 1] INFO wrote 1 shards" in loud.stderr, loud.stderr
