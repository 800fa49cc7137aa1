"""SwAV (Caron et al., NeurIPS 2020): swapped prediction of Sinkhorn-Knopp cluster codes, with multi-crop.

Codes for each global view come from the Sinkhorn-Knopp equipartition of the prototype scores of the batch of
all ranks (gathered without gradient: codes are targets); each other view predicts them through a softmax over
prototypes. Prototypes are renormalised to unit length before every forward and may stay frozen for the first
steps, as in the official recipe.

Small batches (the official 256-batch recipe) add a queue: the embeddings of the last ``queue_size`` samples of each
global view, scored against the current prototypes and put before the batch in Sinkhorn-Knopp, so that the
equipartition is over many more samples than the batch holds. The queue holds the gathered batches, so it is the
same on every rank and in a single process: a replicated buffer that checkpoints and resumes on any world size.
It is used once full, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssltrain.config import Config, SwAVConfig
from ssltrain.core.collectives import gather_no_grad, row_offset
from ssltrain.data.loaders import Views
from ssltrain.losses import sinkhorn_knopp, swav_loss
from ssltrain.methods.base import Method, outputs
from ssltrain.models.heads import MLP, Prototypes


class SwAV(Method):
    queue: Tensor  # buffers, with method.swav.queue_size > 0
    queue_rows: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        projector: list[int],
        cfg: SwAVConfig,
        loss_impl: str = "auto",
        num_global: int = 2,
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.prototypes = Prototypes(projector[-1], cfg.prototypes)
        self.cfg = cfg
        self._queue_active = False  # step >= queue_start_step (set by on_step_start)
        self._queue_rows_seen: int | None = None  # host copy of queue_rows, so the step never reads the device
        if cfg.queue_size:
            self.register_buffer("queue", torch.zeros(num_global, cfg.queue_size, projector[-1]))  # newest first
            self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))  # rows pushed, capped at size
            self.register_load_state_dict_post_hook(_forget_queue_rows)

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> SwAV:
        return cls(
            backbone,
            feature_dim,
            list(cfg.method.projector),
            cfg.method.swav,
            cfg.loss.impl,
            num_global=cfg.augment.global_crops.count,
        )

    def on_step_start(self, step: int, total_steps: int) -> None:
        self._queue_active = bool(self.cfg.queue_size) and step >= self.cfg.queue_start_step

    def forward(self, views: Views) -> dict[str, Tensor]:
        self.prototypes.normalize_()
        encoded, features = self.encode_views(views, self.projector)
        z = [F.normalize(x, dim=1) for x in encoded]
        scores = [self.prototypes(x) for x in z]
        num_global = len(views.global_views)
        use_queue = self._queue_full(num_global)
        codes = []
        with torch.no_grad():
            for g in range(num_global):
                local = scores[g].detach()  # sinkhorn_knopp computes in float32 at least
                batch = gather_no_grad(local)
                queued = self.prototypes(self.queue[g].to(z[g].dtype)).to(batch.dtype) if use_queue else batch[:0]
                # official order: the queue's rows, then the batch's; this rank's codes are among the batch's
                full = sinkhorn_knopp(torch.cat([queued, batch]), self.cfg.epsilon, self.cfg.sinkhorn_iterations)
                start = queued.shape[0] + row_offset(local.shape[0], local.device)
                codes.append(full[start : start + local.shape[0]])
            if self._queue_active and self.training:
                self._push([gather_no_grad(z[g].detach()) for g in range(num_global)])
        return outputs(swav_loss(scores, codes, self.cfg.temperature), z[0], features)

    def _queue_full(self, num_global: int) -> bool:
        if not self._queue_active:
            return False
        if self.queue.shape[0] != num_global:
            raise ValueError(
                f"the SwAV queue holds {self.queue.shape[0]} global views but the batch has {num_global}; "
                "method.swav.queue_size needs augment.global_crops.count to stay as it was built"
            )
        return self._rows_pushed() >= self.queue.shape[1]

    def _rows_pushed(self) -> int:
        if self._queue_rows_seen is None:  # once after building or loading: one read of the device
            self._queue_rows_seen = int(self.queue_rows)
        return self._queue_rows_seen

    @torch.no_grad()
    def _push(self, embeddings: list[Tensor]) -> None:
        """Put the gathered batch's embeddings in front of the queue; a batch with a non-finite value is left out
        (decided on the device: the step it belongs to is skipped)."""
        size = self.queue.shape[1]
        new = torch.stack(embeddings).to(self.queue.dtype)[:, :size]
        rolled = torch.cat([new, self.queue[:, : size - new.shape[1]]], dim=1)
        self.queue.copy_(torch.where(torch.isfinite(new).all(), rolled, self.queue))
        self._queue_rows_seen = min(size, self._rows_pushed() + new.shape[1])
        self.queue_rows.fill_(self._queue_rows_seen)

    def before_optimizer_step(self, step: int) -> None:
        if step < self.cfg.freeze_prototypes_steps:
            for p in self.prototypes.parameters():
                p.grad = None


def _forget_queue_rows(module: nn.Module, incompatible_keys: object) -> None:
    """A loaded state has its own queue fill: read it again at the next step."""
    if isinstance(module, SwAV):
        module._queue_rows_seen = None
