"""What the loop reports: a record in metrics.jsonl (and TensorBoard, W&B) at every log step, the progress display
and the monitors' warnings.

Two rates, both over the samples trained since the previous record (all ranks): ``img_per_s``, the training rate,
whose clock starts after the previous record is written and leaves out the monitors' scheduled measurements (online
kNN passes and the like, :meth:`Progress.exclude`), so it excludes those passes and the writing of the records
(steps, data waits and checkpoint saves are in it); and ``img_per_s_wall``, over the wall time between one record
and the next, everything included: what a run of N samples really costs. ``time_s`` is the run's wall-clock time,
carried across resumes by the checkpoints. On a terminal the progress is a bar; in a redirected log (a Slurm job's
output) it is one line per log step, since a bar's carriage-return frames would fill the file.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from ssltrain.config import to_dict
from ssltrain.core.collectives import all_reduce_sum
from ssltrain.engine.norms import total_norm
from ssltrain.engine.run import Run
from ssltrain.engine.step import StepResult
from ssltrain.eval.metrics_log import MetricsLog, WandbSettings

log = logging.getLogger("ssltrain")

BATCH_OUTPUTS = ("embeddings", "features")  # forward outputs that are batches, not loss terms


class Progress:
    """The report of one training process (rank 0 writes; every rank takes part in the log steps' collectives)."""

    def __init__(self, run: Run, last_step: int) -> None:
        cfg = run.cfg
        self.run, self.last_step = run, last_step
        self.metrics: MetricsLog | None = None
        if run.is_main:
            wandb = WandbSettings(cfg.log.wandb_project, cfg.name, to_dict(cfg)) if cfg.log.wandb else None
            self.metrics = MetricsLog(run.dir, resume_step=run.step, tensorboard=cfg.log.tensorboard, wandb=wandb)
        shown = cfg.progress and run.is_main
        self.bar = tqdm(
            total=cfg.steps,
            initial=run.step,
            dynamic_ncols=True,
            unit="step",
            disable=not (shown and sys.stderr.isatty()),
        )
        self.lines = shown and not sys.stderr.isatty()  # a line per log step instead of the bar
        self._start, self._samples, self._wait = time.perf_counter(), 0, 0.0
        self._wall_start = self._start  # the previous record's time (the start, before the first)
        log.info(
            "%d samples in %d shards; %d steps of %d (%d ranks x %d micro-batches); lr %.4g",
            len(run.catalog),
            len(run.catalog.paths),
            cfg.steps,
            run.global_batch,
            run.env.world_size,
            cfg.optim.accumulate,
            run.peak_lr,
        )

    def due(self, step: int) -> bool:
        return step % self.run.cfg.log_every == 0 or step == self.last_step

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a monitor's scheduled measurement) out of the training rate (not the wall rate)."""
        self._start += seconds

    def update(self, result: StepResult, figures: dict[str, float], log_due: bool) -> None:
        """Count the step; at a log step write its record (collective: sums over ranks)."""
        self._samples += result.samples
        self._wait += result.data_wait
        if log_due:
            self._write(result, figures)
            self._start, self._samples, self._wait = time.perf_counter(), 0, 0.0
        self.bar.update(1)

    def _write(self, result: StepResult, figures: dict[str, float]) -> None:
        run = self.run
        skipped = int(all_reduce_sum(torch.tensor(run.data_skipped)).item())
        weights = float(total_norm(run.model.parameters(), of_grads=False))
        now = time.perf_counter()
        wall, self._wall_start = now - self._wall_start, now
        if self.metrics is None:
            return
        record: dict[str, Any] = {
            "step": run.step,
            "epoch": run.step * run.global_batch / run.samples_per_epoch,
            "lr": result.lr,
            "img_per_s": self._samples / (now - self._start),
            "img_per_s_wall": self._samples / wall,
            "data_wait_s": self._wait,
            "time_s": run.elapsed_s(),
            "data_skipped": skipped,
            "data_shards_skipped": len(run.catalog.skipped_shards),
            "nonfinite_steps": run.guard.total,
            "weight_norm": weights,
        }
        if result.grad_norm is not None:
            record["grad_norm"] = float(result.grad_norm)
        record.update({k: float(v.detach()) for k, v in result.outputs.items() if k not in BATCH_OUTPUTS})
        record.update(figures)
        self.metrics.log(record)
        for monitor in run.monitors:
            for warning in monitor.warnings(record):
                log.warning("step %d: %s", run.step, warning)
        loss = record.get("loss", math.nan)
        self.bar.set_postfix(
            loss=f"{loss:.4g}", img_s=f"{record['img_per_s']:.0f}", wall_img_s=f"{record['img_per_s_wall']:.0f}"
        )
        if self.lines:
            log.info(
                "step %d/%d: loss %.4g, lr %.3g, %.0f img/s training, %.0f img/s wall clock",
                run.step,
                run.cfg.steps,
                loss,
                result.lr,
                record["img_per_s"],
                record["img_per_s_wall"],
            )

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.run.data_skipped:
            log.warning(
                "%d corrupt or unreadable samples were skipped on this rank (see metrics.jsonl: data_skipped)",
                self.run.data_skipped,
            )
