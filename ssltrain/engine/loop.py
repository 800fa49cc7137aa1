"""The training loop, readable in one screen: build the run, then for each step: the step, the non-finite check,
the monitors, the log, the checkpoint, the stop."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ssltrain.config import Config
from ssltrain.core.checkpoint_layout import CheckpointError
from ssltrain.core.collectives import agree
from ssltrain.engine.preemption import StopRequest
from ssltrain.engine.progress import Progress
from ssltrain.engine.run import Run, build_run
from ssltrain.engine.step import StepResult, train_step
from ssltrain.monitors import StepOutputs

log = logging.getLogger("ssltrain")


def train(cfg: Config, stop_after_steps: int | None = None) -> Path:
    """Pretrain as ``cfg`` says; returns the run directory.

    Run as one process, or one per GPU under torchrun or Slurm (the process group comes from their variables).
    ``stop_after_steps`` ends this process after that many steps (checkpointing first), for time-sliced jobs; the
    next call resumes where it stopped. SIGUSR2/SIGTERM (a scheduler's time limit or preemption) do the same at the
    next step boundary, then hand the signal on (to submitit, which requeues the job).
    """
    run = build_run(cfg)
    last_step = cfg.steps if stop_after_steps is None else min(cfg.steps, run.step + stop_after_steps)
    if run.step >= cfg.steps:
        log.info("run '%s' already finished (%d steps)", cfg.name, cfg.steps)
        run.close()
        return run.dir
    run.model.train()
    # The stop handlers go in before the loader forks its workers: a worker inherits them (and ignores the
    # scheduler's signals itself), so it never runs a handler meant for the main process, such as submitit's requeue.
    with StopRequest() as stop:
        batches = run.batches(last_step)
        progress = Progress(run, last_step)
        try:
            while run.step < last_step:
                result = train_step(run, batches)
                run.step += 1
                log_due = progress.due(run.step) or any(m.due(run.step) for m in run.monitors)
                check_finite(run, log_due)
                progress.update(result, run_monitors(run, result, log_due, progress), log_due)
                stopping = agree(stop.received is not None)
                if run.step % cfg.checkpoint.every == 0 or run.step == last_step or stopping:
                    run.save()
                if stopping:
                    log.warning(
                        "stopped at step %d on %s; the next start resumes here",
                        run.step,
                        stop.received.name if stop.received else "another rank's signal",
                    )
                    break
            run.checkpointer.wait()
        finally:
            progress.close()
            run.close()
            del batches  # stops the loader's workers
        stop.forward()  # a scheduler's signal: hand it on (submitit requeues the job), now that all is saved
    return run.dir


def check_finite(run: Run, log_due: bool) -> None:
    """Report skipped non-finite steps (every step, or at log steps in deferred mode: a host read); after
    ``faults.nonfinite_patience`` of them in a row, reload the last checkpoint's weights and go on with the data."""
    if run.cfg.train.finite_check != "step" and not log_due:
        return
    report = run.guard.check()
    if report.new:
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in all%s)",
            run.step - 1,
            report.total,
            "" if run.cfg.train.finite_check == "step" else f"; {report.new} of the steps since the last log step",
        )
    if report.params_nonfinite or report.longest_run >= run.cfg.faults.nonfinite_patience:
        why = (
            "an update left non-finite parameters (its loss and gradients were finite)"
            if report.params_nonfinite
            else f"{report.longest_run} non-finite steps in a row"
        )
        latest = run.checkpointer.latest()
        if latest is None:
            raise CheckpointError(f"{why} and no checkpoint to reload; lower optim.lr or raise optim.warmup_steps")
        log.warning(
            "step %d: %s; reloading the weights of %s and continuing with the data from here", run.step - 1, why, latest
        )
        run.reload_weights(latest)


def run_monitors(run: Run, result: StepResult, log_due: bool, progress: Progress) -> dict[str, float]:
    """Hand the step's outputs to every monitor (on every rank: some are collective); their figures for the log."""
    out = result.outputs
    outputs = StepOutputs(
        run.step,
        {k: v.detach() for k, v in out.items() if v.dim() == 0},
        out.get("embeddings"),
        out.get("features"),
        result.labels,
        log_due,
        result.lr,
        result.lr / run.peak_lr,
    )
    figures: dict[str, float] = {}
    for monitor in run.monitors:
        start = time.perf_counter()
        figures.update(monitor.on_step(outputs))
        if monitor.due(run.step):  # a scheduled measurement, not training: out of the training rate
            progress.exclude(time.perf_counter() - start)
    return figures
