"""One file per method, registered in :data:`METHODS` under its config name (``method.name``)."""

from __future__ import annotations

from ssltrain.config import Config
from ssltrain.methods.barlow_twins import BarlowTwins
from ssltrain.methods.base import Method
from ssltrain.methods.byol import BYOL
from ssltrain.methods.cissl import CISSL
from ssltrain.methods.diet import DIET
from ssltrain.methods.dino import DINO
from ssltrain.methods.dinov2 import DINOv2
from ssltrain.methods.dissl import DISSL
from ssltrain.methods.ijepa import IJEPA
from ssltrain.methods.lejepa import LeJEPA
from ssltrain.methods.mae import MAE
from ssltrain.methods.mocov3 import MoCoV3
from ssltrain.methods.simclr import SimCLR
from ssltrain.methods.swav import SwAV
from ssltrain.methods.vcreg import VCReg
from ssltrain.methods.vicreg import VICReg
from ssltrain.methods.vicreg_logdet import VICRegLogDet
from ssltrain.methods.vicreg_pairwise import VICRegPairwise
from ssltrain.models.backbones import build_backbone

# A new method: its file, its sub-config in config.MethodConfig (that names it), and one line here.
METHODS: dict[str, type[Method]] = {
    "vicreg": VICReg,
    "vicreg_logdet": VICRegLogDet,
    "vicreg_pairwise": VICRegPairwise,
    "vcreg": VCReg,
    "simclr": SimCLR,
    "barlow_twins": BarlowTwins,
    "diet": DIET,
    "cissl": CISSL,
    "dissl": DISSL,
    "byol": BYOL,
    "mocov3": MoCoV3,
    "dino": DINO,
    "swav": SwAV,
    "lejepa": LeJEPA,
    "ijepa": IJEPA,
    "dinov2": DINOv2,
    "mae": MAE,
}


def build_method(cfg: Config, num_samples: int | None = None) -> Method:
    """The method ``cfg.method.name`` on the configured backbone. ``num_samples`` (the dataset size) is what
    DIET's index classifier needs; other methods ignore it."""
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method '{cfg.method.name}'; choose one of {', '.join(METHODS)}")
    m = cfg.model
    backbone, dim = build_backbone(
        m.backbone,
        small_stem=m.small_stem,
        zero_init_residual=m.zero_init_residual,
        patch_size=m.patch_size,
        image_size=cfg.augment.global_crops.size,
        drop_path=m.drop_path,
        registers=m.registers,
    )
    return METHODS[cfg.method.name].from_config(cfg, backbone, dim, num_samples)


__all__ = ["METHODS", "Method", "build_method"]
