"""train.channels_last and train.compile keep the math; `ssltrain bench --profile` accounts for a whole step."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from ssltrain.config import Config, to_yaml
from ssltrain.engine.benchmark import run_profile
from ssltrain.engine.loop import train
from ssltrain.engine.parallelize import channels_last_wanted, use_channels_last
from ssltrain.engine.profile import PHASES
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.methods import build_method


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / a.detach().norm())


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def test_channels_last_gives_the_same_outputs_and_gradients(tmp_path: Path, shard_dir: Path) -> None:
    cfg = tiny_config(tmp_path, str(shard_dir))
    torch.manual_seed(0)
    method = build_method(cfg, num_samples=53).backbone
    converted = copy.deepcopy(method)
    assert use_channels_last(converted) == 1
    assert converted.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(converted.state_dict()) == list(method.state_dict())  # checkpoints and exports see the same keys
    x = torch.randn(8, 3, 32, 32)  # a contiguous batch, as the loader delivers it
    a, b = method(x), converted(x)
    a.square().sum().backward()
    b.square().sum().backward()
    # Relative to the norm: train-mode BatchNorm over 8 samples turns the rounding of other kernels into errors
    # far above float32's on single near-zero elements (measured: 1e-5 on the output, 1e-5 to 1e-3 on gradients).
    assert relative_error(a, b) < 1e-4
    assert relative_error(method.conv1.weight.grad, converted.conv1.weight.grad) < 5e-3


def test_channels_last_unset_is_for_resnets_on_cuda(tmp_path: Path, shard_dir: Path) -> None:
    resnet = build_method(tiny_config(tmp_path, str(shard_dir)), num_samples=53)
    vit = build_method(
        tiny_config(tmp_path, str(shard_dir), **{"model.backbone": "vit_tiny", "model.patch_size": 8}), num_samples=53
    )
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert channels_last_wanted(None, resnet, cuda) and not channels_last_wanted(None, resnet, cpu)
    assert channels_last_wanted(True, resnet, cpu) and not channels_last_wanted(False, resnet, cuda)
    assert not channels_last_wanted(True, vit, cuda)  # nothing to convert


def test_training_with_channels_last_follows_the_contiguous_run(tmp_path: Path, shard_dir: Path) -> None:
    runs = {
        on: train(tiny_config(tmp_path / on, str(shard_dir), steps=3, **{"train.channels_last": on}))
        for on in ("true", "false")
    }
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), rel=1e-3)


@pytest.mark.slow
def test_compiled_backbone_follows_the_eager_loss_trajectory(tmp_path: Path, shard_dir: Path) -> None:
    """~70 s on 2 CPU cores, nearly all of it inductor compiling ResNet-18's forward and backward (needs gcc)."""
    runs = {
        c: train(tiny_config(tmp_path / c, str(shard_dir), steps=3, **{"train.compile": c})) for c in ("true", "false")
    }
    assert losses(runs["true"]) == pytest.approx(losses(runs["false"]), rel=1e-3)
    assert len(losses(runs["true"])) == 3


def write(cfg: Config, path: Path) -> Path:
    path.write_text(to_yaml(cfg))
    return path


def test_profile_accounts_for_every_phase_of_the_step(tmp_path: Path, shard_dir: Path) -> None:
    config = write(tiny_config(tmp_path, str(shard_dir)), tmp_path / "tiny.yaml")
    result = run_profile(config, [], steps=3, warmup=2)
    assert result.steps == 3 and result.world_size == 1 and set(result.seconds) == set(PHASES)
    for name in ("data", "forward", "loss", "backward", "optimizer"):
        assert result.seconds[name] > 0, name
    assert result.seconds["communication"] == 0.0  # one process: no collectives
    assert sum(result.share(name) for name in PHASES) == pytest.approx(1.0, abs=1e-6)
    assert result.share("other") < 0.1  # the named phases cover the step
    assert "backward" in result.table() and not (tmp_path / "runs").exists()  # a temporary run directory


@pytest.mark.distributed
@pytest.mark.slow
def test_profile_on_two_ranks_measures_communication(tmp_path: Path, shard_dir: Path) -> None:
    config = write(tiny_config(tmp_path, str(shard_dir), threads=1), tmp_path / "tiny.yaml")
    out = tmp_path / "profile.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ssltrain.cli",
        "bench",
        "--profile",
        str(config),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "communication" in done.stdout and "2 ranks" in done.stdout
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["seconds"]["communication"] > 0
    assert sum(result["share"].values()) == pytest.approx(1.0, abs=1e-6)
