"""``ssltrain eval``: probe a checkpoint's backbone on frozen features, next to the same probes on a random-init
backbone, and measure how many directions its representation uses.

The random-init backbone is built with the run's seed, so it is the exact network the run started from: the gap
between the two columns is what pretraining bought.

Flow: resolve the target (a run directory or a checkpoint) -> features of the train and val shards, extracted once
and cached (``ssltrain.eval.features``) -> kNN for several k from one neighbour search and a linear probe whose
lr / weight decay are chosen on a held-out slice of train -> monitors and singular-value spectra of the val
features and of the projector's embeddings -> ``eval.json``, ``spectrum.json``, records in ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssltrain.config import Config, from_yaml_text
from ssltrain.core.checkpoint_layout import CheckpointError, latest_checkpoint
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.core.collectives import rank as this_rank
from ssltrain.core.collectives import world_size as dist_world
from ssltrain.core.device import resolve_device
from ssltrain.data.shards import DataError
from ssltrain.data.stream import ShardCatalog
from ssltrain.eval.baseline import baseline_key, baseline_lock, load_baseline, save_baseline
from ssltrain.eval.features import (
    FeatureSet,
    data_signature,
    eval_transform,
    extract_features,
    model_fingerprint,
    transform_signature,
)
from ssltrain.eval.knn import knn_sweep, num_classes_of
from ssltrain.eval.linear import linear_probe_sweep
from ssltrain.eval.metrics_log import MetricsLog
from ssltrain.eval.representation import collapse_warnings, embedding_monitors, spectrum
from ssltrain.eval.verdict import below_random
from ssltrain.methods import Method, build_method

log = logging.getLogger("ssltrain")

PROBES = ("knn", "linear")
DEFAULT_KNN_KS = (10, 20, 100)
DEFAULT_LINEAR_LRS = (0.01, 0.1, 1.0)
DEFAULT_LINEAR_WEIGHT_DECAYS = (1e-5, 1e-3)


@dataclass
class EvalOptions:
    """What to evaluate and how; ``None`` fields take the run config's ``eval.*`` value (or the defaults above)."""

    probes: Sequence[str] = PROBES
    train_data: str | None = None  # labeled shards: kNN bank and linear-probe training set
    val_data: str | None = None  # labeled held-out shards the probes are scored on
    knn_ks: Sequence[int] | None = None
    knn_temperature: float | None = None
    linear_lrs: Sequence[float] | None = None
    linear_weight_decays: Sequence[float] | None = None
    linear_epochs: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    device: str | None = None  # auto | cpu | cuda[:i]; default the config's device
    cache: bool = True  # read/write <out>/features/*.pt
    random_baseline: bool = True  # also probe the random-init backbone
    spectrum_rows: int = 2048  # val rows used for the spectra and monitors (SVD cost ~ rows * D * min(rows, D))
    out_dir: Path | None = None  # where results go when the target is a checkpoint outside a run directory
    baseline_dir: Path | None = None  # random-init results shared by runs of the same backbone (a sweep's baselines/)


@dataclass
class EvalTarget:
    """A checkpoint, the config it was made with, and where its results are written."""

    out_dir: Path
    checkpoint: Path
    state: dict[str, Any]
    cfg: Config
    is_run: bool = field(default=False)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory (no config.yaml); pass runs/<name>")
    return from_yaml_text(path.read_text(), str(path))


def _config(state: dict[str, Any], source: Path, run_cfg: Config | None) -> Config:
    """The network as the checkpoint made it (its own config), the eval settings from the run's config.yaml (which
    a user may have edited since, e.g. to add eval.train / eval.val)."""
    cfg = from_yaml_text(state["config"], str(source)) if "config" in state else run_cfg
    if cfg is None:
        raise CheckpointError(
            f"checkpoint '{source}' holds no config and sits in no run directory; it cannot be rebuilt"
        )
    if run_cfg is not None:
        cfg.eval = run_cfg.eval
    return cfg


