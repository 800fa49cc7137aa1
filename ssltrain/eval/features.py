"""Frozen-backbone features of a shard set: extracted once (batched, on the GPU when there is one, split over the
ranks of an initialised process group), cached to disk, and reused by every probe.

Extraction dominates the cost of an evaluation (a forward pass per image against a few seconds of probe training),
and the probes, the random-init comparison, the report's spectrum and repeated ``ssltrain eval`` calls all want the
same features, so they are cached under a key that changes whenever the features could:

- the data: the spec and, per resolved shard, its path, size and modification time (a re-written shard misses);
- the transform: crop size, resize, mean and std;
- the network: a SHA-256 of the backbone's parameters and buffers (the checkpoint step in the file name is only
  for people; a re-trained run or another checkpoint at the same step misses);
- the subset (``limit``), when only part of the data is wanted.

Cache files are ``{"x", "y", "index", "skipped", "meta"}`` dicts written atomically (temporary file + rename) and
read back with ``torch.load(weights_only=True)``; a file that fails to load is treated as a miss and rewritten.

Under ``torch.distributed``, rank r extracts the contiguous block ``[rN/W, (r+1)N/W)`` of the catalog and the
blocks are all-gathered, so every rank ends with the whole set in catalog order, the same as one process would
produce. The cache decision is collective (every rank must hit, else all extract) so no rank waits in a
collective another skipped; rank 0 writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Subset

from ssltrain.config import Config
from ssltrain.core.collectives import (
    agree,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    gather_no_grad,
    rank,
    world_size,
)
from ssltrain.core.device import autocast_for, resolve_device
from ssltrain.data.augment import EvalTransform
from ssltrain.data.loaders.cpu import EvalShards, make_loader
from ssltrain.data.shards import DataError
from ssltrain.data.stream import ShardCatalog

log = logging.getLogger("ssltrain")

__all__ = ["FeatureSet", "eval_transform", "extract_features", "feature_cache_key", "model_fingerprint", "subset_ids"]


@dataclass
class FeatureSet:
    """Features of the readable samples of one shard set, in catalog order."""

    x: Tensor  # [N, D] float32, CPU
    y: Tensor | None  # [N] int64 labels; None for unlabeled data
    index: Tensor  # [N] catalog ids of the rows (unreadable samples are skipped, so ids may have gaps)
    skipped: int = 0  # unreadable samples left out
    seconds: float = 0.0  # wall time to extract (or to load from the cache)
    cached: bool = False  # True when read from the cache
    path: Path | None = None  # the cache file, when caching was on

    def __len__(self) -> int:
        return int(self.x.shape[0])


def eval_transform(cfg: Config) -> EvalTransform:
    """The unaugmented transform every probe uses: the run's global-crop size and normalisation."""
    return EvalTransform(cfg.augment.global_crops.size, cfg.augment.mean, cfg.augment.std)


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): identifies the network exactly.

    About a second per GB of weights on one core, negligible next to a forward pass over a data set.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def transform_signature(transform: EvalTransform) -> dict[str, Any]:
    return {
        "size": transform.size,
        "resize": transform.resize,
        "mean": list(transform.mean),
        "std": list(transform.std),
    }


def data_signature(catalog: ShardCatalog) -> dict[str, Any]:
    shards = []
    for path in catalog.paths:
        st = os.stat(path)
        shards.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return {"spec": catalog.spec, "samples": len(catalog), "shards": shards}


