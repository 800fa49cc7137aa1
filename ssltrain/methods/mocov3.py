"""MoCo v3 (Chen, Xie & He, ICCV 2021; facebookresearch/moco-v3): contrastive learning against a momentum encoder.

The query encoder (backbone, projector, predictor) predicts the momentum encoder's projection of the other view:
InfoNCE over the keys of the whole global batch, gathered from all ranks without gradient (the keys come from the
momentum encoder), scaled by ``2 t`` and summed over the two directions as in the official code. Each view goes
through the encoders on its own, as there, so BatchNorm statistics are per view.

With more than two views, queries of every view are scored against the keys of every other global view; the loss
is twice the mean over those pairs, so two views give exactly the official sum. The momentum encoder is an EMA of
the backbone and projector whose momentum follows a cosine from ``momentum`` to 1, a function of the step, so
resume is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssltrain.config import Config, MoCoV3Config
from ssltrain.core.collectives import gather_no_grad, row_offset
from ssltrain.data.loaders import Views
from ssltrain.losses.mocov3 import moco_contrastive_loss
from ssltrain.methods.base import Method, outputs
from ssltrain.models.ema import cosine_momentum, ema_update, frozen_copy
from ssltrain.models.heads import MLP


class MoCoV3(Method):
    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: MoCoV3Config, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector, last_bn=cfg.projector_last_bn)
        self.predictor = MLP(projector[-1], list(cfg.predictor), last_bn=cfg.predictor_last_bn)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_projector = frozen_copy(self.projector)
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> MoCoV3:
        return cls(backbone, feature_dim, list(cfg.method.projector), cfg.method.mocov3, cfg.loss.impl)

    def forward(self, views: Views) -> dict[str, Tensor]:
        images = [*views.global_views, *views.local_views]
        if not views.global_views or len(images) < 2:
            raise ValueError("MoCo v3 needs a global view and at least one other view")
        features = self.backbone(images[0])
        z = [self.projector(features)] + [self.projector(self.backbone(x)) for x in images[1:]]
        q = [self.predictor(x) for x in z]
        num_global = len(views.global_views)
        with torch.no_grad():
            keys = [gather_no_grad(self.teacher_projector(self.teacher_backbone(x))) for x in images[:num_global]]
        offset = row_offset(q[0].shape[0], q[0].device)
        t = self.cfg.temperature
        terms = [
            moco_contrastive_loss(q[v], keys[g], t, offset) for g in range(num_global) for v in range(len(q)) if v != g
        ]
        loss = 2 * torch.stack([r["loss"] for r in terms]).mean()
        accuracy = torch.stack([r["accuracy"] for r in terms]).mean()
        return outputs({"loss": loss, "accuracy": accuracy}, z[0], features)

    def on_step_end(self, step: int, total_steps: int, gate: Tensor | None = None) -> None:
        momentum = cosine_momentum(self.cfg.momentum, step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, momentum, gate)
        ema_update(self.teacher_projector, self.projector, momentum, gate)
