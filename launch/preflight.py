"""What can be checked before any rank starts: the world size against the batch, the data paths, the run directory.

``launch slurm`` runs it in the login shell (a typo fails in a second, not after hours in the queue), ``launch
local`` before torchrun starts its workers, ``train`` before building the run. It reads no shard, only their names:
cheap on a login node, even for a large data set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ssltrain.config import Config, ConfigError, check_same_model, check_world_size, config_warnings, from_yaml_text
from ssltrain.core.checkpoint_layout import CheckpointError, latest_checkpoint, read_meta


def check_data(cfg: Config) -> None:
    """``data.train`` names readable shards; so do ``eval.train``/``eval.val`` when set, and the online kNN monitor
    has both. Raises DataError (from the shard resolver) or ConfigError naming the key and the fix."""
    from ssltrain.data.shards import DataError, expand_shards  # the data layer imports torch: only when checking
    from ssltrain.data.store import is_remote

    specs = {"data.train": cfg.data.train, "eval.train": cfg.eval.train, "eval.val": cfg.eval.val}
    if cfg.eval.online_knn_every > 0:
        for key in ("eval.train", "eval.val"):
            if not specs[key]:
                raise ConfigError(
                    f"eval.online_knn_every > 0 needs labeled shards in '{key}'; set {key}=PATH, or "
                    "eval.online_knn_every=0 to turn the online kNN monitor off"
                )
    for key, spec in specs.items():
        # Shards in a store (s3://, gs://, https://) are not local paths: their manifest is read when the run starts.
        local = ",".join(part for part in spec.split(",") if part.strip() and not is_remote(part.strip()))
        if not local:
            continue
        for path in expand_shards(local, key):
            if not os.access(path, os.R_OK):
                raise DataError(f"shard '{path}' ({key}) is not readable (permission denied); fix its permissions")


def check_run_dir(cfg: Config) -> None:
    """The run directory can be created and written: ``out_dir`` (or a folder above it) is not a file, and the
    nearest existing folder takes a file. Leaves nothing behind."""
    run_dir = cfg.run_dir.expanduser().absolute()
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"'{existing}' is a file, so the run directory '{run_dir}' cannot be made; set out_dir (and name) to a "
            "directory path (created if missing)"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".ssltrain-write-check-", dir=existing)
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory '{run_dir}': '{existing}' is not writable ({err.strerror}); make it "
            "writable or set out_dir to a writable directory"
        ) from None
    os.close(fd)
    Path(probe).unlink()


def check_resume(cfg: Config) -> None:
    """A run that will resume continues the model and the data order of its latest checkpoint: another method or
    backbone, or another global batch, is refused here rather than after the job has waited in the queue. A
    checkpoint whose metadata cannot be read is left to training (which reports it, or falls back)."""
    latest = latest_checkpoint(cfg.run_dir / "checkpoints") if cfg.checkpoint.resume else None
    if latest is None:
        return
    try:
        meta = read_meta(latest)
        old = from_yaml_text(meta["config"], str(latest))
        step, position = int(meta["step"]), int(meta["data_position"])
    except (CheckpointError, ConfigError, KeyError, TypeError, ValueError):
        return
    problem = check_same_model(old, cfg)
    if problem is not None:
        raise ConfigError(f"run directory '{cfg.run_dir}' {problem}")
    if step > 0 and position != step * cfg.data.batch_size:
        raise ConfigError(
            f"checkpoint '{latest}' was made with global batch {position // step}, this config has "
            f"{cfg.data.batch_size}: resuming would change the data order; keep data.batch_size, or start a new run "
            "under another name (name=NEW)"
        )


def preflight(cfg: Config, world_size: int) -> list[str]:
    """Every check above plus the config's against ``world_size`` ranks; returns the warnings to print at start."""
    check_world_size(cfg, world_size)
    check_data(cfg)
    check_run_dir(cfg)
    check_resume(cfg)
    return config_warnings(cfg)
