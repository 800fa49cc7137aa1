"""Weighted k-nearest-neighbour probe on frozen features (Wu et al. 2018, as used by DINO).

Each query votes with its ``k`` most cosine-similar bank features; neighbour ``i`` adds ``exp(sim_i / T)`` to the
score of its class. The work is tiled over query chunks x bank chunks with a running top-k, so peak memory is
``chunk_size x bank_chunk_size`` similarities (plus one normalised bank chunk) however large the bank is:
a 1.2M-image bank never needs a ``Q x N`` matrix or a normalised copy of itself.

Everything runs on the device the tensors are on; results do not depend on the chunk sizes beyond float rounding
(ties in similarity at the k-th neighbour are the one place where torch.topk's order may decide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_accuracy", "knn_predict", "knn_sweep", "num_classes_of", "topk_accuracy"]


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision cosines and exp(sim/T) lose too much."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def check_features(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_samples, dim], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_finite(name: str, x: Tensor) -> None:
    # A diverged encoder gives NaN features; without this they would silently rank as neighbours / train to NaN.
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_labels(name: str, y: Tensor, n: int, num_classes: int, device: torch.device) -> None:
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per feature row), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
    if y.device != device:
        raise ValueError(f"{name} is on {y.device} but its features are on {device}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def check_pair(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has dim {a.shape[1]} but {b_name} has dim {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}; put them on one device")


def num_classes_of(*labels: Tensor) -> int:
    """Classes a probe scores over: one past the largest label of any of the sets (bank and queries)."""
    return max(int(y.max()) for y in labels) + 1


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy of class scores [Q, C] against labels [Q].

    Ties are broken towards the lower class index (argmax's rule, via a stable sort) rather than by torch.topk's
    unspecified order, so the numbers are the same on every device. With fewer than 5 classes "top5" counts the
    top ``num_classes`` and is therefore 1.0.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = order[:, : min(5, scores.shape[1])] == labels.to(order.device, torch.long)[:, None]
    n = max(scores.shape[0], 1)
    return {"top1": hits[:, 0].sum().item() / n, "top5": hits.any(dim=1).sum().item() / n}


def _check_temperature(temperature: float, k: int, dtype: torch.dtype) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    # Scores are literally sum of exp(sim/T) <= k*exp(1/T); refuse rather than return inf/NaN.
    if 1.0 / temperature + math.log(k) >= math.log(torch.finfo(dtype).max):
        limit = 1.0 / (math.log(torch.finfo(dtype).max) - math.log(k))
        raise ValueError(
            f"temperature {temperature} overflows exp(sim/T) in {dtype} (needs T > {limit:.4g}); "
            "use a larger temperature or float64 features"
        )


def _chunk_rows(x: Tensor, start: int, size: int, dtype: torch.dtype) -> Tensor:
    return F.normalize(x[start : start + size].to(dtype), dim=1)


def _check_k(k: int, bank_rows: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > bank_rows:
        raise ValueError(f"k={k} exceeds the bank size {bank_rows}; use k <= {bank_rows} or a larger bank")


def _nearest(
    bank: Tensor, queries: Tensor, k: int, dtype: torch.dtype, chunk_size: int, bank_chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(similarities, bank indices) [Q, k] of each query's k most cosine-similar bank rows, most similar first."""
    num_q, num_b, device = queries.shape[0], bank.shape[0], queries.device
    # Running top-k over the bank chunks seen so far; starts empty so the first chunk may hold fewer than k rows.
    best_sim = torch.empty(num_q, 0, dtype=dtype, device=device)
    best_idx = torch.empty(num_q, 0, dtype=torch.long, device=device)
    for b0 in range(0, num_b, bank_chunk_size):
        bank_chunk = _chunk_rows(bank, b0, bank_chunk_size, dtype)  # normalised once per bank chunk
        sims, idxs = [], []
        for q0 in range(0, num_q, chunk_size):
            sim = _chunk_rows(queries, q0, chunk_size, dtype) @ bank_chunk.T
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            cand_sim = torch.cat([best_sim[q0 : q0 + chunk_size], top_sim], dim=1)
            cand_idx = torch.cat([best_idx[q0 : q0 + chunk_size], top_idx + b0], dim=1)
            keep_sim, keep = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1)
            sims.append(keep_sim)
            idxs.append(cand_idx.gather(1, keep))
        best_sim, best_idx = torch.cat(sims), torch.cat(idxs)
    return best_sim, best_idx


