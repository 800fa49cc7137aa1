"""``ssltrain export``: the backbone loads into the stock torchvision / timm model, strictly, with the same output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import tiny_config
from safetensors.torch import load_file

from ssltrain.cli import main
from ssltrain.config import from_yaml_text
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.engine.loop import train
from ssltrain.methods import build_method


def ssltrain_backbone(run: Path) -> torch.nn.Module:
    state = load_checkpoint(run)
    method = build_method(from_yaml_text(state["config"]), num_samples=state["data_samples"])
    method.load_state_dict(state["model"])
    return method.backbone.eval()


# Appended to backbone.json's snippet: the model it built holds the exported tensors, and ssltrain was never imported.
SNIPPET_CHECK = """
import sys
import safetensors.torch
import torch
reference = torch.load('backbone.pt', weights_only=True) if __import__('os').path.exists('backbone.pt') else None
reference = reference or safetensors.torch.load_file('backbone.safetensors')
state = model.state_dict()
assert state.keys() == reference.keys() and all(torch.equal(state[k], v) for k, v in reference.items())
assert not [m for m in sys.modules if m.split('.')[0] == 'ssltrain'], 'the snippet imported ssltrain'
print('loaded', len(state), 'tensors')
"""


def run_load_snippet(out: Path) -> None:
    """Run backbone.json's ``load`` snippet as a user would paste it: a fresh ``python -c`` in the export directory."""
    card = json.loads((out / "backbone.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", card["load"] + "\n" + SNIPPET_CHECK],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"the load snippet failed:\n{card['load']}\n{proc.stderr[-2000:]}"
    assert proc.stdout.startswith("loaded "), proc.stdout


def test_resnet_export_loads_into_torchvision(shard_dir: Path, tmp_path: Path) -> None:
    run = train(
        tiny_config(tmp_path, str(shard_dir), steps=2, **{"method.name": "byol", "method.byol.predictor": "[32,64]"})
    )
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    card = json.loads((tmp_path / "out/backbone.json").read_text())
    assert card["library"] == "torchvision" and card["architecture"] == "resnet18" and card["step"] == 2
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(load_file(tmp_path / "out/backbone.safetensors"))  # strict: no teacher, no heads
    from_pt = torch.load(tmp_path / "out/backbone.pt", weights_only=True)
    assert all(torch.equal(from_pt[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), ssltrain_backbone(run)(x), rtol=0, atol=0)
    run_load_snippet(tmp_path / "out")


def test_vit_export_loads_into_timm(shard_dir: Path, tmp_path: Path) -> None:
    run = train(tiny_config(tmp_path, str(shard_dir), steps=1, **{"model.backbone": "vit_tiny", "model.patch_size": 8}))
    assert (
        main(["export", str(run / "checkpoints/step-1"), "--out", str(tmp_path / "out"), "--format", "safetensors"])
        == 0
    )
    assert not (tmp_path / "out/backbone.pt").exists()
    card = json.loads((tmp_path / "out/backbone.json").read_text())
    assert card["library"] == "timm" and "patch_size=8" in card["load"]
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8, dynamic_img_size=True
    )
    model.load_state_dict(load_file(tmp_path / "out/backbone.safetensors"))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), ssltrain_backbone(run)(x), rtol=0, atol=0)
    run_load_snippet(tmp_path / "out")  # safetensors only: the snippet's first choice


def test_export_of_a_run_without_checkpoints_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "runs/empty/checkpoints").mkdir(parents=True)
    assert main(["export", str(tmp_path / "runs/empty")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_ijepa_exports_the_target_encoder_and_registers_load_into_timm(shard_dir: Path, tmp_path: Path) -> None:
    """I-JEPA's features (probes, export) are its EMA target encoder's; register tokens survive the export."""
    overrides = {
        "method.name": "ijepa",
        "model.backbone": "vit_tiny",
        "model.patch_size": 4,
        "model.registers": 2,
        "augment.global_crops.count": 1,
        "method.ijepa.predictor_depth": 1,
        "method.ijepa.predictor_width": 48,
        "method.ijepa.num_targets": 2,
        "method.ijepa.min_keep": 0,
        "method.ijepa.momentum": 0.5,  # the teacher moves, yet differs from the student
    }
    run = train(tiny_config(tmp_path, str(shard_dir), steps=2, **overrides))
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--format", "safetensors"]) == 0
    exported = load_file(tmp_path / "out/backbone.safetensors")
    state = load_checkpoint(run)["model"]
    teacher = {k.removeprefix("teacher_backbone."): v for k, v in state.items() if k.startswith("teacher_backbone.")}
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    # the teacher, not the student (the position embedding is the same fixed table in both)
    assert not torch.equal(exported["patch_embed.proj.weight"], state["backbone.patch_embed.proj.weight"])
    assert torch.equal(exported["pos_embed"], state["backbone.pos_embed"])
    run_load_snippet(tmp_path / "out")  # builds timm's ViT with reg_tokens=2 and loads the tensors strictly
