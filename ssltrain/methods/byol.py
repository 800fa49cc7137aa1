"""BYOL (Grill et al., NeurIPS 2020): an online network with a predictor regresses an EMA teacher's projections.

Loss: negative cosine (``2 - 2 cos``) between the online prediction of one view and the teacher projection of
another, averaged over (global teacher view, other student view) pairs, so multi-crop works. The teacher is an EMA
of the online backbone and projector whose momentum follows a cosine from ``momentum`` to 1 over the run; it is a
function of the step, so resume is exact. No gathering: every term is a per-sample mean.

``predictor_lr_scale`` trains the predictor faster than the rest: Tian, Chen & Ganguli (ICML 2021) show that a
predictor lagging the encoder lets the embedding collapse onto few directions, and a larger predictor rate avoids it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssltrain.config import BYOLConfig, Config
from ssltrain.data.loaders import Views
from ssltrain.losses import byol_loss
from ssltrain.methods.base import Method, outputs
from ssltrain.models.ema import cosine_momentum, ema_update, frozen_copy
from ssltrain.models.heads import MLP


class BYOL(Method):
    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: BYOLConfig, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.predictor = MLP(projector[-1], list(cfg.predictor))
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_projector = frozen_copy(self.projector)
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> BYOL:
        return cls(backbone, feature_dim, list(cfg.method.projector), cfg.method.byol, cfg.loss.impl)

    def forward(self, views: Views) -> dict[str, Tensor]:
        z, features = self.encode_views(views, self.projector)
        p = [self.predictor(x) for x in z]
        num_global = len(views.global_views)
        with torch.no_grad():
            t = self.encode_views(views, self.teacher_projector, self.teacher_backbone, num_views=num_global).views
        terms = [byol_loss(p[v], t[g]) for g in range(num_global) for v in range(len(p)) if v != g]
        return outputs({"loss": torch.stack(terms).mean()}, z[0], features)

    def lr_scales(self) -> dict[str, float]:
        scale = self.cfg.predictor_lr_scale
        return {"predictor.": scale} if scale != 1.0 else {}

    def on_step_end(self, step: int, total_steps: int, gate: Tensor | None = None) -> None:
        momentum = cosine_momentum(self.cfg.momentum, step, total_steps)
        ema_update(self.teacher_backbone, self.backbone, momentum, gate)
        ema_update(self.teacher_projector, self.projector, momentum, gate)