def resolve_target(path: Path, checkpoint: Path | None = None, out_dir: Path | None = None) -> EvalTarget:
    """``path`` is a run directory (its latest checkpoint, or ``checkpoint``) or a checkpoint directory.

    A checkpoint inside ``<run>/checkpoints/`` writes its results to ``<run>``; one elsewhere to ``out_dir``
    (default: ``<checkpoint>-eval`` next to it).
    """
    path = Path(path)
    if (path / "config.yaml").is_file():
        run_cfg = load_run_config(path)
        ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in '{path}/checkpoints'; train first")
        state = load_checkpoint(ckpt)
        return EvalTarget(path, ckpt, state, _config(state, ckpt, run_cfg), is_run=True)
    if checkpoint is not None:
        raise FileNotFoundError(f"'{path}' is not a run directory (no config.yaml); --checkpoint needs runs/<name>")
    if not path.exists():
        raise FileNotFoundError(
            f"'{path}' does not exist; pass a run directory (runs/<name>) or a checkpoint directory"
        )
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        if re.match(r"^step-\d+$", path.name):  # it is a checkpoint, a broken one: say so
            raise
        raise FileNotFoundError(
            f"'{path}' is not a run directory (no config.yaml) nor a loadable checkpoint ({err})"
        ) from None
    if "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint '{path}' holds no model or step; it cannot be evaluated")
    run = path.parent.parent
    if path.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return EvalTarget(run, path, state, _config(state, path, load_run_config(run)), is_run=True)
    out = Path(out_dir) if out_dir else path.with_name(f"{path.name}-eval")
    return EvalTarget(out, path, state, _config(state, path, None))


def build_models(target: EvalTarget, random_baseline: bool = True) -> tuple[Method, Method | None]:
    """(trained, random-init) networks. The random one is drawn right after ``manual_seed(cfg.seed)``, as the
    trainer draws its initial network."""
    cfg = target.cfg
    num_samples = int(target.state.get("data_samples", 0)) or None  # DIET's head has one row per training sample
    torch.manual_seed(cfg.seed)
    random_init = build_method(cfg, num_samples) if random_baseline else None
    trained = build_method(cfg, num_samples)
    trained.load_state_dict(target.state["model"])
    return trained, random_init


def embedding_head(model: nn.Module) -> nn.Module | None:
    """The projector that maps backbone features to the embeddings the loss sees, when the method has one."""
    head = getattr(model, "projector", None)
    return head if isinstance(head, nn.Module) else None


# ---------------------------------------------------------------- probes on feature tensors (reusable online)


def _labels(features: FeatureSet) -> torch.Tensor:
    if features.y is None:
        raise DataError("probes need labeled data (.cls) in both the train and val shards")
    return features.y


def knn_probe(
    train: FeatureSet, val: FeatureSet, ks: Sequence[int], temperature: float, device: torch.device, num_classes: int
) -> dict[str, dict[str, float]]:
    """{"<k>": {"top1", "top5"}} for every k the bank can serve; larger k are skipped with a warning."""
    usable = sorted({k for k in ks if k <= len(train)})
    for k in sorted(set(ks) - set(usable)):
        log.warning("kNN with k=%d skipped: the bank (the train features) holds only %d samples", k, len(train))
    if not usable:
        return {}
    res = knn_sweep(
        train.x.to(device),
        _labels(train).to(device),
        val.x.to(device),
        _labels(val).to(device),
        num_classes,
        ks=usable,
        temperature=temperature,
    )
    return {str(k): v for k, v in res.items()}


def linear_probe_features(
    train: FeatureSet,
    val: FeatureSet,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    seed: int,
    device: torch.device,
    num_classes: int,
) -> dict[str, Any]:
    """The linear-probe sweep on cached features: {"top1", "top5", "train_top1", "lr", "weight_decay",
    "holdout_top1", "grid"}."""
    return linear_probe_sweep(
        train.x.to(device),
        _labels(train).to(device),
        val.x.to(device),
        _labels(val).to(device),
        num_classes,
        lrs=tuple(lrs),
        weight_decays=tuple(weight_decays),
        epochs=epochs,
        seed=seed,
    )


