"""Linear probe on frozen features: softmax regression trained with SGD, plus a small hyper-parameter sweep.

Features are standardised with the train statistics (what makes one lr work across encoders whose feature scales
differ by orders of magnitude). Dimensions that are constant on the train set carry nothing a linear probe can
use, so they are zeroed instead of divided by ~0: a dead unit that happens to fire on a val image would otherwise
dominate its logits.

Deterministic given ``seed``: the weight init and every epoch's batch order come from a private CPU generator
(the global RNG is neither read nor advanced), so the same seed gives the same batches on any device.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssltrain.eval.knn import (
    check_features,
    check_finite,
    check_labels,
    check_num_classes,
    check_pair,
    compute_dtype,
    topk_accuracy,
)

__all__ = ["linear_probe", "linear_probe_grid", "linear_probe_sweep"]

_REL_EPS = 1e-5  # a dim whose train std is below this fraction of its mean |value| counts as constant
_EVAL_CHUNK = 8192
# Below this many multiply-adds per step a CPU GEMM is too small to share: extra intra-op threads only add sync
# cost, which on a busy machine makes each step many times slower.
_SINGLE_THREAD_MACS = 1 << 24


@contextlib.contextmanager
def _single_threaded(enabled: bool) -> Iterator[None]:
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(previous)


def _check_inputs(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int) -> None:
    check_num_classes(num_classes)
    check_features("train_x", train_x)
    check_features("val_x", val_x)
    check_pair("train_x", train_x, "val_x", val_x)
    check_finite("train_x", train_x)
    check_finite("val_x", val_x)
    check_labels("train_y", train_y, train_x.shape[0], num_classes, train_x.device)
    check_labels("val_y", val_y, val_x.shape[0], num_classes, val_x.device)


def _check_hparams(epochs: int, lr: float, weight_decay: float, batch_size: int) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, 1/std) per dim from the train features, with 1/std = 0 for dims that are constant on train."""
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    constant = std <= _REL_EPS * x.abs().mean(dim=0)  # relative, so tiny-but-real feature scales survive
    return mean, torch.where(constant, torch.zeros_like(std), 1.0 / std.clamp_min(torch.finfo(x.dtype).tiny))


