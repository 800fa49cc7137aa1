"""SwAV (Caron et al., NeurIPS 2020): swapped prediction of Sinkhorn-Knopp cluster codes, with multi-crop.

Codes for each global view come from the Sinkhorn-Knopp equipartition of the prototype scores of the batch of
all ranks (gathered without gradient: codes are targets); each other view predicts them through a softmax over
prototypes. Prototypes are renormalised to unit length before every forward and may stay frozen for the first
steps, as in the official recipe. (The official queue for small batches is not implemented.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssltrain.config import SwAVConfig
from ssltrain.data.loader import Views
from ssltrain.distributed import gather_no_grad, row_offset
from ssltrain.losses import sinkhorn_knopp, swav_loss
from ssltrain.methods.base import Method
from ssltrain.models.heads import MLP, Prototypes


class SwAV(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: SwAVConfig,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.prototypes = Prototypes(projector[-1], cfg.prototypes)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        self.prototypes.normalize_()
        z = [F.normalize(x, dim=1) for x in self.encode_views(views, self.projector)]
        self.watch(z[0])
        scores = [self.prototypes(x) for x in z]
        codes = []
        with torch.no_grad():
            for g in range(len(views.global_views)):
                local = scores[g].detach().float()
                full = sinkhorn_knopp(gather_no_grad(local), self.cfg.epsilon, self.cfg.sinkhorn_iterations)
                start = row_offset(local.shape[0], local.device)
                codes.append(full[start : start + local.shape[0]])
        return swav_loss(scores, codes, self.cfg.temperature)

    def before_optimizer_step(self, step: int) -> None:
        if step < self.cfg.freeze_prototypes_steps:
            for p in self.prototypes.parameters():
                p.grad = None
