"""``ssltrain export``: the pretrained backbone as a plain state dict for torchvision / timm, without ssltrain.

Writes ``backbone.safetensors`` and ``backbone.pt`` (the same tensors; parameter names are torchvision's or timm's
own, so ``load_state_dict`` works on the stock model) and ``backbone.json`` saying which constructor to call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ssltrain.config import Config, from_yaml_text
from ssltrain.core.checkpoints import load_checkpoint

log = logging.getLogger("ssltrain")

FORMATS = ("safetensors", "torch")


def model_card(cfg: Config, step: int, feature_dim: int) -> dict[str, Any]:
    """How to rebuild the stock model the exported weights load into (strict=True). ``load`` is a snippet that runs
    as is, from the export directory, in a Python that has never imported ssltrain."""
    name = cfg.model.backbone
    if name.startswith("resnet"):
        code = [
            "import safetensors.torch, torch, torchvision",
            f"model = torchvision.models.{name}()",
            "model.fc = torch.nn.Identity()",
        ]
        if cfg.model.small_stem:
            code += ["model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)", "model.maxpool = torch.nn.Identity()"]
        library = "torchvision"
    else:
        timm_name = {
            "vit_tiny": "vit_tiny_patch16_224",
            "vit_small": "vit_small_patch16_224",
            "vit_base": "vit_base_patch16_224",
        }[name]
        size = cfg.augment.global_crops.size
        # with registers, ssltrain's layout is timm's vit_*_reg models': no position embedding for the prefix tokens
        registers = f", reg_tokens={cfg.model.registers}, no_embed_class=True" if cfg.model.registers else ""
        code = [
            "import safetensors.torch, timm, torch",
            f"model = timm.create_model('{timm_name}', pretrained=False, num_classes=0, "
            f"img_size={size}, patch_size={cfg.model.patch_size}, dynamic_img_size=True{registers})",
        ]
        library = "timm"
    code.append(
        "model.load_state_dict(safetensors.torch.load_file('backbone.safetensors'))  # or torch.load("
        "'backbone.pt', weights_only=True)"
    )
    return {
        "architecture": name,
        "library": library,
        "step": step,
        "feature_dim": feature_dim,
        "method": cfg.method.name,
        "normalize_mean": cfg.augment.mean,
        "normalize_std": cfg.augment.std,
        "load": "\n".join(code),
    }


def backbone_state_dict(model_state: dict[str, torch.Tensor], module: str = "backbone") -> dict[str, torch.Tensor]:
    """The tensors of ``module`` (the method's ``feature_module``: the student backbone, or I-JEPA's target encoder)
    with its prefix removed; everything else (other encoders, heads) is dropped."""
    prefix = f"{module}."
    out = {
        k.removeprefix(prefix): v.detach().contiguous().clone() for k, v in model_state.items() if k.startswith(prefix)
    }
    if not out:
        raise ValueError(f"the checkpoint's model has no '{prefix}' parameters; is it an ssltrain checkpoint?")
    return out


def export_backbone(source: Path, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Export the backbone of ``source`` (a run directory: its latest checkpoint, or a step directory)."""
    from safetensors.torch import save_file

    state = load_checkpoint(source)
    cfg = from_yaml_text(state["config"], state["path"])
    from ssltrain.methods import METHODS
    from ssltrain.models.backbones import build_backbone

    weights = backbone_state_dict(state["model"], METHODS[cfg.method.name].feature_module)
    m = cfg.model
    reference, feature_dim = build_backbone(
        m.backbone,
        small_stem=m.small_stem,
        patch_size=m.patch_size,
        image_size=cfg.augment.global_crops.size,
        registers=m.registers,
    )
    reference.load_state_dict(weights)  # strict: every tensor the architecture needs, nothing else
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "safetensors" in formats:
        path = out_dir / "backbone.safetensors"
        save_file(weights, str(path), metadata={"architecture": cfg.model.backbone, "step": str(state["step"])})
        written.append(path)
    if "torch" in formats:
        path = out_dir / "backbone.pt"
        torch.save(weights, path)
        written.append(path)
    card = out_dir / "backbone.json"
    card.write_text(json.dumps(model_card(cfg, int(state["step"]), feature_dim), indent=1))
    written.append(card)
    log.info(
        "exported the %s backbone of %s (step %d) to %s", cfg.model.backbone, state["path"], state["step"], out_dir
    )
    return written
