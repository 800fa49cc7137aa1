"""DINOv2's losses (Oquab et al. 2023; facebookresearch/dinov2, dinov2/loss/): the DINO cross-entropy over crop
pairs with its official normalisation, the iBOT masked-patch loss, KoLeo, and the two ways of making teacher targets
(Sinkhorn-Knopp over the global batch, or a softmax around an EMA centre)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.core.collectives import all_reduce_max, all_reduce_sum
from ssltrain.losses.common import check_positive, compute_dtype


@torch.no_grad()
def sinkhorn_knopp_teacher(logits: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp over the rows of every rank (official ``sinkhorn_knopp_teacher`` of
    DINOLoss and iBOTPatchLoss, with their all-reduces): ``Q = exp(logits / T)^T`` (K x B), ``Q /= sum Q``, then
    ``iterations`` times ``Q /= row sums`` (all ranks), ``Q /= K``, ``Q /= column sums``, ``Q /= B``; returns
    ``(Q * B)^T``, rows summing to 1. ``B`` is the row count over all ranks (iBOT's all-reduced count; DINO's
    official ``rows x world size`` is the same with equal batches). The global maximum is subtracted before ``exp``
    (it cancels in the first normalisation). A rank may hold no rows (no masked patch). No gradient."""
    check_positive(temperature, "temperature")
    if logits.dim() != 2:
        raise ValueError(f"teacher logits must be 2-D (rows, K), got shape {tuple(logits.shape)}")
    x = logits.to(compute_dtype(logits)) / temperature
    top = x.amax() if x.numel() else x.new_tensor(float("-inf"))
    q = torch.exp(x - all_reduce_max(top)).T
    k = q.shape[0]
    cols = all_reduce_sum(x.new_tensor(float(q.shape[1])))
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / cols
    return (q * cols).T


@torch.no_grad()
def softmax_center_teacher(logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Teacher targets ``softmax((logits - center) / T)`` (official ``softmax_center_teacher``). No gradient."""
    check_positive(temperature, "temperature")
    dtype = compute_dtype(logits, center)
    return F.softmax((logits.to(dtype) - center.to(dtype)) / temperature, dim=-1)


def _cross_entropy(teacher: Tensor, student: Tensor, student_temp: float) -> Tensor:
    """Per row ``sum_k t_k log softmax(s / T_s)_k`` (the official ``lossfunc``, without the minus)."""
    dtype = compute_dtype(teacher, student)
    return (teacher.to(dtype) * F.log_softmax(student.to(dtype) / student_temp, dim=-1)).sum(dim=-1)


def dinov2_dino_loss(
    student_global: list[Tensor], student_local: list[Tensor], teacher: list[Tensor], student_temp: float = 0.1
) -> Tensor:
    """The DINO term as ``SSLMetaArch.forward_backward`` sums it: every student crop v against the teacher
    targets of every global crop g != v, ``mean_b [-sum_k t_g log S_v]``, summed and divided by
    ``G (G - 1) + max(G L, 1)`` (G global, L local crops; the official's ``n_global_crops_loss_terms +
    n_local_crops_loss_terms``, so with no local crop the divisor is G (G - 1) + 1, not the pair count).
    ``teacher`` holds G (B, K) target distributions (detached), the students (B, K) logits."""
    check_positive(student_temp, "student_temp")
    g_count, l_count = len(student_global), len(student_local)
    if len(teacher) != g_count or g_count < 1:
        raise ValueError(f"one teacher target per global crop: {len(teacher)} targets, {g_count} global crops")
    students = [*student_global, *student_local]
    terms = [
        -_cross_entropy(teacher[g].detach(), s, student_temp).mean()
        for g in range(g_count)
        for v, s in enumerate(students)
        if v != g
    ]
    if not terms:
        raise ValueError("the DINO term needs two crops at least")
    return torch.stack(terms).sum() / (g_count * (g_count - 1) + max(g_count * l_count, 1))


def ibot_patch_loss(student: Tensor, teacher: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """iBOT's masked-patch loss (official ``iBOTPatchLoss.forward_masked`` with the collate's ``masks_weight``).

    ``student`` (M, K) logits and ``teacher`` (M, K) targets of the M masked patches, in the row-major order of
    ``masks[masks]``; ``masks`` the (R, N) bool masks of the R global-crop rows. Each row's masked patches share
    weight 1 (a per-row mean) and the sum is divided by R: rows without a mask count as zeros.
    """
    check_positive(student_temp, "student_temp")
    if masks.dim() != 2 or student.shape[0] != int(masks.sum()) or teacher.shape != student.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must hold one row per masked patch "
            f"of masks {tuple(masks.shape)} ({int(masks.sum())})"
        )
    per_row = 1 / masks.sum(dim=-1).clamp(min=1)
    weights = per_row.unsqueeze(-1).expand_as(masks)[masks]
    ce = _cross_entropy(teacher.detach(), student, student_temp)
    return -(ce * weights.to(ce.dtype)).sum() / masks.shape[0]


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo (Sablayrolles et al. 2019; official ``KoLeoLoss``): ``-mean_i log(||x_i - x_nn(i)|| + eps)`` on
    L2-normalised rows, nn(i) the nearest other row (largest inner product); the distance is
    ``pairwise_distance(.., eps)``, i.e. ``||x_i - x_j + eps||``, as the official ``nn.PairwiseDistance(2, eps)``."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs a (B, D) batch with B >= 2, got shape {tuple(x.shape)}")
    x = F.normalize(x.to(compute_dtype(x)), eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-1)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
