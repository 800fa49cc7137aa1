"""CISSL (Dubois, Hashimoto, Ermon, Liang, NeurIPS 2022): contrastive learning with asymmetric heads.

The student head is linear (probe-shaped: what a downstream linear probe can express), the teacher head is the
MLP projector; logits compare every student output with every teacher output of the 2B views, self-pairs
included, and each row puts half its target mass on each of its two positives. Rows are split over ranks as in
SimCLR.

``head_batchnorm`` (default, as the released code has it) ends both heads in a BatchNorm1d over all views' outputs
at once (the released code normalises the 2B batch of both views together); off, the heads end in their Linear.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import CISSLConfig, Config
from ssltrain.core.collectives import gather, local_rows, world_size
from ssltrain.data.loaders import Views
from ssltrain.losses import dispatch
from ssltrain.methods.base import Method, apply_head, average_terms, outputs, view_pairs
from ssltrain.models.heads import MLP


class CISSL(Method):
    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: CISSLConfig, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.teacher_head = MLP(feature_dim, projector)
        self.student_head = nn.Linear(feature_dim, projector[-1])
        width = projector[-1]
        self.teacher_norm: nn.Module = nn.BatchNorm1d(width) if cfg.head_batchnorm else nn.Identity()
        self.student_norm: nn.Module = nn.BatchNorm1d(width) if cfg.head_batchnorm else nn.Identity()
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> CISSL:
        return cls(backbone, feature_dim, list(cfg.method.projector), cfg.method.cissl, cfg.loss.impl)

    def forward(self, views: Views) -> dict[str, Tensor]:
        h, features = self.encode_views(views)
        t = apply_head(self.teacher_head, h)
        s = [self.student_head(x) for x in h]
        if self.cfg.head_batchnorm:
            t, s = apply_head(self.teacher_norm, t), apply_head(self.student_norm, s)
        embeddings = s[0]
        rows = local_rows(h[0].shape[0], h[0].device) if world_size() > 1 else None
        s, t = [gather(x) for x in s], [gather(x) for x in t]
        pairs = view_pairs(len(views.global_views), len(views.local_views))
        terms = average_terms(
            [
                dispatch.cissl(s[i], s[j], t[i], t[j], self.cfg.temperature, rows=rows, impl=self.loss_impl)
                for i, j in pairs
            ]
        )
        return outputs(terms, embeddings, features)
