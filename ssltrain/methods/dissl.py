"""DISSL (Dubois, Hashimoto, Ermon, Liang, NeurIPS 2022): distillation with marginal-entropy maximisation.

An MLP teacher's softmax over C classes (temperature 0.5) supervises a linear student of the other view;
``-lambda * H[M]`` (M the teacher's mean distribution over the global batch) keeps the classes used evenly
(no collapse without a stop-gradient or EMA), and ``beta * CE(teacher_a, teacher_b)`` makes the teacher
invariant across views. Per-sample terms are means over the local batch (their mean over ranks is the global
mean); the marginal M is summed over ranks with autograd, so H[M] is the global batch's on every rank.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssltrain.config import Config, DISSLConfig
from ssltrain.data.loaders import Views
from ssltrain.losses import dissl_loss
from ssltrain.methods.base import Method, apply_head, average_terms, outputs, view_pairs
from ssltrain.models.heads import MLP


class DISSL(Method):
    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: DISSLConfig, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.teacher_head = MLP(feature_dim, [*projector[:-1], cfg.classes])
        self.student_head = nn.Linear(feature_dim, cfg.classes)
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> DISSL:
        return cls(backbone, feature_dim, list(cfg.method.projector), cfg.method.dissl, cfg.loss.impl)

    def forward(self, views: Views) -> dict[str, Tensor]:
        h, features = self.encode_views(views)
        t = apply_head(self.teacher_head, h)
        s = [self.student_head(x) for x in h]
        c = self.cfg
        results = []
        for i, j in view_pairs(len(views.global_views), len(views.local_views)):
            results.append(
                dissl_loss(
                    s[i],
                    s[j],
                    t[i],
                    t[j],
                    c.teacher_temperature,
                    c.student_temperature,
                    c.lambd,
                    c.beta,
                    over_ranks=True,
                )
            )
        return outputs(average_terms(results), h[0], features)
