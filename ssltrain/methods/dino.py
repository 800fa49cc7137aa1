"""DINO (Caron et al., ICCV 2021): self-distillation with multi-crop, a centred and sharpened EMA teacher.

The student sees every crop, the teacher only the global ones; each student view is trained towards the teacher
distribution of every other global view. The teacher's outputs are centred (the centre is an EMA of the teacher's
mean output over the global batch, all ranks) and sharpened (temperature warmed up linearly from
``warmup_teacher_temperature``), which together prevent collapse. Teacher momentum follows a cosine to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssltrain.config import Config, DINOConfig
from ssltrain.core.collectives import all_reduce_sum
from ssltrain.data.loaders import Views
from ssltrain.losses import dino_loss
from ssltrain.methods.base import Method, outputs
from ssltrain.models.ema import cosine_momentum, ema_update, frozen_copy
from ssltrain.models.heads import DINOHead


class DINO(Method):
    center: Tensor  # a buffer: the EMA of the teacher's mean output

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: DINOConfig, loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.head = DINOHead(
            feature_dim,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            norm_last_layer=cfg.norm_last_layer,
            use_bn=cfg.use_bn,
        )
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.cfg = cfg
        self.teacher_temperature = cfg.warmup_teacher_temperature

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> DINO:
        return cls(backbone, feature_dim, cfg.method.dino, cfg.loss.impl)

    def on_step_start(self, step: int, total_steps: int) -> None:
        c = self.cfg
        if step < c.warmup_teacher_temperature_steps:
            frac = step / c.warmup_teacher_temperature_steps
            rise = c.teacher_temperature - c.warmup_teacher_temperature
            self.teacher_temperature = c.warmup_teacher_temperature + frac * rise
        else:
            self.teacher_temperature = c.teacher_temperature

    def forward(self, views: Views) -> dict[str, Tensor]:
        h, features = self.encode_views(views)
        student = [self.head(x) for x in h]
        with torch.no_grad():
            teacher = self.encode_views(
                views, self.teacher_head, self.teacher_backbone, num_views=len(views.global_views)
            ).views
        terms = dino_loss(student, teacher, self.center, self.cfg.student_temperature, self.teacher_temperature)
        self._update_center(teacher)
        return outputs(terms, h[0], features)

    @torch.no_grad()
    def _update_center(self, teacher: list[Tensor]) -> None:
        stacked = torch.cat(teacher).to(self.center.dtype)
        total = all_reduce_sum(stacked.sum(dim=0))
        count = all_reduce_sum(torch.tensor(float(stacked.shape[0]), device=stacked.device))
        m = self.cfg.center_momentum
        moved = self.center * m + total / count * (1 - m)
        # A non-finite teacher batch (its step is skipped, see ssltrain/engine/guard.py) must not poison the centre
        # for good; decided on the device, the same on every rank (the sums are all-reduced).
        self.center.copy_(torch.where(torch.isfinite(moved).all(), moved, self.center))

    def before_optimizer_step(self, step: int) -> None:
        if step < self.cfg.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_step_end(self, step: int, total_steps: int, gate: Tensor | None = None) -> None:
        momentum = cosine_momentum(self.cfg.momentum, step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, momentum, gate)
        ema_update(self.teacher_head, self.head, momentum, gate)
