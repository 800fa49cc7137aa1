"""DINO's self-distillation loss over multi-crop views, with a centred and sharpened teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_multicrop, check_positive, compute_dtype, entropy


def dino_loss(
    student: list[Tensor],
    teacher: list[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> dict[str, Tensor]:
    """DINO self-distillation loss (Caron et al., ICCV 2021), matching the official DINOLoss.

    ``student`` is a list of V (B, K) logits (global views first, then local views); ``teacher`` a list of the
    G <= V global views' (B, K) logits; ``center`` the (K,) (or (1, K)) running centre. With
    ``P_g = softmax((teacher[g] - center) / teacher_temp)`` (detached) and
    ``log S_v = log_softmax(student[v] / student_temp)``:

    ``loss = 1/#pairs * sum_{g < G} sum_{v < V, v != g} mean_b [ -sum_k P_g[b, k] log S_v[b, k] ]``

    (the official ``total_loss / n_loss_terms``). ``teacher_entropy`` (detached) is the mean over g and b of
    ``-sum_k P_g[b, k] log P_g[b, k]``, a collapse monitor: log K for a uniform teacher, 0 for a one-hot one.
    """
    check_positive(student_temp, "student_temp")
    check_positive(teacher_temp, "teacher_temp")
    check_multicrop(student, teacher, "student", "teacher")
    k = student[0].shape[1]
    if not isinstance(center, Tensor) or center.shape not in ((k,), (1, k)):
        shape = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
        raise ValueError(f"center must have shape ({k},) or (1, {k}) to match K={k}, got {shape}")
    dtype = compute_dtype(*student, *teacher, center)
    center = center.to(dtype).reshape(1, k)

    with torch.no_grad():
        log_p_t = [F.log_softmax((t.to(dtype) - center) / teacher_temp, dim=1) for t in teacher]
        p_t = [lp.exp() for lp in log_p_t]
        teacher_entropy = torch.stack([entropy(p, lp).mean() for p, lp in zip(p_t, log_p_t)]).mean()
    log_s = [F.log_softmax(s.to(dtype) / student_temp, dim=1) for s in student]

    terms = [-(p_t[g] * log_s[v]).sum(dim=1).mean() for g in range(len(teacher)) for v in range(len(student)) if v != g]
    loss = torch.stack(terms).mean()
    return {"loss": loss, "teacher_entropy": teacher_entropy}
