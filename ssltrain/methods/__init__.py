"""One file per method; ``build_method`` picks it from the config."""

from __future__ import annotations

from ssltrain.config import Config
from ssltrain.methods.base import Method
from ssltrain.models.backbones import build_backbone


def build_method(cfg: Config) -> Method:
    backbone, dim = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.zero_init_residual)
    name = cfg.method.name
    if name == "vicreg":
        from ssltrain.methods.vicreg import VICReg

        return VICReg(backbone, dim, list(cfg.method.projector), cfg.method.vicreg)
    if name == "simclr":
        from ssltrain.methods.simclr import SimCLR

        return SimCLR(backbone, dim, list(cfg.method.projector), cfg.method.simclr)
    raise ValueError(f"unknown method '{name}'")


__all__ = ["Method", "build_method"]