def run_probes(
    train: FeatureSet, val: FeatureSet, probes: Sequence[str], cfg: Config, opts: EvalOptions, device: torch.device
) -> dict[str, Any]:
    """Probe results for one backbone; flat ``knn_top1`` / ``linear_top1`` (k = ``eval.knn_k``) kept for tables."""
    if train.y is None or val.y is None:
        raise DataError("probes need labeled data (.cls) in both the train and val shards")
    num_classes = num_classes_of(train.y, val.y)
    out: dict[str, Any] = {"num_classes": num_classes, "train_samples": len(train), "val_samples": len(val)}
    if "knn" in probes:
        start = time.perf_counter()
        ks = tuple(opts.knn_ks or getattr(cfg.eval, "knn_ks", None) or DEFAULT_KNN_KS)
        ks = tuple(sorted(set(ks) | {cfg.eval.knn_k}))
        temperature = opts.knn_temperature or cfg.eval.knn_temperature
        knn = knn_probe(train, val, ks, temperature, device, num_classes)
        if knn:
            primary = str(cfg.eval.knn_k) if str(cfg.eval.knn_k) in knn else max(knn, key=int)
            out.update(
                knn=knn,
                knn_k=int(primary),
                knn_temperature=temperature,
                knn_top1=knn[primary]["top1"],
                knn_top5=knn[primary]["top5"],
            )
        out["knn_seconds"] = time.perf_counter() - start
    if "linear" in probes:
        start = time.perf_counter()
        lrs = opts.linear_lrs or getattr(cfg.eval, "linear_lrs", None) or DEFAULT_LINEAR_LRS
        wds = (
            opts.linear_weight_decays or getattr(cfg.eval, "linear_weight_decays", None) or DEFAULT_LINEAR_WEIGHT_DECAYS
        )
        epochs = opts.linear_epochs or cfg.eval.linear_epochs
        linear = linear_probe_features(train, val, lrs, wds, epochs, cfg.seed, device, num_classes)
        out.update(linear=linear, linear_top1=linear["top1"], linear_top5=linear["top5"])
        out["linear_seconds"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------- representation statistics


@torch.no_grad()
def representation_stats(
    model: Method, feats: FeatureSet, rows: int, device: torch.device
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(monitors, spectra) of up to ``rows`` evenly spaced val rows: ``feat_*`` for backbone features, ``emb_*`` for
    the projector's embeddings (methods with a projector)."""
    n = len(feats)
    sel = torch.linspace(0, n - 1, min(rows, n)).round().long().unique()
    x = feats.x[sel].to(device)
    monitors = embedding_monitors(x, prefix="feat")
    spectra: dict[str, list[float]] = {}
    if x.shape[0] >= 2:
        spectra["features"] = spectrum(x).cpu().tolist()
    head = embedding_head(model)
    if head is not None and x.shape[0] >= 2:
        was_training = head.training
        head.eval()  # BatchNorm with its running statistics: the embedding of each image alone
        head.to(device)
        try:
            z = torch.cat([head(x[i : i + 4096]).float() for i in range(0, x.shape[0], 4096)])
        finally:
            head.train(was_training)
        monitors.update(embedding_monitors(z, prefix="emb"))
        spectra["embeddings"] = spectrum(z).cpu().tolist()
    return monitors, spectra


# ---------------------------------------------------------------- the runner


def _catalogs(target: EvalTarget, opts: EvalOptions) -> tuple[ShardCatalog, ShardCatalog]:
    cfg = target.cfg
    train_spec, val_spec = opts.train_data or cfg.eval.train, opts.val_data or cfg.eval.val
    if not train_spec or not val_spec:
        raise DataError(
            f"no probe data: '{target.out_dir}/config.yaml' sets no eval.train / eval.val shards and none were given; "
            "pass --data DIR (DIR/train-*.tar and DIR/val-*.tar) or --train-data / --val-data"
        )
    return ShardCatalog.from_spec(train_spec, "eval train data"), ShardCatalog.from_spec(val_spec, "eval val data")


def evaluate_target(target: EvalTarget, opts: EvalOptions | None = None, log_metrics: bool = True) -> dict[str, Any]:
    """Probe (and measure) the target's network and the random-init one; returns {"ssl": ..., "random": ...}.

    Writes ``eval.json``, ``spectrum.json`` and metrics records to ``target.out_dir``. Under torch.distributed
    every rank extracts its share of the features; rank 0 alone probes, writes and returns the results (the
    others return {}).
    """
    opts = opts or EvalOptions()
    bad = set(opts.probes) - set(PROBES)
    if bad:
        raise ValueError(f"unknown probe(s) {sorted(bad)}; choose from {PROBES}")
    cfg = target.cfg
    train_set, val_set = _catalogs(target, opts)
    device = resolve_device(opts.device or cfg.device)
    trained, random_init = build_models(target, opts.random_baseline)
    transform = eval_transform(cfg)
    cache_dir = target.out_dir / "features" if opts.cache else None
    rank = this_rank()
    kw: dict[str, Any] = dict(
        batch_size=opts.batch_size or cfg.eval.batch_size,
        workers=cfg.data.workers if opts.workers is None else opts.workers,
        device=device,
        cache_dir=cache_dir,
        precision=cfg.precision,
    )

    results: dict[str, Any] = {}
    monitors: dict[str, dict[str, float]] = {}
    spectra: dict[str, dict[str, list[float]]] = {}
    backbones = [("ssl", trained, f"step-{target.step}", f"SSL backbone, step {target.step}")]
    if random_init is not None:
        backbones.append(("random", random_init, "random", f"random-init backbone (seed {cfg.seed})"))
    for name, model, tag, label in backbones:
        fingerprint = model_fingerprint(getattr(model, model.feature_module))
        shared = name == "random" and opts.baseline_dir is not None and dist_world() == 1
        key = _baseline_key(fingerprint, train_set, val_set, transform, cfg, opts) if shared else ""
        with baseline_lock(opts.baseline_dir, key) if shared else contextlib.nullcontext():  # type: ignore[arg-type]
            hit = load_baseline(opts.baseline_dir, key) if shared else None  # type: ignore[arg-type]
            if hit is not None:
                log.info("%s: probes read from %s (same backbone, data and probe settings)", label, opts.baseline_dir)
                results[name], monitors[name], spectra[name] = hit["results"], hit["monitors"], hit["spectra"]
                continue
            model.to(device)
            kw.update(tag=tag, fingerprint=fingerprint, label=label)
            train_fs = extract_features(model, train_set, transform, split="train", **kw)
            val_fs = extract_features(model, val_set, transform, split="val", **kw)
            if rank == 0 and opts.probes:
                log.info("%s: probing (%s)", label, ", ".join(opts.probes))
            if rank == 0:
                res = run_probes(train_fs, val_fs, opts.probes, cfg, opts, device) if opts.probes else {}
                res.update(
                    extract_seconds=train_fs.seconds + val_fs.seconds,
                    features_cached=train_fs.cached and val_fs.cached,
                )
                results[name] = res
                monitors[name], spectra[name] = representation_stats(model, val_fs, opts.spectrum_rows, device)
                if shared:
                    save_baseline(opts.baseline_dir, key, res, monitors[name], spectra[name])  # type: ignore[arg-type]
            model.cpu()
    if rank != 0:
        return {}

    _write_results(target, train_set.spec, val_set.spec, opts, results, monitors, spectra, log_metrics)
    return results


def _baseline_key(
    fingerprint: str, train_set: ShardCatalog, val_set: ShardCatalog, transform: Any, cfg: Config, opts: EvalOptions
) -> str:
    """What a random-init backbone's probe results depend on (see ssltrain.eval.baseline)."""
    settings = {
        "eval": dataclasses.asdict(cfg.eval),
        "seed": cfg.seed,
        "probes": list(opts.probes),
        "knn_ks": opts.knn_ks,
        "knn_temperature": opts.knn_temperature,
        "linear_lrs": opts.linear_lrs,
        "linear_weight_decays": opts.linear_weight_decays,
        "linear_epochs": opts.linear_epochs,
        "spectrum_rows": opts.spectrum_rows,
    }
    data = {"train": data_signature(train_set), "val": data_signature(val_set)}
    return baseline_key(fingerprint, data, transform_signature(transform), settings)


def _write_results(
    target: EvalTarget,
    train_spec: str,
    val_spec: str,
    opts: EvalOptions,
    results: dict[str, Any],
    monitors: dict[str, dict[str, float]],
    spectra: dict[str, dict[str, list[float]]],
    log_metrics: bool,
) -> None:
    """Warn (collapse, probes below random init), then write eval.json, spectrum.json and the metrics records."""
    cfg = target.cfg
    warnings = []
    for prefix, kind in (("feat", "features"), ("emb", "embeddings")):
        if kind in spectra["ssl"]:  # its length is the batch's rank bound min(N - 1, D)
            warnings += collapse_warnings(
                monitors["ssl"], prefix, cfg.eval.collapse_rankme, cfg.eval.collapse_std, len(spectra["ssl"][kind]) + 1
            )
    for w in warnings:
        log.warning("step %d: %s", target.step, w)
    for w in below_random(results, target.step):
        log.warning("%s", w)
    out = target.out_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "step": target.step,
        "checkpoint": str(target.checkpoint),
        "train_data": train_spec,
        "val_data": val_spec,
        "probes": list(opts.probes),
        **results,
        "monitors": monitors,
        "warnings": warnings,
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    (out / "spectrum.json").write_text(
        json.dumps({"step": target.step, "checkpoint": str(target.checkpoint), "data": val_spec, **spectra})
    )
    if log_metrics:
        metrics = MetricsLog(out, tensorboard=False)
        for record in metric_records(target.step, results, monitors):
            metrics.log(record)


def metric_records(step: int, results: dict[str, Any], monitors: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The eval records for metrics.jsonl: one per (probe, backbone[, k]) and one ``rankme`` per backbone."""
    records = []
    for backbone, res in results.items():
        for k, acc in res.get("knn", {}).items():
            records.append({"step": step, "eval": "knn", "backbone": backbone, "k": int(k), **acc})
        if "linear" in res:
            lin = res["linear"]
            records.append(
                {
                    "step": step,
                    "eval": "linear",
                    "backbone": backbone,
                    "top1": lin["top1"],
                    "top5": lin["top5"],
                    "lr": lin["lr"],
                    "weight_decay": lin["weight_decay"],
                }
            )
        if backbone in monitors:
            records.append({"step": step, "eval": "rankme", "backbone": backbone, **monitors[backbone]})
    return records


def evaluate_run(
    run_dir: Path, checkpoint: Path | None = None, log_metrics: bool = True, options: EvalOptions | None = None
) -> dict[str, Any]:
    """Probe the run's latest (or the given) checkpoint and a random-init backbone; returns {"ssl": ..., "random": ...}.

    ``run_dir`` may also be a checkpoint directory (see :func:`resolve_target`).
    """
    opts = options or EvalOptions()
    return evaluate_target(resolve_target(Path(run_dir), checkpoint, opts.out_dir), opts, log_metrics)


def _knn_top1(k: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r.get("knn", {}).get(k, {}).get("top1")


def format_table(results: dict[str, Any], step: int | None = None) -> str:
    """The probe table printed by ``ssltrain eval``: one row per kNN k (top-1, and top-5 for the main k) and the
    linear probe's top-1 / top-5, SSL next to random init (when probed)."""
    head = f"SSL (step {step})" if step is not None else "SSL"
    cols = [c for c in ("ssl", "random") if c in results]
    names = {"ssl": head, "random": "random init"}
    rows = [f"{'probe':<22}" + "".join(f"{names[c]:>18}" for c in cols)]

    def row(label: str, get: Callable[[dict[str, Any]], float | None]) -> None:
        values = [get(results[c]) for c in cols]
        if all(v is None for v in values):
            return
        rows.append(f"{label:<22}" + "".join(f"{v:>18.3f}" if v is not None else f"{'-':>18}" for v in values))

    ssl = results.get("ssl", {})
    for k in sorted(ssl.get("knn", {}), key=int):
        row(f"kNN top-1 (k={k})", _knn_top1(k))
    if "knn_k" in ssl:
        row(f"kNN top-5 (k={ssl['knn_k']})", lambda r: r.get("knn_top5"))
    row("linear top-1", lambda r: r.get("linear_top1"))
    row("linear top-5", lambda r: r.get("linear_top5"))
    if "linear" in ssl:
        rows.append(
            f"(linear: lr {ssl['linear']['lr']:g}, weight decay {ssl['linear']['weight_decay']:g}, "
            "chosen on a held-out fifth of train)"
        )
    return "\n".join(rows)