def _standardised(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both splits standardised with the train split's statistics (as a probe on new data would be), labels as long."""
    mean, inv_std = _standardiser(train_x.to(dtype))
    return (
        (train_x.to(dtype) - mean) * inv_std,
        train_y.to(torch.long),
        (val_x.to(dtype) - mean) * inv_std,
        val_y.to(torch.long),
    )


@torch.no_grad()
def _fit_grid(
    x: Tensor, y: Tensor, num_classes: int, epochs: int, lrs: Tensor, weight_decays: Tensor, batch_size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``len(lrs)`` softmax classifiers trained at once by one recipe: the same init (N(0, 0.01^2) weights, as
    DINO's, zero bias) and batch order for all, cross-entropy, SGD with momentum 0.9, a per-step cosine lr from
    each one's ``lr`` to 0, weight decay on the weight only. Returns weights [G, D, C], biases [G, C].

    The G classifiers are laid side by side as one [D, G*C] matrix, so a step is one wider matrix product instead of
    G small ones: the sweep is overhead-bound while steps are small (the usual case), and a grid trains in about
    the time of one probe. The softmax cross-entropy gradient is written out (``(softmax - onehot) / B``), so no
    autograd graph is built. A single probe is the grid of one.
    """
    n, dim = x.shape
    groups, classes = lrs.numel(), num_classes
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(classes, dim, generator=gen, dtype=x.dtype) * 0.01).T.to(x.device)  # [D, C]
    weight = w0.repeat(1, groups)  # [D, G*C]: column block g is classifier g
    bias = torch.zeros(groups * classes, dtype=x.dtype, device=x.device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    col_lr = lrs.to(x.device, x.dtype).repeat_interleave(classes)
    col_wd = weight_decays.to(x.device, x.dtype).repeat_interleave(classes)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, b = x[idx], idx.numel()
            probs = torch.softmax(torch.addmm(bias, xb, weight).view(b, groups, classes), dim=2)
            probs -= F.one_hot(y[idx], classes).to(x.dtype)[:, None, :]
            probs = probs.view(b, groups * classes) / b  # d(mean CE)/d logits, per classifier
            buf_w.mul_(0.9).add_(torch.addcmul(xb.T @ probs, col_wd, weight))
            buf_b.mul_(0.9).add_(probs.sum(dim=0))
            step_lr = (0.5 * (1.0 + math.cos(math.pi * step / total))) * col_lr
            weight -= step_lr * buf_w
            bias -= step_lr * buf_b
            step += 1
    return weight.view(dim, groups, classes).permute(1, 0, 2), bias.view(groups, classes)


@torch.no_grad()
def _evaluate_grid(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> list[dict[str, float]]:
    out = []
    for g in range(weight.shape[0]):
        logits = torch.cat(
            [torch.addmm(bias[g], x[i : i + _EVAL_CHUNK], weight[g]) for i in range(0, x.shape[0], _EVAL_CHUNK)]
        )
        out.append(topk_accuracy(logits, y))
    return out


def linear_probe_grid(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> list[dict[str, float]]:
    """``linear_probe`` for every (lr, weight_decay) in ``zip(lrs, weight_decays)``, trained together in one
    batched loop; returns one {"top1", "top5", "train_top1"} per setting.

    Equal to separate ``linear_probe`` calls up to float rounding (batched vs single matrix products).
    """
    return _probe_grid(train_x, train_y, val_x, val_y, num_classes, lrs, weight_decays, epochs, batch_size, seed)


def _probe_grid(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int,
) -> list[dict[str, float]]:
    """Check, standardise, train with :func:`_fit_grid`, score: the one fitter behind both public probes."""
    _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    if len(lrs) != len(weight_decays) or not lrs:
        raise ValueError(
            f"lrs and weight_decays must be non-empty and of one length, got {len(lrs)} and {len(weight_decays)}"
        )
    for lr, wd in zip(lrs, weight_decays):
        _check_hparams(epochs, lr, wd, batch_size)
    dtype = compute_dtype(train_x, val_x)
    with torch.inference_mode(False), torch.no_grad():
        x, y, xv, yv = _standardised(train_x, train_y, val_x, val_y, dtype)
        macs = len(lrs) * min(batch_size, x.shape[0]) * x.shape[1] * num_classes
        with _single_threaded(x.device.type == "cpu" and macs < _SINGLE_THREAD_MACS):
            weight, bias = _fit_grid(
                x,
                y,
                num_classes,
                epochs,
                torch.tensor(list(lrs), dtype=torch.float64),
                torch.tensor(list(weight_decays), dtype=torch.float64),
                batch_size,
                seed,
            )
        val = _evaluate_grid(weight, bias, xv, yv)
        train = _evaluate_grid(weight, bias, x, y)
    return [{"top1": v["top1"], "top5": v["top5"], "train_top1": t["top1"]} for v, t in zip(val, train)]


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Train a linear classifier on standardised train features; return val {"top1", "top5"} and "train_top1".

    Runs on the features' device in float32 (float64 if the features are). With num_classes < 5, top5 is 1.0.
    Works when called under torch.no_grad() / torch.inference_mode() (e.g. right after feature extraction).
    """
    (result,) = _probe_grid(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes,
        [lr],
        [weight_decay],
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    return result


def _stratified_split(y: Tensor, num_classes: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit_idx, holdout_idx): ``fraction`` of each class, rounded, held out; every class keeps >= 1 fit sample."""
    y = y.cpu().long()
    n = y.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    order = perm[torch.argsort(y[perm], stable=True)]  # grouped by class, random within a class
    sorted_y = y[order]
    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_y]
    n_hold = torch.minimum(torch.round(counts.double() * fraction).long(), (counts - 1).clamp_min(0))
    held = rank < n_hold[sorted_y]
    return order[~held].sort().values, order[held].sort().values


def linear_probe_sweep(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    lrs: Sequence[float] = (0.01, 0.1, 1.0),
    weight_decays: Sequence[float] = (1e-5, 1e-3),
    holdout_fraction: float = 0.2,
    **kw: Any,
) -> dict[str, Any]:
    """Pick (lr, weight_decay) on a stratified held-out slice of the TRAIN features, retrain on all of train, and
    report val.

    The grid is trained in one batched loop (``linear_probe_grid``), so the sweep costs about two probes, not
    ``len(lrs) * len(weight_decays) + 1``.

    Val is only touched by the final run, so val numbers stay an unbiased estimate. Selection is by held-out top1,
    ties going to the earlier setting in ``itertools.product(lrs, weight_decays)`` order. ``kw`` is passed to
    linear_probe (epochs, batch_size, seed); ``seed`` also draws the split. Returns {"top1", "top5", "train_top1",
    "lr", "weight_decay", "holdout_top1", "grid": [{"lr", "weight_decay", "holdout_top1"}, ...]}.
    """
    _check_inputs(train_x, train_y, val_x, val_y, num_classes)
    for key in ("lr", "weight_decay"):
        if key in kw:
            raise ValueError(f"pass {key} values through lrs / weight_decays, not as {key}=")
    if not lrs or not weight_decays:
        raise ValueError("lrs and weight_decays must each hold at least one value")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")
    fit_idx, hold_idx = _stratified_split(train_y, num_classes, holdout_fraction, kw.get("seed", 0))
    if hold_idx.numel() == 0:
        raise ValueError(
            f"holdout_fraction={holdout_fraction} of {train_x.shape[0]} train samples holds none out; "
            "more train data (>= 2 per class) or a larger fraction is needed"
        )
    fit_idx, hold_idx = fit_idx.to(train_x.device), hold_idx.to(train_x.device)
    fit_x, fit_y, hold_x, hold_y = train_x[fit_idx], train_y[fit_idx], train_x[hold_idx], train_y[hold_idx]

    settings = list(itertools.product(lrs, weight_decays))
    held = linear_probe_grid(
        fit_x, fit_y, hold_x, hold_y, num_classes, [lr for lr, _ in settings], [wd for _, wd in settings], **kw
    )
    grid = [{"lr": lr, "weight_decay": wd, "holdout_top1": res["top1"]} for (lr, wd), res in zip(settings, held)]
    best = max(grid, key=lambda g: g["holdout_top1"])  # max keeps the first of equals
    final = linear_probe(
        train_x, train_y, val_x, val_y, num_classes, lr=best["lr"], weight_decay=best["weight_decay"], **kw
    )
    return {**final, **best, "grid": grid}
