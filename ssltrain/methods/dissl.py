"""DISSL (Dubois, Hashimoto, Ermon, Liang, NeurIPS 2022): distillation with marginal-entropy maximisation.

An MLP teacher's softmax over C classes (temperature 0.5) supervises a linear student of the other view;
``-lambda * H[M]`` (M the teacher's mean distribution over the global batch) keeps the classes used evenly
(no collapse without a stop-gradient or EMA), and ``beta * CE(teacher_a, teacher_b)`` makes the teacher
invariant across views. Per-sample terms are means over the local batch (their mean over ranks is the global
mean); the marginal M is summed over ranks with autograd, so H[M] is the global batch's on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssltrain.config import DISSLConfig
from ssltrain.data.loaders.cpu import Views
from ssltrain.core.collectives import all_reduce_sum
from ssltrain.losses import dissl_loss, marginal_entropy
from ssltrain.methods.base import Method, apply_head, average_terms, view_pairs
from ssltrain.models.heads import MLP


def global_marginal_entropy(teacher_a: Tensor, teacher_b: Tensor, temperature: float) -> Tensor:
    """H[M] of the teacher's marginal over both views of the batch of all ranks."""
    logits = torch.cat([teacher_a, teacher_b])
    p = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=1)
    rows = all_reduce_sum(torch.tensor(float(p.shape[0]), device=p.device))
    marginal = all_reduce_sum(p.sum(dim=0)) / rows
    return marginal_entropy(marginal)


class DISSL(Method):
    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: DISSLConfig,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.teacher_head = MLP(feature_dim, [*projector[:-1], cfg.classes])
        self.student_head = nn.Linear(feature_dim, cfg.classes)
        self.cfg = cfg

    def forward(self, views: Views) -> dict[str, Tensor]:
        h = self.encode_views(views)
        t = apply_head(self.teacher_head, h)
        s = [self.student_head(x) for x in h]
        self.watch(h[0])
        c = self.cfg
        results = []
        for i, j in view_pairs(len(views.global_views), len(views.local_views)):
            out = dissl_loss(s[i], s[j], t[i], t[j], c.teacher_temperature, c.student_temperature, c.lambd, c.beta)
            out["marginal_entropy"] = global_marginal_entropy(t[i], t[j], c.teacher_temperature)
            out["loss"] = out["distill"] - c.lambd * out["marginal_entropy"] + c.beta * out["teacher_ce"]
            results.append(out)
        return average_terms(results)
