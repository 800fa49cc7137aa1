"""Backbones with the classifier removed: they map images to a feature vector.

ResNets come from torchvision, ViTs from timm. timm's ``VisionTransformer`` is well kept, matches the reference
ViT/DeiT/DINO layout (pre-norm blocks, CLS token, learned absolute position embeddings, final LayerNorm), and has
position-embedding interpolation built in (``dynamic_img_size``), which multi-crop needs: 224 px global crops and
96 px local crops go through the same network in one step. Nothing is downloaded; weights are randomly initialised.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision import models

from ssltrain.config import VIDEO_BACKBONES

RESNETS = {"resnet18": models.resnet18, "resnet50": models.resnet50}

# name -> (embed_dim, depth, num_heads): ViT-Ti, ViT-S, ViT-B (Dosovitskiy et al. 2021; DeiT for Ti/S).
VITS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}

BACKBONES: tuple[str, ...] = (*RESNETS, *VITS)

# Video backbones take clips [B, 3, T, H, W] (data.modality=video, data.video.mode=clips); kept apart from BACKBONES,
# which take images. R3D-18 (Tran et al. 2018): 3D convolutions throughout, 512-d pooled features.
VIDEO_RESNETS = {"r3d_18": models.video.r3d_18}


class ViT(VisionTransformer):
    """timm's ``VisionTransformer`` returning the final-normed CLS token, for inputs of any patch-divisible size.

    Built with ``dynamic_img_size=True``: the stored position embedding belongs to the ``image_size`` grid and
    is resampled on the fly for any other grid (timm's ``resample_abs_pos_embed``: ``F.interpolate`` bicubic with
    ``antialias=True``, i.e. PIL's a=-0.5 kernel, smoothing when shrinking; the CLS entry is kept as is); at the
    native grid it is used unchanged. This is not bit-equal to the DINO reference (a=-0.75, no antialias), which
    only matters when loading DINO weights trained at another grid, not when training from scratch. An input
    whose height or width is not a multiple of the patch size raises ``ValueError`` (timm itself would raise a
    bare ``AssertionError``; the padding alternative, ``dynamic_img_pad``, is off so crops are never silently
    padded). Rectangular inputs are fine. Parameter names equal timm's, so timm state dicts load as they are.
    """

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_input(x)
        return super().forward(x, *args, **kwargs)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"a ViT takes (B, C, H, W) images, got shape {tuple(x.shape)}")
        p_h, p_w = self.patch_embed.patch_size
        h, w = x.shape[-2:]
        if h % p_h or w % p_w:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the ViT patch size {p_h}x{p_w}; "
                "choose crop sizes that are multiples of model.patch_size"
            )

    def tokens(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """All output tokens, final-normed: ``[B, num_prefix_tokens + patches, D]`` (CLS, registers, then patches in
        row-major grid order), what the masked and predictive methods read.

        ``mask`` ([B, patches] bool) replaces those patch embeddings by ``mask_token`` ([D]) before the position
        embedding is added (iBOT/DINOv2, BEiT); ``keep`` ([B, K] patch indices) encodes only those patches, after
        their position embedding (MAE's visible patches, I-JEPA's context): the output then holds K patch tokens in
        ``keep``'s order.
        """
        self._check_input(x)
        t = self.patch_embed(x)  # [B, H, W, D]: dynamic_img_size keeps the grid
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs the mask_token that replaces the masked patches")
            t = torch.where(mask.view(*t.shape[:-1], 1), mask_token.to(t.dtype), t)
        t = self._pos_embed(t)  # [B, prefix + H*W, D]
        if keep is not None:
            prefix = self.num_prefix_tokens
            patches = t[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
            t = torch.cat([t[:, :prefix], patches], dim=1)
        t = self.norm_pre(self.patch_drop(t))
        return self.norm(self.blocks(t))


def _build_vit(
    name: str, patch_size: int, image_size: int, drop_path: float, registers: int = 0
) -> tuple[nn.Module, int]:
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(
            f"image_size {image_size} must be a positive multiple of patch_size {patch_size} "
            "(it sets the grid the position embedding is stored at)"
        )
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    if registers < 0:
        raise ValueError(f"registers must be >= 0, got {registers}")
    dim, depth, heads = VITS[name]
    net = ViT(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        drop_path_rate=drop_path,
        reg_tokens=registers,
        # With registers, timm's layout (its vit_*_reg models): position embeddings for the patches only, the CLS
        # and register tokens concatenated after; DINOv2 also embeds the CLS position.
        no_embed_class=registers > 0,
    )
    return net, net.num_features


def build_backbone(
    name: str,
    small_stem: bool = False,
    zero_init_residual: bool = False,
    patch_size: int = 16,
    image_size: int = 224,
    drop_path: float = 0.0,
    registers: int = 0,
) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)`` for one of ``BACKBONES``.

    ResNets: ``small_stem`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv, which keeps the spatial resolution
    of 32-64 px (CIFAR-style) images at a multiple of the compute. ``zero_init_residual`` (the large-batch SSL
    recipes' choice) starts every residual branch at zero; on small images such a network starts as little more
    than strided samples of the stem, so it is off by default (docs/results.md has both measurements).
    ``patch_size`` and ``image_size`` are ignored (ResNets take any size); ``drop_path > 0`` is an error (no
    stochastic depth).

    ViTs (``vit_tiny`` 192/12/3, ``vit_small`` 384/12/6, ``vit_base`` 768/12/12 for dim/depth/heads):
    ``patch_size`` x ``patch_size`` patches, position embeddings stored for an ``image_size`` grid and
    interpolated for other crop sizes (see ``ViT``), ``drop_path`` the stochastic-depth rate (linearly rising
    over the blocks, as in timm/DINO), ``registers`` extra tokens (Darcet et al. 2024; DINOv2 with registers). The
    feature is the final-normed CLS token; :meth:`ViT.tokens` gives every token, with masking. ``image_size`` must be a
    multiple of ``patch_size``; ``small_stem``/``zero_init_residual`` are ResNet options and an error here.
    """
    if registers and name not in VITS:
        raise ValueError(f"registers apply to ViTs only, not to {name} (got {registers})")
    if name in RESNETS:
        if drop_path:
            raise ValueError(f"drop_path applies to ViTs only; {name} has no stochastic depth (got {drop_path})")
        net = RESNETS[name](weights=None, zero_init_residual=zero_init_residual)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if name in VITS:
        for flag, value in (("small_stem", small_stem), ("zero_init_residual", zero_init_residual)):
            if value:
                raise ValueError(f"{flag} applies to ResNets only, not to {name}")
        return _build_vit(name, patch_size, image_size, drop_path, registers)
    if name in VIDEO_RESNETS:  # clips [B, 3, T, H, W]; any T, H, W (adaptive pooling)
        for flag, setting in (("small_stem", float(small_stem)), ("drop_path", drop_path)):
            if setting:
                raise ValueError(f"{flag} applies to image backbones only, not to {name}")
        net = VIDEO_RESNETS[name](weights=None, zero_init_residual=zero_init_residual)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join((*BACKBONES, *VIDEO_BACKBONES))}")


__all__ = ["BACKBONES", "ViT", "build_backbone"]
