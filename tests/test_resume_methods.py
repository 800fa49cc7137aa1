"""kill -9 mid-run, then resume: every method of the second wave ends with the parameters of an uninterrupted run.

What each method adds to the state that a resume must restore exactly: EMA teachers and their momentum schedule
(MoCo v3, I-JEPA, DINOv2), the step that seeds SIGReg's directions (LeJEPA), the masks drawn from (seed, position)
(MAE, I-JEPA, DINOv2), centres and Sinkhorn state. The run is a real process killed with SIGKILL right after a
checkpoint is committed, so the resume starts from the checkpoint and the loader's workers restart mid-epoch.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import assert_same_params, final_params, make_shards, start_training, tiny_config

from ssltrain.engine.loop import train

VIT = {"model.backbone": "vit_tiny", "model.patch_size": 4, "optim.lr": 0.001}

# Small settings of each method on the tiny config (16 px images, batch 8).
METHODS: dict[str, dict[str, object]] = {
    "lejepa": {"method.lejepa.num_slices": 16},
    "mocov3": {"method.mocov3.predictor": "[32,64]"},
    "mae": {
        "augment.global_crops.count": 1,
        "method.mae.decoder_dim": 32,
        "method.mae.decoder_depth": 1,
        "method.mae.decoder_heads": 2,
    },
    "ijepa": {
        "augment.global_crops.count": 1,
        "method.ijepa.predictor_depth": 1,
        "method.ijepa.predictor_width": 48,
        "method.ijepa.num_targets": 2,
        "method.ijepa.min_keep": 0,
    },
    "dinov2": {
        "method.dinov2.out_dim": 32,
        "method.dinov2.hidden_dim": 32,
        "method.dinov2.bottleneck_dim": 16,
        "model.registers": 1,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_killed_run_resumes_as_if_never_stopped(tmp_path: Path, name: str) -> None:
    make_shards(tmp_path / "data", [24, 24])
    overrides = {
        "method.name": name,
        "steps": 6,
        "checkpoint.every": 2,
        "data.workers": 1,
        **(VIT if name not in {"lejepa", "mocov3"} else {}),
        **METHODS[name],
    }
    cfg = tiny_config(tmp_path / "killed", str(tmp_path / "data"), **overrides)
    proc = start_training(cfg, tmp_path / "killed.yaml")
    committed = cfg.run_dir / "checkpoints/step-2/COMPLETE"
    deadline = time.monotonic() + 300
    while not committed.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed; the test proved nothing\n{log}"
    assert not (cfg.run_dir / "checkpoints/step-6").exists(), "killed too late: nothing was left to resume"
    resumed = train(cfg)
    uninterrupted = train(tiny_config(tmp_path / "whole", str(tmp_path / "data"), **overrides))
    assert_same_params(final_params(resumed), final_params(uninterrupted))
