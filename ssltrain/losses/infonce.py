"""NT-Xent, SimCLR's InfoNCE over the other samples of the batch as negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.losses.common import check_pair, check_positive, check_rows, compute_dtype


def check_nt_xent(z_a: Tensor, z_b: Tensor, temperature: float, rows: Tensor | None) -> Tensor:
    """The inputs' checks, shared with the fused kernel's path; returns the rows as a LongTensor index."""
    check_positive(temperature, "temperature")
    check_pair(z_a, z_b)
    return check_rows(rows, 2 * z_a.shape[0], z_a.device)


def nt_xent_loss(z_a: Tensor, z_b: Tensor, temperature: float = 0.1, rows: Tensor | None = None) -> dict[str, Tensor]:
    """NT-Xent, the normalised-temperature cross-entropy of SimCLR (Chen et al., ICML 2020).

    Stack the L2-normalised views ``u = [z_a / |z_a|; z_b / |z_b|]`` (2N x D); logits ``s[i, k] = u_i . u_k / t``
    for ``k != i`` (self-similarity excluded); the positive of row ``i`` is its other view ``p(i) = (i + N) mod 2N``:

    ``loss = 1/|R| * sum_{i in R} [ -s[i, p(i)] + log sum_{k != i} exp(s[i, k]) ]``

    where ``R = rows`` (a 1-D LongTensor of indices into the 2N stacked rows, duplicates counted with
    multiplicity) or all 2N rows when ``rows`` is None. Each selected row is still scored against all 2N
    columns, so a distributed caller passes the gathered batch and the indices of its own samples' rows, and
    the mean over ranks (equal-sized partitions of the rows) equals the full loss.

    ``accuracy`` (detached) is the fraction of the rows in ``R`` whose positive logit is strictly greater than
    every negative logit; ties count as wrong, so a collapsed embedding scores 0 rather than 1.
    """
    idx = check_nt_xent(z_a, z_b, temperature, rows)
    dtype = compute_dtype(z_a, z_b)
    n = z_a.shape[0]

    u = F.normalize(torch.cat([z_a, z_b]).to(dtype), dim=1)
    anchors = u if rows is None else u[idx]
    logits = (anchors @ u.T) / temperature
    cols = torch.arange(2 * n, device=u.device)
    self_mask = cols.unsqueeze(0) == idx.unsqueeze(1)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = (idx + n) % (2 * n)

    loss = F.cross_entropy(logits, positive)

    with torch.no_grad():
        local = torch.arange(idx.shape[0], device=u.device)
        pos_logit = logits[local, positive]
        negatives = logits.clone()
        negatives[local, positive] = float("-inf")
        accuracy = (pos_logit > negatives.max(dim=1).values).to(dtype).mean()
    return {"loss": loss, "accuracy": accuracy}