def _vote(
    best_sim: Tensor, best_idx: Tensor, bank_labels: Tensor, num_classes: int, temperature: float, chunk_size: int
) -> Tensor:
    """Scores [Q, C]: each listed neighbour adds exp(sim / T) to its class."""
    labels = bank_labels.to(torch.long)
    num_q = best_sim.shape[0]
    scores = torch.empty(num_q, num_classes, dtype=best_sim.dtype, device=best_sim.device)
    for q0 in range(0, num_q, chunk_size):
        weights = (best_sim[q0 : q0 + chunk_size] / temperature).exp()  # [c, k]
        # one_hot + sum instead of scatter_add_: CUDA scatter_add uses atomics and sums in a varying order.
        votes = F.one_hot(labels[best_idx[q0 : q0 + chunk_size]], num_classes).to(best_sim.dtype)  # [c, k, C]
        scores[q0 : q0 + chunk_size] = (weights[:, :, None] * votes).sum(dim=1)
    return scores


def _check_predict_inputs(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, chunk_size: int, bank_chunk_size: int
) -> None:
    check_num_classes(num_classes)
    check_features("bank", bank)
    check_features("queries", queries)
    check_pair("bank", bank, "queries", queries)
    check_finite("bank", bank)
    check_finite("queries", queries)
    check_labels("bank_labels", bank_labels, bank.shape[0], num_classes, bank.device)
    if chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError(
            f"chunk sizes must be positive, got chunk_size={chunk_size}, bank_chunk_size={bank_chunk_size}"
        )


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> Tensor:
    """Class scores [Q, num_classes] of the temperature-weighted kNN vote: score_c = sum over the k nearest
    (cosine) bank rows of class c of exp(sim / temperature); classes with no neighbour score 0.

    ``chunk_size`` queries are compared with ``bank_chunk_size`` bank rows at a time. ``k`` larger than the bank
    is a ValueError rather than a silent clamp: a vote over fewer neighbours is a different metric, and numbers
    from a too-small bank should not pass for k-NN@k. Scores are float32 (float64 if any input is float64).
    """
    _check_predict_inputs(bank, bank_labels, queries, num_classes, chunk_size, bank_chunk_size)
    _check_k(k, bank.shape[0])
    dtype = compute_dtype(bank, queries)
    _check_temperature(temperature, k, dtype)
    best_sim, best_idx = _nearest(bank, queries, k, dtype, chunk_size, bank_chunk_size)
    return _vote(best_sim, best_idx, bank_labels, num_classes, temperature, chunk_size)


def knn_sweep(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> dict[int, dict[str, float]]:
    """{k: {"top1", "top5"}} of the weighted kNN vote for several k from ONE neighbour search (the largest k):
    the k nearest are the first k of the max(ks) nearest, so each extra k costs only its vote.

    Equal to ``knn_accuracy`` per k except where similarities tie at a k-th neighbour.
    """
    _check_predict_inputs(bank, bank_labels, queries, num_classes, chunk_size, bank_chunk_size)
    check_labels("query_labels", query_labels, queries.shape[0], num_classes, queries.device)
    if not ks:
        raise ValueError("ks must hold at least one k")
    for k in ks:
        _check_k(k, bank.shape[0])
    dtype = compute_dtype(bank, queries)
    _check_temperature(temperature, max(ks), dtype)
    best_sim, best_idx = _nearest(bank, queries, max(ks), dtype, chunk_size, bank_chunk_size)
    out = {}
    for k in sorted(set(ks)):
        scores = _vote(best_sim[:, :k], best_idx[:, :k], bank_labels, num_classes, temperature, chunk_size)
        out[k] = topk_accuracy(scores, query_labels)
    return out


def knn_accuracy(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    bank_chunk_size: int = 65536,
) -> dict[str, float]:
    """{"top1", "top5"} of the weighted kNN vote (see knn_predict); with num_classes < 5, top5 is 1.0."""
    check_num_classes(num_classes)
    check_features("queries", queries)
    check_labels("query_labels", query_labels, queries.shape[0], num_classes, queries.device)
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, temperature, chunk_size, bank_chunk_size)
    return topk_accuracy(scores, query_labels)