def feature_cache_key(
    catalog: ShardCatalog, transform: EvalTransform, fingerprint: str, limit: int | None = None
) -> str:
    """16 hex digits of SHA-256 over data, transform, network fingerprint and subset size."""
    blob = json.dumps(
        {
            "data": data_signature(catalog),
            "transform": transform_signature(transform),
            "model": fingerprint,
            "limit": limit,
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subset_ids(n: int, limit: int | None) -> list[int]:
    """All ids, or ``limit`` evenly spaced ones (deterministic, and spread over shards sorted by class)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    return torch.linspace(0, n - 1, limit).round().long().unique().tolist()


def _load_cached(path: Path) -> FeatureSet | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureSet(blob["x"], blob["y"], blob["index"], int(blob["skipped"]), cached=True, path=path)
    except Exception as err:  # noqa: BLE001 - a bad cache file is a miss, rewritten below
        log.warning("feature cache '%s' is unreadable (%s: %s); extracting again", path, type(err).__name__, err)
        return None


def _save_cached(path: Path, fs: FeatureSet, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    torch.save({"x": fs.x, "y": fs.y, "index": fs.index, "skipped": fs.skipped, "meta": json.dumps(meta)}, tmp)
    os.replace(tmp, path)


def _comm_device(device: torch.device) -> torch.device:
    """Where a tensor must be for a collective: the GPU under NCCL ("cpu:gloo,cuda:nccl" on GPUs), else the CPU."""
    return device if "nccl" in str(dist.get_backend()) else torch.device("cpu")


def _gather_rows(x: Tensor, device: torch.device) -> Tensor:
    """All ranks' [n_r, ...] tensors concatenated in rank order (n_r may differ, 0 included), on the CPU."""
    return gather_no_grad(x.to(_comm_device(device))).cpu()


@torch.inference_mode()
def _extract(
    encode: Callable[[Tensor], Tensor],
    catalog: ShardCatalog,
    ids: list[int],
    transform: EvalTransform,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> tuple[Tensor, Tensor | None, Tensor, int]:
    loader = make_loader(
        Subset(EvalShards(catalog, transform), ids), workers, pin_memory=device.type == "cuda", batch_size=batch_size
    )
    xs, ys, idx, skipped, labeled = [], [], [], 0, True
    for views in loader:
        skipped += len(views.skipped)
        if views.batch_size == 0:
            continue
        images = views.global_views[0].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, precision):
            out = encode(images)
        xs.append(out.float())
        idx.append(views.index)
        if views.label is None:
            labeled = False
        else:
            ys.append(views.label)
    if xs:
        x = torch.cat(xs)
    else:
        x = torch.empty(0, 0, device=device)
    return (
        x,
        (torch.cat(ys) if labeled and ys else None),
        (torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)),
        skipped,
    )


def _extract_share(
    model: nn.Module,
    catalog: ShardCatalog,
    ids: list[int],
    transform: EvalTransform,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
) -> tuple[Tensor, Tensor | None, Tensor, int]:
    """This rank's rows ``ids`` with the model in eval mode (and channels_last on GPUs), both restored after."""
    encode: Callable[[Tensor], Tensor] = getattr(model, "features", model)
    was_training = model.training
    model.eval()
    # channels_last + bf16 is the fast path for convolutions on tensor cores; ViTs ignore the memory format.
    channels_last = device.type == "cuda"
    # A model that trains in channels_last (train.channels_last) stays so after an online kNN: restore its layout.
    was_channels_last = any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        return _extract(encode, catalog, ids, transform, batch_size, workers, device, precision, channels_last)
    finally:
        model.train(was_training)
        if channels_last and not was_channels_last:
            model.to(memory_format=torch.contiguous_format)


def _gather_shares(
    x: Tensor, y: Tensor | None, index: Tensor, skipped: int, device: torch.device
) -> tuple[Tensor, Tensor | None, Tensor, int]:
    """Every rank's share concatenated in rank order (catalog order), on every rank. Collective."""
    # a rank with no rows (more ranks than samples) learns the width from the others
    dim = int(all_reduce_max(torch.tensor([x.shape[1] if x.shape[0] else -1])).item())
    if x.shape[0] == 0:
        x = torch.empty(0, dim, device=device)
    labeled = not agree(y is None and x.shape[0] > 0)
    x, index = _gather_rows(x, device), _gather_rows(index, device)
    y = _gather_rows(y if y is not None else torch.empty(0, dtype=torch.long), device) if labeled else None
    return x, y, index, int(all_reduce_sum(torch.tensor([skipped])).item())


def extract_features(
    model: nn.Module,
    catalog: ShardCatalog,
    transform: EvalTransform,
    *,
    batch_size: int = 256,
    workers: int = 2,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
    tag: str = "features",
    split: str = "data",
    require_labels: bool = True,
    limit: int | None = None,
    precision: str = "auto",
    fingerprint: str | None = None,
    label: str | None = None,
) -> FeatureSet:
    """Features of ``catalog`` (or ``limit`` evenly spaced samples of it) under ``model.features`` (a Method) or
    ``model(images)`` (any module), from ``cache_dir/<tag>-<split>-<key>.pt`` when present.

    ``require_labels``: unlabeled shards are a DataError before any work (the probes' case); the report's
    spectrum passes False. Unreadable samples are skipped, counted and logged. ``fingerprint`` saves re-hashing
    weights the caller already hashed. ``label`` names the network in the log lines ("SSL backbone, step N",
    "random-init backbone"), which otherwise read alike for both. Every rank of an initialised process group must
    call this with the same arguments; each gets the full set.
    """
    if require_labels and not catalog.has_labels:
        raise DataError(
            f"shards '{catalog.spec}' have samples without a .cls label; probes need labeled data "
            "(write them with `ssltrain shards imagefolder`, whose class folders become labels)"
        )
    device = device or resolve_device("auto")
    who = f"{label}: " if label else ""
    path = None
    if cache_dir is not None:
        fingerprint = fingerprint or model_fingerprint(getattr(model, getattr(model, "feature_module", ""), model))
        path = Path(cache_dir) / f"{tag}-{split}-{feature_cache_key(catalog, transform, fingerprint, limit)}.pt"
    hit = _cached(path, f"{who}features of '{catalog.spec}' ({split}")
    if hit is not None:
        return hit
    start, ids = time.perf_counter(), subset_ids(len(catalog), limit)
    if rank() == 0:
        log.info("%sextracting features of '%s' (%s, %d samples)", who, catalog.spec, split, len(ids))
    fs = _extract_all(model, catalog, ids, transform, batch_size, workers, device, precision, path)
    if require_labels and fs.y is None:
        raise DataError(f"shards '{catalog.spec}' have samples without a .cls label; probes need labeled data")
    fs.seconds = time.perf_counter() - start
    if rank() == 0:
        rate, world = len(ids) / max(fs.seconds, 1e-9), world_size()
        log.info(
            "%sfeatures of '%s' (%s): %d x %d in %.1fs (%.0f images/s on %s, %d rank%s)",
            who,
            catalog.spec,
            split,
            *fs.x.shape,
            fs.seconds,
            rate,
            device,
            world,
            "s" if world > 1 else "",
        )
    if path is not None and rank() == 0:
        meta = {"spec": catalog.spec, "tag": tag, "split": split, "limit": limit}
        _save_cached(path, fs, {**meta, "transform": transform_signature(transform)})
    if path is not None and world_size() > 1:
        barrier()  # the file exists for every rank once this returns
    return fs


def _cached(path: Path | None, what: str) -> FeatureSet | None:
    """The cached features at ``path``, when every rank has them (else all extract, so the collectives line up)."""
    if path is None:
        return None
    start = time.perf_counter()
    hit = _load_cached(path) if path.is_file() else None
    if world_size() > 1 and agree(hit is None):
        return None
    if hit is not None:
        hit.seconds = time.perf_counter() - start
        if rank() == 0:
            log.info("%s, %d samples) read from %s in %.2fs", what, len(hit), path, hit.seconds)
    return hit


def _extract_all(
    model: nn.Module,
    catalog: ShardCatalog,
    ids: list[int],
    transform: EvalTransform,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
    path: Path | None,
) -> FeatureSet:
    """Every rank extracts its share of ``ids``; all get the whole set, in ``ids`` order, on the CPU."""
    this_rank, world = rank(), world_size()
    mine = ids[len(ids) * this_rank // world : len(ids) * (this_rank + 1) // world]
    x, y, index, skipped = _extract_share(model, catalog, mine, transform, batch_size, workers, device, precision)
    if world > 1:
        x, y, index, skipped = _gather_shares(x, y, index, skipped, device)
    x = x.cpu()
    if x.shape[0] == 0:
        raise DataError(f"no readable samples in '{catalog.spec}'")
    if skipped and this_rank == 0:
        log.warning("%d unreadable samples skipped while extracting features from '%s'", skipped, catalog.spec)
    return FeatureSet(x, y.cpu() if y is not None else None, index.cpu(), skipped, path=path)
