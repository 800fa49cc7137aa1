"""CISSL: InfoNCE between a linear student head and an MLP teacher head, self pairs included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_positive, check_rows, check_same, compute_dtype


def check_cissl(s_a: Tensor, s_b: Tensor, t_a: Tensor, t_b: Tensor, temperature: float, rows: Tensor | None) -> Tensor:
    """The inputs' checks, shared with the fused kernel's path; returns the rows as a LongTensor index."""
    check_positive(temperature, "temperature")
    check_same(2, s_a=s_a, s_b=s_b, t_a=t_a, t_b=t_b)
    return check_rows(rows, 2 * s_a.shape[0], s_a.device)


def cissl_loss(
    s_a: Tensor,
    s_b: Tensor,
    t_a: Tensor,
    t_b: Tensor,
    temperature: float = 0.07,
    rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """CISSL, the contrastive invariant SSL loss of Dubois et al. (NeurIPS 2022), with asymmetric heads.

    ``s_a, s_b`` are the (linear) student-head outputs of views a and b, ``t_a, t_b`` the (MLP) teacher-head
    outputs, all (N, D). With ``S = [s_a; s_b] / |.|`` and ``T = [t_a; t_b] / |.|`` row-wise L2-normalised
    (2N x D), logits ``l[i, k] = S_i . T_k / t`` over ALL 2N x 2N pairs, the self pair ``(i, i)`` included:
    student and teacher are different heads, so ``(i, i)`` is a genuine positive, as is ``p(i) = (i + N) mod 2N``.
    Row ``i``'s target puts mass 1/2 on column ``i`` and 1/2 on column ``p(i)``:

    ``loss = 1/|R| * sum_{i in R} [ log sum_k exp(l[i, k]) - (l[i, i] + l[i, p(i)]) / 2 ]``

    with ``R = rows`` as in :func:`nt_xent_loss` (default: all 2N rows).

    ``accuracy`` (detached) is the fraction of rows in ``R`` whose argmax column is ``i`` or ``p(i)``, i.e. whose
    larger positive logit is strictly greater than every negative logit (ties count as wrong, as in NT-Xent).
    """
    idx = check_cissl(s_a, s_b, t_a, t_b, temperature, rows)
    dtype = compute_dtype(s_a, s_b, t_a, t_b)
    n = s_a.shape[0]

    s = F.normalize(torch.cat([s_a, s_b]).to(dtype), dim=1)
    t = F.normalize(torch.cat([t_a, t_b]).to(dtype), dim=1)
    anchors = s if rows is None else s[idx]
    logits = (anchors @ t.T) / temperature
    local = torch.arange(idx.shape[0], device=s.device)
    partner = (idx + n) % (2 * n)

    log_prob = F.log_softmax(logits, dim=1)
    loss = -0.5 * (log_prob[local, idx] + log_prob[local, partner]).mean()

    with torch.no_grad():
        best_pos = torch.maximum(logits[local, idx], logits[local, partner])
        negatives = logits.clone()
        negatives[local, idx] = float("-inf")
        negatives[local, partner] = float("-inf")
        accuracy = (best_pos > negatives.max(dim=1).values).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}
