"""I-JEPA (Assran et al., CVPR 2023; facebookresearch/ijepa): from one context block of an image, a narrow ViT
predictor predicts the representations of several target blocks, as an EMA target encoder computes them from the
whole image. No augmentation beyond the crop, no negatives, no projector.

* Masks: :class:`ssltrain.data.masks.multiblock.MultiBlockMasks`, drawn in the sample stream from (seed,
  position), the context and targets truncated over the global batch (the official truncates per GPU).
* Context encoder: the backbone on the context patches only (``ViT.tokens(x, keep=context)``). ssltrain's ViT has a
  CLS token (and registers, if configured) which the official encoder has not: it is encoded with the context
  (and with the full image in the target encoder) and dropped before the predictor and the targets. Its position
  embedding is the official fixed 2-D sin-cos one (``fixed_pos_embed``; false keeps timm's learned one).
* Target encoder: an EMA copy of the backbone on the whole image; its patch tokens layer-normed (no affine), then
  taken at the target blocks. Momentum linear from ``momentum`` to ``momentum_end`` over the run (the official
  ``momentum_scheduler``), a function of the step.
* Predictor: the official ``VisionTransformerPredictor`` on timm Blocks, loss smooth L1 (losses/ijepa.py).
* Only global view 0 is used (the paper: one 224 px crop, no colour augmentation). Probes (``features``) read the
  mean of the EMA target encoder's patch tokens, as the paper evaluates the target encoder and its linear-probe
  protocol averages patch tokens; the online outputs ("embeddings", "features") are the context encoder's, pooled
  over the context patches (what the loss sees).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssltrain.config import Config, IJEPAConfig
from ssltrain.data.loaders import Views
from ssltrain.data.masks.multiblock import MultiBlockMasks, MultiBlockSpec
from ssltrain.losses.ijepa import gather_tokens, ijepa_loss, target_features
from ssltrain.methods.base import Method, outputs
from ssltrain.models.backbones import ViT
from ssltrain.models.ema import ema_update, frozen_copy
from ssltrain.models.pos_embed import freeze_sincos_pos_embed, sincos_pos_embed_2d


def linear_momentum(start: float, end: float, step: int, total_steps: int) -> float:
    """The official schedule: ``start + step * (end - start) / total`` at the update after step ``step`` (0-based)."""
    return start + step * (end - start) / max(1, total_steps)


class IJEPAPredictor(nn.Module):
    """facebookresearch/ijepa ``VisionTransformerPredictor`` (same parameter names), on timm's Blocks (pre-norm,
    LayerNorm eps 1e-6, qkv bias, MLP ratio 4): context tokens mapped to the predictor width with their positions,
    one mask token plus position per target patch, ``depth`` blocks, norm, and a projection back."""

    predictor_pos_embed: Tensor

    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("predictor_pos_embed", sincos_pos_embed_2d(width, *grid).float()[None], persistent=False)
        self.predictor_blocks = nn.ModuleList(
            [Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]  # LayerNorm eps 1e-6
        )
        self.predictor_norm = nn.LayerNorm(width, eps=1e-6)
        self.predictor_proj = nn.Linear(width, embed_dim)
        # The official init as training runs it: src/helper.py init_model re-initialises every Linear (truncated
        # normal 0.02, bias 0) and LayerNorm after construction, which undoes the predictor's fix_init_weight.
        trunc_normal_(self.mask_token, std=init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, context: Tensor, targets: Tensor) -> Tensor:
        """``x`` [B, Nc, D] context tokens at patches ``context`` [B, Nc]; ``targets`` [B, npred, Nt] -> predictions
        [npred * B, Nt, D], block-major (the official order)."""
        B, npred = targets.shape[:2]
        pos = self.predictor_pos_embed.to(x.dtype).expand(B, -1, -1)
        x = self.predictor_embed(x) + gather_tokens(pos, context)
        n_context = x.shape[1]
        pos_targets = torch.cat([gather_tokens(pos, targets[:, j]) for j in range(npred)])  # [npred * B, Nt, W]
        tokens = torch.cat([x.repeat(npred, 1, 1), self.mask_token.to(x.dtype) + pos_targets], dim=1)
        for blk in self.predictor_blocks:
            tokens = blk(tokens)
        return self.predictor_proj(self.predictor_norm(tokens)[:, n_context:])


class IJEPA(Method):
    feature_module = "teacher_backbone"  # what the paper evaluates; see features()
    backbone: ViT
    teacher_backbone: ViT

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        cfg: IJEPAConfig,
        grid: tuple[int, int],
        loss_impl: str = "auto",
    ) -> None:
        if not isinstance(backbone, ViT):
            raise ValueError(
                f"I-JEPA predicts patch tokens and needs a ViT backbone; got {type(backbone).__name__}: set "
                "model.backbone to vit_tiny, vit_small or vit_base"
            )
        super().__init__(backbone, feature_dim, loss_impl)
        self.cfg = cfg
        self.grid = grid
        # official: the encoder's head count
        heads = cfg.predictor_heads or int(cast(Any, backbone.blocks[0]).attn.num_heads)
        if cfg.predictor_width % heads or cfg.predictor_width % 4:
            raise ValueError(
                f"method.ijepa.predictor_width {cfg.predictor_width} must be a multiple of 4 and of the predictor's "
                f"{heads} heads (method.ijepa.predictor_heads; 0 takes the backbone's)"
            )
        self.predictor = IJEPAPredictor(feature_dim, grid, cfg.predictor_width, cfg.predictor_depth, heads)
        if cfg.fixed_pos_embed:
            freeze_sincos_pos_embed(backbone, grid)
        self.teacher_backbone = cast(ViT, frozen_copy(backbone))
        self.masks = MultiBlockMasks(
            MultiBlockSpec(
                grid[0],
                grid[1],
                cfg.num_targets,
                (cfg.target_scale[0], cfg.target_scale[1]),
                (cfg.target_aspect_ratio[0], cfg.target_aspect_ratio[1]),
                (cfg.context_scale[0], cfg.context_scale[1]),
                cfg.min_keep,
                cfg.allow_overlap,
            )
        )

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> IJEPA:
        if not isinstance(backbone, ViT):
            raise ValueError(
                f"method.name=ijepa needs a ViT: model.backbone is {cfg.model.backbone}; set model.backbone to "
                "vit_tiny, vit_small or vit_base"
            )
        side = cfg.augment.global_crops.size // cfg.model.patch_size
        return cls(backbone, feature_dim, cfg.method.ijepa, (side, side), cfg.loss.impl)

    def _patches(self, tokens: Tensor) -> Tensor:
        return tokens[:, self.backbone.num_prefix_tokens :]

    def features(self, images: Tensor) -> Tensor:
        """The mean of the EMA target encoder's final-normed patch tokens: the paper evaluates the target encoder
        (average-pooled), not the context encoder, which only ever sees a context block in training. At init the
        two are equal (the random-init baseline is unchanged). ``feature_module`` says so to the feature cache and
        to ``ssltrain export``."""
        return self._patches(self.teacher_backbone.tokens(images)).mean(dim=1)

    def forward(self, views: Views) -> dict[str, Tensor]:
        if "context" not in views.masks or "targets" not in views.masks:
            raise ValueError("I-JEPA needs Views.masks 'context' and 'targets' (drawn by MultiBlockMasks)")
        x = views.global_views[0]
        p_h, p_w = self.backbone.patch_embed.patch_size
        grid = (x.shape[-2] // p_h, x.shape[-1] // p_w)
        if grid != self.grid:
            raise ValueError(f"the masks are drawn for a {self.grid} patch grid; global view 0 has {grid}")
        context, targets = views.masks["context"], views.masks["targets"]
        with torch.no_grad():
            h = target_features(self._patches(self.teacher_backbone.tokens(x)), targets)
        z = self._patches(self.backbone.tokens(x, keep=context))
        terms = ijepa_loss(self.predictor(z, context, targets), h)
        pooled = z.mean(dim=1)
        return outputs(terms, pooled, pooled)

    def on_step_end(self, step: int, total_steps: int, gate: Tensor | None = None) -> None:
        momentum = linear_momentum(self.cfg.momentum, self.cfg.momentum_end, step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, momentum, gate)
