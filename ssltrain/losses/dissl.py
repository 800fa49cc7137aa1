"""DISSL: cross-view distillation with the teacher's marginal entropy maximised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.core.collectives import all_reduce_sum
from ssltrain.losses.common import check_positive, check_same, compute_dtype, entropy, marginal_entropy


def dissl_loss(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    teacher_temp: float = 0.5,
    student_temp: float = 1.0,
    lambd: float = 2.3,
    beta: float = 0.8,
    over_ranks: bool = False,
) -> dict[str, Tensor]:
    """DISSL, the distillation invariant SSL loss of Dubois et al. (NeurIPS 2022).

    All inputs are (N, C) logits. ``p_v = softmax(teacher_v / teacher_temp)``,
    ``log q_v = log_softmax(student_v / student_temp)``, ``CE(p, log q) = -sum_c p_c log q_c``:

    ``distill = 1/2 [ mean_i CE(p_a, log q_b) + mean_i CE(p_b, log q_a) ]`` (cross-view distillation)
    ``M = mean of the 2N rows of [p_a; p_b]`` (the teacher marginal)
    ``marginal_entropy = H[M] = -sum_c M_c log M_c``
    ``conditional_entropy = H[M|Z] = mean over the 2N rows of -sum_c p_c log p_c`` (a monitor, not in the loss)
    ``teacher_ce = 1/2 [ mean_i CE(p_a, log p_b) + mean_i CE(p_b, log p_a) ]`` (log p via log_softmax)
    ``loss = distill - lambd * marginal_entropy + beta * teacher_ce``

    No stop-gradient: gradients flow into both teacher and student logits. ``log M`` is taken of ``M`` clamped
    at the smallest positive normal number, so a class whose marginal underflows to 0 adds 0 (not NaN).

    ``over_ranks``: ``M`` is the marginal of the batch of all ranks (:func:`global_marginal_entropy`), so every
    rank's ``marginal_entropy`` is the global batch's; the other terms are means over this rank's rows.
    """
    check_positive(teacher_temp, "teacher_temp")
    check_positive(student_temp, "student_temp")
    check_same(2, student_a=student_a, student_b=student_b, teacher_a=teacher_a, teacher_b=teacher_b)
    dtype = compute_dtype(student_a, student_b, teacher_a, teacher_b)

    log_p_a = F.log_softmax(teacher_a.to(dtype) / teacher_temp, dim=1)
    log_p_b = F.log_softmax(teacher_b.to(dtype) / teacher_temp, dim=1)
    p_a, p_b = log_p_a.exp(), log_p_b.exp()
    log_q_a = F.log_softmax(student_a.to(dtype) / student_temp, dim=1)
    log_q_b = F.log_softmax(student_b.to(dtype) / student_temp, dim=1)

    def ce(p: Tensor, log_q: Tensor) -> Tensor:
        return -(p * log_q).sum(dim=1).mean()

    distill = 0.5 * (ce(p_a, log_q_b) + ce(p_b, log_q_a))
    p = torch.cat([p_a, p_b])
    conditional_entropy = entropy(p, torch.cat([log_p_a, log_p_b])).mean()
    teacher_ce = 0.5 * (ce(p_a, log_p_b) + ce(p_b, log_p_a))
    if over_ranks:
        h_marginal = global_marginal_entropy(teacher_a, teacher_b, teacher_temp)
    else:
        h_marginal = marginal_entropy(p.mean(dim=0))
    loss = distill - lambd * h_marginal + beta * teacher_ce
    return {
        "loss": loss,
        "distill": distill,
        "marginal_entropy": h_marginal,
        "conditional_entropy": conditional_entropy,
        "teacher_ce": teacher_ce,
    }


def global_marginal_entropy(teacher_a: Tensor, teacher_b: Tensor, temperature: float) -> Tensor:
    """H[M] of the teacher's marginal over both views of the batch of all ranks (summed over ranks with autograd,
    so every rank holds the global batch's value)."""
    logits = torch.cat([teacher_a, teacher_b])
    p = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=1)
    rows = all_reduce_sum(torch.tensor(float(p.shape[0]), device=p.device))
    marginal = all_reduce_sum(p.sum(dim=0)) / rows
    return marginal_entropy(marginal)
