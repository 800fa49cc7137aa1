"""Where numbers go: ``metrics.jsonl`` (one JSON object a line), TensorBoard and optionally Weights & Biases, kept
consistent on resume."""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from ssltrain.config import ConfigError

log = logging.getLogger("ssltrain")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends training and eval records; on resume at step ``s`` it drops training records past ``s``.

    Those records were written by the interrupted run after its last checkpoint; the resumed run writes them again,
    so keeping both would draw two curves over the same steps. TensorBoard gets the same treatment (``purge_step``).
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        tensorboard: bool = True,
        wandb: WandbSettings | None = None,
    ) -> None:
        """``resume_step``: 0 starts a fresh log, s > 0 continues a resumed run, None appends (eval records).
        ``wandb``: also mirror every record to this Weights & Biases run."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step == 0 and self.path.is_file():
            self.path.unlink()
        elif resume_step and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if "eval" in r or r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None) if tensorboard else None
        self.wandb = start_wandb(wandb, run_dir, fresh=resume_step == 0) if wandb is not None else None

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for name, value in _scalars(record, "train/").items():
                self.tb.add_scalar(name, value, int(record["step"]))
        if self.wandb is not None:
            self.wandb.log({"step": int(record["step"]), **_scalars(record, "")})  # "step" is the x axis

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# ---------------------------------------------------------------- Weights & Biases


@dataclass
class WandbSettings:
    project: str
    name: str
    config: dict[str, Any]  # the resolved config


WANDB_ID_FILE = "wandb_id"


def require_wandb() -> None:
    """Fail at start, not at the first log step, when log.wandb=true but wandb cannot be imported."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"log.wandb=true needs the wandb package, which cannot be imported ({err}): "
            "pip install wandb (or pip install 'ssltrain[wandb]'), or set log.wandb=false"
        ) from None


def _wandb_id(run_dir: Path, fresh: bool) -> str:
    """One W&B run per run directory: the id is kept in ``<run>/wandb_id`` so a resume continues that W&B run;
    a fresh start (step 0, metrics.jsonl restarted too) gets a new one."""
    path = run_dir / WANDB_ID_FILE
    if not fresh and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def start_wandb(settings: WandbSettings, run_dir: Path, fresh: bool) -> Any:
    """``wandb.init`` for this run directory (files under ``<run>/wandb/``), resuming its W&B run when one exists.

    WANDB_MODE (offline, disabled) is wandb's own to read. Online without credentials or without a network, the run
    is recorded offline instead, with a warning (``wandb sync <run>/wandb/offline-run-*`` uploads it later): a
    tracker must never stop a training run.
    """
    import wandb

    kwargs: dict[str, Any] = dict(
        project=settings.project,
        name=settings.name,
        dir=str(run_dir),
        config=settings.config,
        id=_wandb_id(run_dir, fresh),
        resume="allow",
    )
    try:
        run = wandb.init(**kwargs)
    except (wandb.errors.UsageError, wandb.errors.CommError) as err:
        log.warning(
            "wandb could not start online (%s); logging offline under %s/wandb (upload with `wandb sync`)",
            str(err).splitlines()[0] if str(err) else type(err).__name__,
            run_dir,
        )
        run = wandb.init(mode="offline", **kwargs)
    # Plot against the trainer's step, not wandb's own counter: a resumed run re-logs the steps after its last
    # checkpoint, which wandb would drop as going back in time if they were its step.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _scalars(record: Mapping[str, Any], train_prefix: str) -> dict[str, float]:
    """The record's numbers under tracker names: eval records under ``eval/<kind>/``, training ones under
    ``train_prefix`` (TensorBoard ``train/``, W&B none)."""
    prefix = f"eval/{record['eval']}/" if "eval" in record else train_prefix
    return {
        prefix + key: value
        for key, value in record.items()
        if key not in ("step", "eval") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
