from ssltrain.models.backbones import build_backbone
from ssltrain.models.heads import MLP

__all__ = ["build_backbone", "MLP"]
