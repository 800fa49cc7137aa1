"""One training step: ``optim.accumulate`` micro-batches forward and backward, then the guarded update.

The training loop, ``bench/train.py`` and ``ssltrain bench --profile`` all run this function: there is no other copy
of the step. Schedules are handed to the method explicitly (``on_step_start(step, total)``, the EMA gate in
``on_step_end``); the guard's verdict says whether, or on what device-side condition, the update happens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from ssltrain.core.collectives import agree
from ssltrain.core.device import autocast_for
from ssltrain.data.loaders import Views
from ssltrain.engine.norms import total_norm
from ssltrain.engine.optim import optimizer_step, set_lr
from ssltrain.engine.profile import phase, profile_step
from ssltrain.engine.run import Run

log = logging.getLogger("ssltrain")


@dataclass
class StepResult:
    """What one step produced, for the monitors and the log."""

    outputs: dict[str, Tensor]  # the last micro-batch's forward: loss terms, "embeddings", "features"
    labels: Tensor | None  # the last micro-batch's labels (on the device), when the data has them
    samples: int  # samples trained on, over all ranks
    data_wait: float  # seconds this rank waited for its batches
    lr: float  # the learning rate the step ran at
    applied: bool  # False when a micro-batch was too small on some rank: no update anywhere
    grad_norm: Tensor | None = None  # the gradients' L2 norm before clipping (on the device), when updated


def train_step(run: Run, batches: Iterator[Views]) -> StepResult:
    """Run step ``run.step`` on the next micro-batches of ``batches`` (collective); the caller advances the step."""
    step, model, accumulate = run.step, run.model, run.cfg.optim.accumulate
    profile_step()
    lr = run.lr_at(step)
    set_lr(run.optimizer, lr)
    model.on_step_start(step, run.cfg.steps)  # schedules: teacher temperature, ...
    run.optimizer.zero_grad(set_to_none=True)
    run.guard.begin_step(model)  # BN running statistics, put back if the step turns out non-finite
    outputs: dict[str, Tensor] = {}
    labels, samples, wait = None, 0, 0.0
    for micro in range(accumulate):
        start = time.perf_counter()
        with phase("data"):
            views = next(batches)
        wait += time.perf_counter() - start
        _account(run, views, micro)
        # Every rank takes part in every backward (DDP, FSDP and the gathers are collective), so a micro-batch too
        # small on any rank skips the step on all of them.
        if agree(views.batch_size < 2):
            log.warning("step %d: a batch had fewer than 2 usable samples, step skipped", step)
            return StepResult(outputs, None, samples, wait, lr, applied=False)
        views = views.to(run.device)
        outputs = forward_backward(run, views, last_micro=micro == accumulate - 1)
        labels, samples = views.label, samples + views.batch_size * run.env.world_size
    with phase("optimizer"):
        grad_norm = update(run, outputs["loss"])
    return StepResult(outputs, labels, samples, wait, lr, applied=True, grad_norm=grad_norm)


def forward_backward(run: Run, views: Views, last_micro: bool = True) -> dict[str, Tensor]:
    """Forward under autocast and backward of ``loss / accumulate``; gradients are reduced on the last micro-batch."""
    with _grad_sync(run.wrapped, last_micro), autocast_for(run.device, run.cfg.precision):
        with phase("forward"):
            outputs = run.wrapped(views)
        with phase("backward"):
            (outputs["loss"] / run.cfg.optim.accumulate).backward()
    return outputs


def update(run: Run, loss: Tensor) -> Tensor | None:
    """The update after backward, unless the guard refuses it: gradient surgery (e.g. prototypes frozen for the
    first steps), clipping, the optimizer, then the EMA teachers (gated on the device in deferred mode). Returns the
    gradient norm before clipping (a device tensor: read only at log steps), or None when no update was made."""
    verdict = run.guard.judge(loss, run.model)
    if not verdict.apply:
        return None
    run.model.before_optimizer_step(run.step)
    params = [p for p in run.model.parameters() if p.grad is not None]
    grad_norm = total_norm(params, of_grads=True)
    if run.cfg.optim.grad_clip > 0:  # clip_grad_norm_, by the norm of the whole model's gradients
        torch.nn.utils.clip_grads_with_norm_(params, run.cfg.optim.grad_clip, grad_norm, foreach=True)
    optimizer_step(run.optimizer, verdict.found_inf)
    run.model.on_step_end(run.step, run.cfg.steps, verdict.keep)
    run.guard.after_update(run.model)  # are the parameters still finite? (read at the guard's check)
    return grad_norm


def _account(run: Run, views: Views, micro: int) -> None:
    """Record the batch's sample keys (``data.record_samples``) and count the samples it had to skip."""
    if run.sample_record is not None:
        assert views.position is not None  # every loader gives the samples' positions
        run.sample_record.write(run.step, micro, views.index, views.position)
    for problem in views.skipped:
        if run.data_skipped < 10:
            log.warning("skipped sample %s", problem)
        run.data_skipped += 1


def _grad_sync(wrapped: nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(last_micro)
    elif isinstance(wrapped, DistributedDataParallel) and not last_micro:
        return wrapped.no_sync()
    return contextlib.nullcontext()
