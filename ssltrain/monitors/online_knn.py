"""The online kNN monitor: a kNN probe on frozen backbone features, measured during training.

Every ``eval.online_knn_every`` optimizer steps (and at the last one) the monitor extracts features of a fixed,
evenly spaced subset of ``eval.train`` (the memory bank) and ``eval.val`` (the queries) with the offline eval's
extractor (``ssltrain.eval.features``: rows split over the ranks, then gathered) and transform, and scores them
with ``ssltrain.eval.knn``. The figure is logged as ``online_knn_top1`` / ``online_knn_top5``: online, because it
is of the live weights on capped subsets, not the full offline probe of ``ssltrain eval``.

Measuring must not change what training computes next, so around the extraction the model is in eval mode
(no BatchNorm running-stat updates, no dropout), there is no autograd, the torch RNG states are restored
afterwards, and nothing is cached on disk (the weights change between calls). The extraction is collective: every
rank measures at the same steps (``due``), and rank 0 scores.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ssltrain.config import ConfigError
from ssltrain.core.collectives import broadcast_buffers, is_distributed
from ssltrain.data.augment import EvalTransform
from ssltrain.data.shards import DataError
from ssltrain.data.stream import ShardCatalog
from ssltrain.eval.features import FeatureSet, eval_transform, extract_features, subset_ids
from ssltrain.eval.knn import knn_accuracy, num_classes_of
from ssltrain.methods.base import Method
from ssltrain.monitors.base import Monitor, MonitorContext, StepOutputs

log = logging.getLogger("ssltrain")

__all__ = ["FrozenEncoder", "OnlineKNN"]


class FrozenEncoder(nn.Module):
    """What ``extract_features`` is handed: the Method's backbone features, cast to float32.

    The Method is held outside the module tree, so the extractor's mode and memory-format changes on this
    wrapper never reach the live parameters that the optimizer and DDP/FSDP hold (:meth:`OnlineKNN.measure`
    sets eval mode itself). Inputs are cast to the backbone's parameter dtype: under FSDP2 with bf16
    all-gather, the root's gathered parameters are bf16 and the root's input cast is bypassed here.
    """

    def __init__(self, method: Method) -> None:
        super().__init__()
        self._method = (method,)  # a tuple: not registered as a submodule

    def features(self, images: Tensor) -> Tensor:
        method = self._method[0]
        dtype = next(method.backbone.parameters()).dtype
        return method.features(images.to(dtype)).float()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the whole Method, then every module's own previous mode back (not a blanket train())."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _root_unsharded(wrapped: nn.Module) -> Iterator[None]:
    """Under FSDP2, all-gather the root's own parameters (stem, patch embedding, final norm) for direct backbone
    calls; the residual stages / transformer blocks all-gather themselves in their forward hooks. Collective."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(wrapped, FSDPModule):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


@contextlib.contextmanager
def _rank0_buffers(module: nn.Module) -> Iterator[None]:
    """Rank 0's buffers (BatchNorm running statistics) on every rank while extracting, each rank's own back after.

    Each rank updates its running statistics on its own batches, so without this the rows extracted on rank r
    would be of a slightly different network than the checkpoint (rank 0's). Collective.
    """
    buffers = list(module.buffers())
    saved = [b.detach().clone() for b in buffers] if is_distributed() else []
    broadcast_buffers(module)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _labeled_catalog(spec: str, key: str) -> ShardCatalog:
    if not spec:
        role = "the kNN memory bank" if key == "eval.train" else "the kNN queries"
        raise DataError(
            f"eval.online_knn_every > 0 needs labeled shards in '{key}' ({role}); set {key}=PATH "
            "(shards with .cls labels, e.g. from `ssltrain shards imagefolder`), or "
            "eval.online_knn_every=0 to turn the monitor off"
        )
    catalog = ShardCatalog.from_spec(spec, key)
    if not catalog.has_labels:
        raise DataError(
            f"'{key}' ({spec}) has samples without a .cls label; the online kNN monitor "
            f"(eval.online_knn_every > 0) needs labeled shards: point {key} at labeled ones, or set "
            "eval.online_knn_every=0"
        )
    return catalog


