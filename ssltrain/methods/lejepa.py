"""LeJEPA (Balestriero & LeCun 2025, arXiv 2511.08544; rbalestr-lab/lejepa): backbone + projector trained to
predict the global views' mean embedding from every view, with SIGReg keeping the embeddings isotropic Gaussian.

No teacher, stop-gradient or schedule: one weight ``lambd`` trades prediction against SIGReg. SIGReg's random
directions are drawn per step from ``(seed, step)`` (the official code seeds them by the global step), so they are
the same on every rank and a resumed run draws the directions the uninterrupted one drew. The loss is that of the
whole batch on every rank (:func:`ssltrain.losses.lejepa_loss` all-reduces its sums with autograd); with
``loss.impl`` auto (on CUDA) or triton, SIGReg's projections and sums come from the fused kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssltrain.config import Config, LeJEPAConfig
from ssltrain.data.loaders import Views
from ssltrain.losses import dispatch
from ssltrain.losses.lejepa import sigreg_directions
from ssltrain.methods.base import Method, outputs
from ssltrain.models.heads import MLP


class LeJEPA(Method):
    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        projector: list[int],
        cfg: LeJEPAConfig,
        seed: int = 0,
        loss_impl: str = "auto",
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg
        self.seed = seed
        self.step = 0

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> LeJEPA:
        return cls(backbone, feature_dim, list(cfg.method.projector), cfg.method.lejepa, cfg.seed, cfg.loss.impl)

    def on_step_start(self, step: int, total_steps: int) -> None:
        self.step = step

    def forward(self, views: Views) -> dict[str, Tensor]:
        z, features = self.encode_views(views, self.projector)
        c = self.cfg
        dtype = torch.promote_types(z[0].dtype, torch.float32)
        directions = sigreg_directions(z[0].shape[1], c.num_slices, self.seed, self.step, z[0].device, dtype)
        terms = dispatch.lejepa(
            z, len(views.global_views), directions, c.lambd, c.num_points, c.t_max, impl=self.loss_impl
        )
        return outputs(terms, z[0], features)
