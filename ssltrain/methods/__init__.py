"""One file per method; ``build_method`` picks it from the config."""

from __future__ import annotations

from ssltrain.config import Config
from ssltrain.methods.base import Method
from ssltrain.models.backbones import build_backbone


def build_method(cfg: Config, num_samples: int | None = None) -> Method:
    """The method ``cfg.method.name`` on the configured backbone. ``num_samples`` (the dataset size) is what
    DIET's index classifier needs; other methods ignore it. With ``eval.online_linear`` the method carries an
    online linear probe (``eval.online_linear_classes`` must be resolved by then)."""
    method = _build(cfg, num_samples)
    if cfg.eval.online_linear:
        from ssltrain.monitors.online_linear import OnlineLinearProbe

        if cfg.eval.online_linear_classes < 1:
            raise ValueError("eval.online_linear needs the number of classes (eval.online_linear_classes)")
        method.online_probe = OnlineLinearProbe(method.feature_dim, cfg.eval.online_linear_classes)
    return method


def _build(cfg: Config, num_samples: int | None) -> Method:
    m = cfg.model
    backbone, dim = build_backbone(m.backbone, small_stem=m.small_stem, zero_init_residual=m.zero_init_residual,
                                   patch_size=m.patch_size, image_size=cfg.augment.global_crops.size,
                                   drop_path=m.drop_path)
    name, mc, impl = cfg.method.name, cfg.method, cfg.loss.impl
    projector = list(mc.projector)
    if name == "vicreg":
        from ssltrain.methods.vicreg import VICReg

        return VICReg(backbone, dim, projector, mc.vicreg, impl)
    if name == "vicreg_logdet":
        from ssltrain.methods.vicreg_logdet import VICRegLogDet

        return VICRegLogDet(backbone, dim, projector, mc.vicreg_logdet, impl)
    if name == "vicreg_pairwise":
        from ssltrain.methods.vicreg_pairwise import VICRegPairwise

        return VICRegPairwise(backbone, dim, projector, mc.vicreg_pairwise, impl)
    if name == "vcreg":
        from ssltrain.methods.vcreg import VCReg

        return VCReg(backbone, dim, projector, mc.vcreg, impl)
    if name == "simclr":
        from ssltrain.methods.simclr import SimCLR

        return SimCLR(backbone, dim, projector, mc.simclr, impl)
    if name == "barlow_twins":
        from ssltrain.methods.barlow_twins import BarlowTwins

        return BarlowTwins(backbone, dim, projector, mc.barlow_twins, impl)
    if name == "diet":
        from ssltrain.methods.diet import DIET

        if num_samples is None:
            raise ValueError("DIET needs the number of training samples (its classifier has one output per sample)")
        return DIET(backbone, dim, num_samples, mc.diet, impl)
    if name == "cissl":
        from ssltrain.methods.cissl import CISSL

        return CISSL(backbone, dim, projector, mc.cissl, impl)
    if name == "dissl":
        from ssltrain.methods.dissl import DISSL

        return DISSL(backbone, dim, projector, mc.dissl, impl)
    if name == "byol":
        from ssltrain.methods.byol import BYOL

        return BYOL(backbone, dim, projector, mc.byol, impl)
    if name == "dino":
        from ssltrain.methods.dino import DINO

        return DINO(backbone, dim, mc.dino, impl)
    if name == "swav":
        from ssltrain.methods.swav import SwAV

        return SwAV(backbone, dim, projector, mc.swav, impl, num_global=cfg.augment.global_crops.count)
    raise ValueError(f"unknown method '{name}'")


__all__ = ["Method", "build_method"]