@dataclass
class OnlineKNN(Monitor):
    """Settings and data of the monitor, checked once at start (see :meth:`build`), and the live model it measures."""

    every: int
    last_step: int
    train: ShardCatalog
    val: ShardCatalog
    transform: EvalTransform
    train_limit: int
    val_limit: int
    k: int
    temperature: float
    batch_size: int
    workers: int
    device: torch.device
    precision: str
    model: Method  # its backbone features are probed
    wrapped: nn.Module  # its DDP/FSDP wrapper (FSDP's root is unsharded around the extraction)
    is_main: bool

    name = "online_knn"  # not a field: no annotation

    @classmethod
    def build(cls, ctx: MonitorContext) -> OnlineKNN | None:
        """None when ``eval.online_knn_every`` is 0; a DataError / ConfigError naming the key when the data is
        missing, unlabeled or too small for ``eval.knn_k``, so a run fails at start rather than at step N."""
        cfg = ctx.cfg
        if cfg.eval.online_knn_every <= 0:
            return None
        train, val = _labeled_catalog(cfg.eval.train, "eval.train"), _labeled_catalog(cfg.eval.val, "eval.val")
        train_limit, val_limit = cfg.eval.online_knn_samples
        bank = len(subset_ids(len(train), train_limit))
        if cfg.eval.knn_k > bank:
            raise ConfigError(
                f"eval.knn_k={cfg.eval.knn_k} exceeds the online kNN bank of {bank} samples (eval.train "
                f"capped by eval.online_knn_samples[0]={train_limit}); lower eval.knn_k or raise the cap"
            )
        return cls(
            cfg.eval.online_knn_every,
            cfg.steps,
            train,
            val,
            eval_transform(cfg),
            train_limit,
            val_limit,
            cfg.eval.knn_k,
            cfg.eval.knn_temperature,
            cfg.eval.batch_size,
            cfg.data.workers,
            ctx.device,
            cfg.precision,
            cast(Method, ctx.model),  # the unwrapped Method, as MonitorContext says
            ctx.wrapped,
            ctx.is_main,
        )

    def due(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps done) is one the monitor measures at."""
        return step % self.every == 0 or step == self.last_step

    def on_step(self, out: StepOutputs) -> dict[str, float]:
        """At the steps it is due: measure (every rank extracts; rank 0's figures are returned, the others' {})."""
        return self.measure() if self.due(out.step) else {}

    def features(self) -> tuple[FeatureSet, FeatureSet]:
        """(bank, queries) features of the current weights, on every rank; collective, trajectory-neutral."""
        model = self.model
        rng_devices = [self.device] if self.device.type == "cuda" else []
        encoder = FrozenEncoder(model)
        kw: dict[str, Any] = dict(
            batch_size=self.batch_size, workers=self.workers, device=self.device, precision=self.precision
        )
        with (
            torch.random.fork_rng(devices=rng_devices),
            torch.no_grad(),
            _eval_mode(model),
            _root_unsharded(self.wrapped),
            _rank0_buffers(model.backbone),
        ):
            bank = extract_features(encoder, self.train, self.transform, limit=self.train_limit, **kw)
            queries = extract_features(encoder, self.val, self.transform, limit=self.val_limit, **kw)
        return bank, queries

    def score(self, bank: FeatureSet, queries: FeatureSet) -> dict[str, float]:
        """{"online_knn_top1", "online_knn_top5"}; NaN for non-finite features (a diverged run still logs)."""
        if not (bool(torch.isfinite(bank.x).all()) and bool(torch.isfinite(queries.x).all())):
            log.warning("online kNN: the backbone features are not finite; logged as nan")
            return {"online_knn_top1": math.nan, "online_knn_top5": math.nan}
        if self.k > len(bank):
            log.warning("online kNN skipped: k=%d but only %d bank samples were readable", self.k, len(bank))
            return {}
        assert bank.y is not None and queries.y is not None  # labeled catalogs (checked at build)
        device = self.device
        res = knn_accuracy(
            bank.x.to(device),
            bank.y.to(device),
            queries.x.to(device),
            queries.y.to(device),
            num_classes_of(bank.y, queries.y),
            k=self.k,
            temperature=self.temperature,
        )
        return {"online_knn_top1": res["top1"], "online_knn_top5": res["top5"]}

    def measure(self) -> dict[str, float]:
        """Extract on every rank (collective), score on rank 0; the others get {}."""
        start = time.perf_counter()
        bank, queries = self.features()
        if not self.is_main:
            return {}
        out = self.score(bank, queries)
        log.info(
            "online kNN (k=%d, %d bank / %d queries): top-1 %.4f in %.1fs",
            self.k,
            len(bank),
            len(queries),
            out.get("online_knn_top1", math.nan),
            time.perf_counter() - start,
        )
        return out
