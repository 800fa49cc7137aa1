"""DINOv2 (Oquab et al. 2023; facebookresearch/dinov2, dinov2/train/ssl_meta_arch.py): DINO on the CLS token + the
iBOT loss on masked patch tokens + KoLeo on the student's CLS, with a Sinkhorn-Knopp (or centred softmax) EMA teacher.

Per step (``forward_backward``): the teacher (EMA of backbone and head) encodes the global crops unmasked; its CLS
outputs become targets for every other student crop (DINO term), its patch outputs at the masked positions targets
for the student's masked patches (iBOT term). The student encodes the global crops with block masks
(:class:`~ssltrain.data.masks.blocks.BlockMasks`, patch embeddings replaced by a learned mask token) and the local
crops unmasked; one head (or a separate iBOT head) maps CLS and masked patch tokens to prototype scores. Loss:
``dino_loss_weight * DINO + koleo_loss_weight * sum_g KoLeo(student CLS of global crop g) + ibot_loss_weight * iBOT``.

Deviations: KoLeo is per GPU in the official code; here it is over the global batch (the student CLS tokens gathered
with gradient), so it equals the single-process value on any world size. With ``centering: centering`` the iBOT centre
moves to the mean over all ranks' masked patches (official: the mean of the per-rank means). Mask draws: see
ssltrain/data/masks/blocks.py. The features for the online probe and the monitors' embeddings are the student's CLS of
global view 0 as the loss encoded it (with its mask, on the rows that have one).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from ssltrain.config import Config, DINOv2Config
from ssltrain.core.collectives import all_reduce_sum, gather
from ssltrain.data.loaders import Views
from ssltrain.data.masks.blocks import BlockMasks
from ssltrain.losses.common import entropy
from ssltrain.losses.dinov2 import (
    dinov2_dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)
from ssltrain.methods.base import outputs
from ssltrain.methods.dino import DINO
from ssltrain.models.backbones import ViT
from ssltrain.models.ema import cosine_momentum, ema_update, frozen_copy
from ssltrain.models.heads import DINOHead

CENTERINGS = ("sinkhorn_knopp", "centering")


class DINOv2(DINO):
    ibot_center: Tensor  # a buffer: the EMA centre of the iBOT teacher (centering: centering only)
    cfg: DINOv2Config

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        cfg: DINOv2Config,
        grid: tuple[int, int],
        num_global: int = 2,
        loss_impl: str = "auto",
    ) -> None:
        if not isinstance(backbone, ViT):
            raise ValueError(
                "method dinov2 masks patch tokens and needs a ViT: set model.backbone to vit_tiny, vit_small or "
                f"vit_base (got a {type(backbone).__name__})"
            )
        if cfg.centering not in CENTERINGS:
            raise ValueError(f"method.dinov2.centering must be one of {', '.join(CENTERINGS)}, got '{cfg.centering}'")
        super().__init__(backbone, feature_dim, cfg, loss_impl)
        self.mask_token = nn.Parameter(torch.zeros(1, feature_dim))  # official: zeros, [1, D]
        self.ibot_head: DINOHead | None = None
        self.teacher_ibot_head: nn.Module | None = None
        ibot_dim = cfg.out_dim
        if cfg.ibot_separate_head:
            self.ibot_head = DINOHead(
                feature_dim, cfg.ibot_out_dim, cfg.ibot_hidden_dim, cfg.ibot_bottleneck_dim,
                norm_last_layer=cfg.norm_last_layer, use_bn=cfg.use_bn,
            )  # fmt: skip
            self.teacher_ibot_head = frozen_copy(self.ibot_head)
            ibot_dim = cfg.ibot_out_dim
        self.register_buffer("ibot_center", torch.zeros(ibot_dim))
        lo, hi = cfg.mask_ratio_min_max
        self.masks = BlockMasks(grid, num_global, cfg.mask_sample_probability, (lo, hi))
        self.train(self.training)  # the teachers in eval mode from the start

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> DINOv2:
        side = cfg.augment.global_crops.size // cfg.model.patch_size
        grid = (side, side)
        return cls(backbone, feature_dim, cfg.method.dinov2, grid, cfg.augment.global_crops.count, cfg.loss.impl)

    def train(self, mode: bool = True) -> DINOv2:
        """Teachers always in eval mode (official ``SSLMetaArch.train``): no stochastic depth in the teacher."""
        super().train(mode)
        for teacher in (self.teacher_backbone, self.teacher_head, self.teacher_ibot_head):
            if teacher is not None:
                teacher.eval()
        return self

    def lr_scales(self) -> dict[str, float]:
        """The official layer-wise decay (dinov2/utils/param_groups.py ``get_vit_lr_decay_rate``) and patch-embedding
        multiplier: ``decay^(depth + 1 - layer)``, layer 0 the embeddings (and the mask token), block i layer i + 1,
        the final norm depth + 1; the heads keep the base rate."""
        c = self.cfg
        depth = len(cast(nn.Sequential, self.backbone.blocks))
        first = c.layerwise_decay ** (depth + 1)
        scales = {f"backbone.{name}": first for name in ("cls_token", "reg_token", "pos_embed", "patch_embed.")}
        scales["mask_token"] = first
        scales["backbone.patch_embed."] = first * c.patch_embed_lr_mult
        scales |= {f"backbone.blocks.{i}.": c.layerwise_decay ** (depth - i) for i in range(depth)}
        return {k: v for k, v in scales.items() if v != 1.0}

    def _heads(self, student: bool) -> tuple[nn.Module, nn.Module | None]:
        """(CLS head, separate iBOT head or None) of the student or the teacher."""
        if student:
            return self.head, self.ibot_head
        return self.teacher_head, self.teacher_ibot_head

    def _apply_heads(self, student: bool, cls_tokens: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Head outputs of the CLS rows and the masked patch rows: one call of the shared head over both (as the
        official), or each its own head."""
        head, ibot_head = self._heads(student)
        if ibot_head is None:
            out = head(torch.cat([cls_tokens, patches]))
            return out[: cls_tokens.shape[0]], out[cls_tokens.shape[0] :]
        return head(cls_tokens), ibot_head(patches)

    @torch.no_grad()
    def _teacher_targets(self, images: Tensor, masks: Tensor, num_global: int) -> tuple[list[Tensor], Tensor, Tensor]:
        """Teacher targets of the global crops' CLS (one per crop), of the masked patches, and the CLS entropy."""
        teacher_backbone: ViT = self.teacher_backbone  # type: ignore[assignment]
        tokens = teacher_backbone.tokens(images)
        patches = tokens[:, teacher_backbone.num_prefix_tokens :][masks]
        cls_out, patch_out = self._apply_heads(False, tokens[:, 0], patches)
        temp = self.teacher_temperature
        if self.cfg.centering == "sinkhorn_knopp":
            cls_t = sinkhorn_knopp_teacher(cls_out, temp, self.cfg.sinkhorn_iterations)
            patch_t = sinkhorn_knopp_teacher(patch_out, temp, self.cfg.sinkhorn_iterations)
        else:
            cls_t = softmax_center_teacher(cls_out, self.center, temp)
            patch_t = softmax_center_teacher(patch_out, self.ibot_center, temp)
            self._update_center([cls_out])
            _move_center(self.ibot_center, patch_out, self.cfg.center_momentum)
        cls_entropy = entropy(cls_t, cls_t.clamp(min=1e-30).log()).mean()
        return list(cls_t.chunk(num_global)), patch_t, cls_entropy

    def forward(self, views: Views) -> dict[str, Tensor]:
        c = self.cfg
        num_global = len(views.global_views)
        if "patches" not in views.masks:
            raise ValueError("dinov2 needs the block masks in views.masks['patches'] (drawn by the engine)")
        masks = views.masks["patches"].to(views.global_views[0].device)  # [B, G, N]
        if masks.shape[1] != num_global:
            raise ValueError(f"masks for {masks.shape[1]} global views, the batch has {num_global}")
        masks = masks.transpose(0, 1).reshape(-1, masks.shape[-1])  # crop-major rows, as the global batch
        images = torch.cat(views.global_views)
        targets, patch_targets, teacher_entropy = self._teacher_targets(images, masks, num_global)

        backbone: ViT = self.backbone  # type: ignore[assignment]
        tokens = backbone.tokens(images, mask=masks, mask_token=self.mask_token[0])
        cls_tokens = tokens[:, 0]
        patches = tokens[:, backbone.num_prefix_tokens :][masks]
        cls_out, patch_out = self._apply_heads(True, cls_tokens, patches)
        local_out: list[Tensor] = []
        if views.local_views:
            local_out = list(self.head(backbone(torch.cat(views.local_views))).chunk(len(views.local_views)))

        dino = dinov2_dino_loss(list(cls_out.chunk(num_global)), local_out, targets, c.student_temperature)
        ibot = ibot_patch_loss(patch_out, patch_targets, masks, c.student_temperature)
        # KoLeo per global crop over the whole batch: no pair of a sample's own crops (official comment)
        koleo = torch.stack([koleo_loss(gather(x)) for x in cls_tokens.chunk(num_global)]).sum()
        loss = c.dino_loss_weight * dino + c.koleo_loss_weight * koleo + c.ibot_loss_weight * ibot
        terms = {
            "loss": loss,
            "dino": dino.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach() / num_global,
            "teacher_entropy": teacher_entropy,
        }
        first = cls_tokens[: views.global_views[0].shape[0]]
        return outputs(terms, first, first)

    def before_optimizer_step(self, step: int) -> None:
        super().before_optimizer_step(step)
        if self.ibot_head is not None and step < self.cfg.freeze_last_layer_steps:
            for p in self.ibot_head.last_layer.parameters():
                p.grad = None

    def on_step_end(self, step: int, total_steps: int, gate: Tensor | None = None) -> None:
        super().on_step_end(step, total_steps, gate)
        if self.ibot_head is not None and self.teacher_ibot_head is not None:
            momentum = cosine_momentum(self.cfg.momentum, step, total_steps)
            ema_update(self.teacher_ibot_head, self.ibot_head, momentum, gate)


@torch.no_grad()
def _move_center(center: Tensor, rows: Tensor, momentum: float) -> None:
    """``center <- m * center + (1 - m) * mean of rows over all ranks``; left as is when the step's rows are not
    finite (see DINO._update_center) or there are none."""
    total = all_reduce_sum(rows.to(center.dtype).sum(dim=0))
    count = all_reduce_sum(torch.tensor(float(rows.shape[0]), dtype=center.dtype, device=center.device))
    moved = center * momentum + total / count.clamp(min=1) * (1 - momentum)
    keep = torch.isfinite(moved).all() & (count > 0)
    center.copy_(torch.where(keep, moved, center))
