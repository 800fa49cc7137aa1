"""``ssltrain sweep``: the grid and its names, and the local runner end to end: a 4-point sweep killed with
``kill -9`` mid-way and run again (finished points kept, the interrupted one resumed exactly), a failing point that
does not stop the others, the random-init baseline probed once per backbone, and an Optuna study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_shards

from ssltrain.config import ConfigError
from ssltrain.launch.sweep.layout import SweepDir
from ssltrain.launch.sweep.space import build_spec, load_sweep_file, parse_axis_arg, split_values

# ---------------------------------------------------------------- the grid


def test_values_split_on_commas_outside_brackets() -> None:
    assert split_values("0.1,0.2") == ["0.1", "0.2"]
    assert split_values("[0.3,1.0],[0.08,1.0]") == ["[0.3,1.0]", "[0.08,1.0]"]
    with pytest.raises(ConfigError, match="unbalanced"):
        split_values("[0.3,1.0")


def test_grid_names_every_point_by_its_levels_and_random_draws_a_fixed_subset(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("data: {train: x}\n")
    spec = build_spec(str(base), ["optim.lr=0.1,0.2,0.4", "method.name=vicreg,simclr", "steps=5"])
    names = [p.name for p in spec.points()]
    assert names[:3] == ["lr=0.1_name=vicreg", "lr=0.1_name=simclr", "lr=0.2_name=vicreg"]
    assert len(set(names)) == 6 and spec.overrides == ["steps=5"]
    first = spec.points()[0]
    assert first.overrides == ("optim.lr=0.1", "method.name=vicreg")
    assert first.values == {"optim.lr": "0.1", "method.name": "vicreg"}
    drawn = build_spec(str(base), ["optim.lr=0.1,0.2,0.4", "method.name=vicreg,simclr"], random_points=3, seed=1)
    again = build_spec(str(base), ["optim.lr=0.1,0.2,0.4", "method.name=vicreg,simclr"], random_points=3, seed=1)
    assert [p.name for p in drawn.points()] == [p.name for p in again.points()]
    assert len(drawn.points()) == 3 and {p.name for p in drawn.points()} <= set(names)
    # keys sharing a last part keep their full names
    clash = build_spec(str(base), ["optim.lr=0.1,0.2", "probe.lr=1,2"])
    assert clash.points()[0].name == "optim.lr=0.1_probe.lr=1"
    ranged = build_spec(str(base), ["optim.lr=logrange(1e-4,1e-2)"])
    with pytest.raises(ConfigError, match="only --optuna"):
        ranged.points()
    assert parse_axis_arg("optim.lr=logrange(1e-4,1e-2)").search == ("logrange", 1e-4, 1e-2)


def test_a_sweep_file_moves_several_keys_as_one_named_level(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("data: {train: x}\n")
    sweep_file = tmp_path / "study.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "config": "base.yaml",
                "overrides": {"steps": 7},
                "axes": {
                    "strength": {
                        "weak": {"augment.global_crops.scale": [0.8, 1.0], "augment.global_crops.brightness": 0.1},
                        "strong": {"augment.global_crops.scale": [0.08, 1.0], "augment.global_crops.brightness": 0.8},
                    },
                    "model.backbone": ["resnet18", "vit_tiny"],
                },
            },
            sort_keys=False,
        )
    )
    fields = load_sweep_file(sweep_file)
    assert fields["config"] == str(base) and fields["overrides"] == ["steps=7"] and fields["name"] == "study"
    spec = build_spec(str(sweep_file), ["optim.lr=0.1,0.2"])
    points = spec.points()
    assert len(points) == 8
    assert points[0].name == "strength=weak_backbone=resnet18_lr=0.1"
    assert "augment.global_crops.scale=[0.8, 1.0]" in points[0].overrides
    # the spec survives its sweep.yaml
    sweep = SweepDir(tmp_path / "runs" / "study")
    sweep.create(spec)
    assert [p.name for p in sweep.spec().points()] == [p.name for p in points]


# ---------------------------------------------------------------- the local runner, end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep-data")
    make_shards(root, [48, 48])
    make_shards(root, [30], prefix="val")
    return root


def base_config(tmp_path: Path, data: Path, steps: int = 8) -> Path:
    """A run of a few seconds: ResNet-18 at 16 px, batch 8, a loader worker, cheap probes."""
    cfg = {
        "name": "point",
        "out_dir": str(tmp_path / "runs"),
        "steps": steps,
        "log_every": 2,
        "progress": False,
        "threads": 1,
        "data": {"train": str(data / "train-*.tar"), "batch_size": 8, "workers": 1},
        "augment": {"global_crops": {"size": 16, "blur_p": [0.5]}},
        "method": {"projector": [32, 32]},
        "optim": {"name": "adamw", "lr": 0.01, "warmup_steps": 2},
        "checkpoint": {"every": 2, "keep": 5},
        "eval": {
            "train": str(data / "train-*.tar"),
            "val": str(data / "val-*.tar"),
            "batch_size": 32,
            "knn_k": 5,
            "linear_epochs": 5,
        },
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sweep_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ssltrain.cli", "sweep", str(config), *args]


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/step-*/COMPLETE"))


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from ssltrain.core.checkpoint_layout import latest_checkpoint
    from ssltrain.core.checkpoints import load_checkpoint

    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None
    return load_checkpoint(latest)["model"]


@pytest.mark.slow
def test_a_sweep_killed_mid_way_resumes_its_interrupted_point_exactly(tmp_path: Path, data: Path) -> None:
    config = base_config(tmp_path, data, steps=10)
    args = ("optim.lr=0.01,0.02", "method.projector=[32,32],[16,16]", "--name", "grid")
    root = tmp_path / "runs" / "grid"
    first = subprocess.Popen(sweep_cmd(config, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    second_point = root / "lr=0.01_projector=16-16"
    deadline = time.monotonic() + 300
    while not (second_point / "checkpoints").is_dir() or 4 not in committed_steps(second_point):
        assert first.poll() is None, first.stdout.read().decode() if first.stdout else ""
        assert time.monotonic() < deadline, "the second point never reached step 4"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # the point's process died with the runner: its lock is free (a live trainer would hold it)
    sweep = SweepDir(root)
    for _ in range(100):
        with sweep.claim(second_point.name) as free:
            if free:
                break
        time.sleep(0.1)
    assert free, "the interrupted point's process outlived the killed runner"
    done_first = root / "lr=0.01_projector=32-32"
    assert sweep.state(done_first.name).status == "done"
    eval_mtime = (done_first / "eval.json").stat().st_mtime_ns
    interrupted_at = max(committed_steps(second_point))
    assert interrupted_at < 10

    again = subprocess.run(sweep_cmd(config, *args), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    states = {s.name: s for s in sweep.states()}
    assert len(states) == 4 and all(s.status == "done" for s in states.values())
    assert states[done_first.name].attempts == 1
    assert (done_first / "eval.json").stat().st_mtime_ns == eval_mtime  # not rerun
    assert states[second_point.name].attempts == 2
    # the resumed point ends where the same point run without interruption ends
    reference = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssltrain.cli",
            "train",
            str(config),
            "optim.lr=0.01",
            "method.projector=[16,16]",
            f"out_dir={tmp_path / 'ref'}",
            "name=ref",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr
    resumed, uninterrupted = model_state(second_point), model_state(tmp_path / "ref" / "ref")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    # the random-init baseline was probed once (one backbone) and every point's eval.json carries it
    baselines = list((root / "baselines").glob("random-*.json"))
    assert len(baselines) == 1
    shared = json.loads(baselines[0].read_text())["results"]
    for name in states:
        result = json.loads((root / name / "eval.json").read_text())
        assert result["random"]["knn_top1"] == shared["knn_top1"]
        assert result["random"]["linear_top1"] == shared["linear_top1"]
    reads = sum("probes read from" in (root / n / "sweep.log").read_text() for n in states)
    assert reads == 3
    # a third run finds everything done and trains nothing
    third = subprocess.run(sweep_cmd(config, *args), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "4 points, 4 done earlier" in third.stdout + third.stderr


def test_a_failing_point_is_reported_and_does_not_stop_the_others(tmp_path: Path, data: Path) -> None:
    config = base_config(tmp_path, data, steps=4)
    missing = str(tmp_path / "nowhere" / "train-*.tar")
    result = subprocess.run(
        sweep_cmd(config, f"data.train={missing},{data / 'train-*.tar'}", "--name", "mixed"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    sweep = SweepDir(tmp_path / "runs" / "mixed")
    states = {s.status: s for s in sweep.states()}
    assert set(states) == {"done", "failed"}
    failed = states["failed"]
    assert "nowhere" in failed.error
    assert f"point {failed.name}: failed" in result.stderr and str(sweep.log_path(failed.name)) in result.stderr
    assert "Traceback" in sweep.log_path(failed.name).read_text()
    assert (sweep.point_dir(states["done"].name) / "eval.json").is_file()


def test_a_changed_base_needs_a_new_sweep_name(tmp_path: Path, data: Path) -> None:
    config = base_config(tmp_path, data)
    sweep = SweepDir(tmp_path / "runs" / "s")
    sweep.create(build_spec(str(config), ["optim.lr=0.1,0.2", "steps=3"], name="s"))
    with pytest.raises(ConfigError, match="another --name"):
        sweep.create(build_spec(str(config), ["optim.lr=0.1,0.2", "steps=4"], name="s"))
    result = subprocess.run(
        sweep_cmd(config, "optim.lr=0.1,0.2", "steps=4", "--name", "s"), capture_output=True, text=True
    )
    assert result.returncode == 2 and "another --name" in result.stderr


def test_a_bad_key_fails_before_any_point_runs(tmp_path: Path, data: Path) -> None:
    config = base_config(tmp_path, data)
    result = subprocess.run(sweep_cmd(config, "optim.lrr=0.1,0.2"), capture_output=True, text=True)
    assert result.returncode == 2 and "lrr" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_optuna_proposes_points_and_a_rerun_continues_the_study(tmp_path: Path, data: Path) -> None:
    pytest.importorskip("optuna")
    config = base_config(tmp_path, data, steps=4)
    args = ("optim.lr=logrange(1e-3,1e-1)", "--optuna", "2", "--maximize", "knn_top1", "--name", "tpe", "--seed", "3")
    first = subprocess.run(sweep_cmd(config, *args), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    sweep = SweepDir(tmp_path / "runs" / "tpe")
    states = sweep.states()
    assert [s.name for s in states] == ["trial-0000", "trial-0001"]
    assert all(s.status == "done" and s.trial is not None for s in states)
    lrs = [float(s.values["optim.lr"]) for s in states]
    assert all(1e-3 <= lr <= 1e-1 for lr in lrs) and lrs[0] != lrs[1]
    assert "best trial" in first.stdout
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep.root / "optuna.journal"))
    )
    study = optuna.load_study(study_name="tpe", storage=storage)
    for trial, state in zip(study.trials, states):
        eval_json = json.loads((sweep.point_dir(state.name) / "eval.json").read_text())
        assert trial.value == eval_json["ssl"]["knn_top1"]
    # the same command with more trials continues the study: the two finished trials are not rerun
    more = subprocess.run(sweep_cmd(config, *args[:2], "3", *args[3:]), capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stdout + more.stderr
    assert [s.name for s in sweep.states()] == ["trial-0000", "trial-0001", "trial-0002"]
    assert [s.attempts for s in sweep.states()] == [1, 1, 1]


def test_dry_run_lists_the_points(tmp_path: Path, data: Path) -> None:
    config = base_config(tmp_path, data)
    env = {**os.environ}
    result = subprocess.run(
        sweep_cmd(config, "optim.lr=0.1,0.2", "augment.global_crops.scale=[0.3,1.0],[0.5,1.0]", "--dry-run"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "4 points of 4" in result.stdout
    assert "lr=0.2_scale=0.5-1.0: optim.lr=0.2 augment.global_crops.scale=[0.5,1.0]" in result.stdout
