"""SwAV: Sinkhorn-Knopp equipartition codes and the swapped-prediction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_multicrop, check_positive, compute_dtype


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp equipartition of SwAV (Caron et al., NeurIPS 2020): official ``distributed_sinkhorn``
    on a single process. No gradient.

    ``scores`` are (B, K) prototype scores. ``Q = exp(scores / epsilon)^T`` (K x B); ``Q /= sum(Q)``; then
    ``iterations`` times: ``Q /= Q.sum(dim=1)`` (each prototype's row), ``Q /= K``, ``Q /= Q.sum(dim=0)`` (each
    sample's column), ``Q /= B``. Returns ``(Q * B)^T`` (B x K): every row sums to 1 exactly (the last step
    normalises the samples); each prototype's column sums to B/K only in the limit of many iterations.

    The maximum of ``scores / epsilon`` is subtracted before ``exp`` to avoid overflow; a common factor
    ``exp(-max)`` cancels in the first normalisation, so the result is unchanged. ``iterations`` must be
    >= 1, otherwise the rows are not normalised.
    """
    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty 2-D (B, K) tensor, got shape {tuple(scores.shape)}")
    check_positive(epsilon, "epsilon")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations}")
    scores = scores.to(compute_dtype(scores))
    b, k = scores.shape

    logits = scores / epsilon
    q = torch.exp(logits - logits.max()).T
    q = q / q.sum()
    for _ in range(int(iterations)):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / k
        q = q / q.sum(dim=0, keepdim=True)
        q = q / b
    return (q * b).T


def swav_loss(scores: list[Tensor], assignments: list[Tensor], temperature: float = 0.1) -> dict[str, Tensor]:
    """SwAV swapped-prediction loss (Caron et al., NeurIPS 2020), matching the official training loop.

    ``scores`` is a list of V (B, K) prototype scores (global views first); ``assignments`` a list of G <= V
    (B, K) codes ``q_g`` (e.g. :func:`sinkhorn_knopp` of ``scores[g]``) for the first G views. Codes are
    targets: they are detached, as the official code computes them under ``no_grad``.

    ``loss = 1/(G (V-1)) * sum_{g<G} sum_{v!=g} mean_b [ -sum_k q_g[b, k] log_softmax(scores[v] / t)[b, k] ]``

    (the official per-view ``subloss / (V - 1)`` averaged over the G assigned views).
    """
    check_positive(temperature, "temperature")
    check_multicrop(scores, assignments, "scores", "assignments")
    dtype = compute_dtype(*scores, *assignments)
    log_p = [F.log_softmax(s.to(dtype) / temperature, dim=1) for s in scores]
    codes = [q.detach().to(dtype) for q in assignments]

    terms = [
        -(codes[g] * log_p[v]).sum(dim=1).mean() for g in range(len(assignments)) for v in range(len(scores)) if v != g
    ]
    return {"loss": torch.stack(terms).mean()}
