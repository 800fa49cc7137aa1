from ssltrain.models.backbones import BACKBONES, ViT, build_backbone
from ssltrain.models.heads import MLP, DINOHead, Prototypes

__all__ = ["BACKBONES", "DINOHead", "MLP", "Prototypes", "ViT", "build_backbone"]
