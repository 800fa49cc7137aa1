"""``ssltrain eval``: probe a run's backbone on frozen features, next to the same probes on a random-init backbone.

The random-init backbone is built with the run's seed, so it is the exact network the run started from: the gap
between the two columns is what pretraining bought.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ssltrain.checkpoint import Checkpointer, load_checkpoint
from ssltrain.config import Config, from_yaml_text
from ssltrain.data.augment import EvalTransform
from ssltrain.data.loader import EvalShards, make_loader
from ssltrain.data.shards import DataError
from ssltrain.data.stream import ShardCatalog
from ssltrain.eval.knn import knn_accuracy
from ssltrain.eval.linear import linear_probe
from ssltrain.methods import Method, build_method
from ssltrain.metrics import MetricsLog
from ssltrain.train import resolve_device

log = logging.getLogger("ssltrain")


@dataclass
class Features:
    x: Tensor  # [N, D] float32 on the CPU
    y: Tensor  # [N] labels


@torch.no_grad()
def extract_features(model: Method, catalog: ShardCatalog, cfg: Config, device: torch.device) -> Features:
    """``model.features`` of every labeled sample, in catalog order; unreadable samples are skipped and counted."""
    crop = cfg.augment.global_crops
    transform = EvalTransform(crop.size, cfg.augment.mean, cfg.augment.std)
    loader = make_loader(EvalShards(catalog, transform), cfg.data.workers, batch_size=cfg.eval.batch_size)
    model.eval()
    xs, ys, skipped = [], [], 0
    for views in loader:
        skipped += len(views.skipped)
        if views.batch_size == 0:
            continue
        if views.label is None:
            raise DataError(f"shards '{catalog.spec}' have samples without a .cls label; probes need labeled data")
        xs.append(model.features(views.global_views[0].to(device)).float().cpu())
        ys.append(views.label)
    if skipped:
        log.warning("%d unreadable samples skipped while extracting features from '%s'", skipped, catalog.spec)
    if not xs:
        raise DataError(f"no readable labeled samples in '{catalog.spec}'")
    return Features(torch.cat(xs), torch.cat(ys))


def probe(model: Method, train: ShardCatalog, val: ShardCatalog, cfg: Config, device: torch.device) -> dict[str, float]:
    bank, queries = extract_features(model, train, cfg, device), extract_features(model, val, cfg, device)
    num_classes = int(max(bank.y.max(), queries.y.max())) + 1
    knn = knn_accuracy(bank.x, bank.y, queries.x, queries.y, num_classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    linear = linear_probe(
        bank.x, bank.y, queries.x, queries.y, num_classes, epochs=cfg.eval.linear_epochs, lr=cfg.eval.linear_lr,
        weight_decay=cfg.eval.linear_weight_decay, seed=cfg.seed,
    )
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


def load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory (no config.yaml); pass runs/<name>")
    return from_yaml_text(path.read_text(), str(path))


def evaluate_run(run_dir: Path, checkpoint: Path | None = None, log_metrics: bool = True) -> dict[str, dict[str, float]]:
    """Probe the run's latest (or the given) checkpoint and a random-init backbone; returns {"ssl": ..., "random": ...}."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if not cfg.eval.train or not cfg.eval.val:
        raise DataError(f"'{run_dir}/config.yaml' sets no eval.train / eval.val shards: the probes need labeled data")
    device = resolve_device(cfg.device)
    checkpoint = checkpoint or Checkpointer(run_dir / "checkpoints").latest()
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint in '{run_dir}/checkpoints'; train first")
    state = load_checkpoint(checkpoint)
    # The random-init reference: the same architecture and seed, i.e. the network the run started from.
    torch.manual_seed(cfg.seed)
    num_samples = int(state.get("data_samples", 0)) or None  # DIET's head has one row per training sample
    random_init = build_method(cfg, num_samples)
    trained = build_method(cfg, num_samples)
    trained.load_state_dict(state["model"])
    train_set = ShardCatalog.from_spec(cfg.eval.train, "eval.train")
    val_set = ShardCatalog.from_spec(cfg.eval.val, "eval.val")
    results = {
        "ssl": probe(trained.to(device), train_set, val_set, cfg, device),
        "random": probe(random_init.to(device), train_set, val_set, cfg, device),
    }
    step = int(state["step"])
    (run_dir / "eval.json").write_text(json.dumps({"step": step, "checkpoint": str(checkpoint), **results}, indent=2))
    if log_metrics:
        metrics = MetricsLog(run_dir, tensorboard=False)
        for backbone, scores in results.items():
            metrics.log({"step": step, "eval": "knn", "backbone": backbone, "top1": scores["knn_top1"]})
            metrics.log({"step": step, "eval": "linear", "backbone": backbone, "top1": scores["linear_top1"]})
    return results


def format_table(results: dict[str, dict[str, float]], step: int | None = None) -> str:
    head = f"SSL (step {step})" if step is not None else "SSL"
    rows = [f"{'probe':<14}{head:>18}{'random init':>14}"]
    for key, name in (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1")):
        rows.append(f"{name:<14}{results['ssl'][key]:>18.3f}{results['random'][key]:>14.3f}")
    return "\n".join(rows)
