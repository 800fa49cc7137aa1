"""The non-finite guard: a step whose loss or gradients are not finite (on any rank) makes no update anywhere.

``train.finite_check`` says where the decision is taken:

- ``step``: on the host, every step. The flag is read back before the optimizer runs, so every optimizer (LARS,
  LAMB, apex's) is simply not called. The read-back waits for the GPU to finish the backward, draining the queue
  between steps: the host then launches the next step's first kernels while the GPU idles.
- ``deferred``: on the device. The flag stays a tensor (combined across ranks by an all-reduce that the host does not
  wait for) and the update is made conditional on it where it is applied: torch's fused AdamW takes it as
  ``found_inf`` (the kernel leaves weights, moments and step count alone, as ``GradScaler`` uses it), so does
  ssltrain's LARS and LAMB (non-finite gradients zeroed, every write scaled by ``1 - found_inf``), and the EMA
  teachers move by ``(1 - momentum) * (1 - flag)``. The host reads the counts only at log steps, so a step has no
  host synchronisation of its own (the shape CUDA graphs and a deep launch queue need). The updates are the same as
  with ``step``; tests/test_guard.py checks it. Only optimizers that can skip on the device qualify.

The forward itself moves the norm layers' running statistics, before anyone knows whether the step is finite: a
batch with a NaN activation would leave NaN running means in every later checkpoint and evaluation. ``begin_step``
remembers them, and a skipped step puts them back (in deferred mode by a ``torch.where`` on the device).

A finite loss and finite gradients do not make a finite update: a corrupt optimizer state (a NaN or negative second
moment) turns the weights into NaN. ``after_update`` notes on the device whether the parameters are still finite
(one multi-tensor norm), and ``check`` reads it with the counts (every step in ``step`` mode, at log steps in
``deferred``). The weights are then lost, so the loop reloads the last checkpoint at once instead of waiting out the
patience; if the parameters turn non-finite again right after that reload, the checkpoint's own state is the
cause and the run stops with an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssltrain.config import ConfigError
from ssltrain.core.checkpoint_layout import CheckpointError
from ssltrain.core.collectives import agree, is_distributed
from ssltrain.models.ema import copy_where


def _local_grads(model: nn.Module) -> list[Tensor]:
    """Every local gradient (FSDP shards as their local part, DIET rows included)."""
    return [
        p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters() if p.grad is not None
    ]


def any_nonfinite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """True (a 0-d bool tensor on ``device``) where any element of ``tensors`` is NaN or infinite, without a host read.

    ``_foreach_norm`` is a few multi-tensor kernels per device (a norm is not finite iff an element is not)."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        norms = torch.stack([n.float() for n in torch._foreach_norm(group)])
        bad = bad | ~torch.isfinite(norms).all().to(device)
    return bad


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """This rank's part of each tensor (an FSDP DTensor's local shard; plain tensors as they are)."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def nonfinite_flag(loss: Tensor, model: nn.Module) -> Tensor:
    """1.0 where the loss or any local gradient is not finite, else 0.0: a 0-d float32 tensor on the loss's device."""
    bad = ~torch.isfinite(loss.detach().float()) | any_nonfinite(_local_grads(model), loss.device)
    return bad.float()


def norm_statistics(model: nn.Module) -> list[Tensor]:
    """The buffers a training forward updates: running mean, variance and count of every BatchNorm-like layer
    (SyncBatchNorm and apex's included; EMA teachers' too, as they are submodules of the method)."""
    return [
        b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(recurse=False)
    ]


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` tensor: torch's fused Adam/AdamW/SGD, ssltrain's LARS and
    LAMB."""
    return bool(
        getattr(optimizer, "_step_supports_amp_scaling", False) or getattr(optimizer, "supports_found_inf", False)
    )


@dataclass(frozen=True)
class Verdict:
    """What the guard decided about one step's update.

    ``apply`` is False when the host found the step non-finite: the update is not made at all. In deferred mode it is
    always True and ``found_inf`` (a 0-d tensor, 1.0 for a non-finite step) makes the update skip on the device: the
    optimizer takes it as GradScaler hands it to fused optimizers, and ``keep`` (``1 - found_inf``) gates the EMA
    teachers.
    """

    apply: bool
    found_inf: Tensor | None = None

    @property
    def keep(self) -> Tensor | None:
        return None if self.found_inf is None else 1.0 - self.found_inf


@dataclass
class GuardReport:
    """What the host learns at a check: non-finite steps in all, since the last check, and the longest run of them
    in a row seen since the last check (the patience test: reload the last checkpoint when it is long enough), and
    whether an update since the last check left non-finite parameters (reload at once: the weights are lost)."""

    total: int
    new: int
    longest_run: int
    params_nonfinite: bool = False


class FiniteGuard:
    """Lets an update through only when the step is finite on every rank; counts the skipped steps.

    ``begin_step(model)`` (before the forward) remembers the norm layers' running statistics, which a skipped step
    restores. ``judge(loss, model)`` (after the backward) returns the :class:`Verdict` that the update honours:
    skipped outright when the host decided, or gated on the device. ``check()`` returns the counts (a host read in
    deferred mode).
    """

    def __init__(self, mode: str, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        if mode == "deferred" and not supports_device_skip(optimizer):
            raise ConfigError(
                f"train.finite_check=deferred needs an optimizer that can skip a step on the device; "
                f"{type(optimizer).__name__} cannot. Use optim.impl=native (torch's fused AdamW, ssltrain's LARS "
                f"and LAMB; apex's fused optimizers cannot) or train.finite_check=step"
            )
        self.mode = mode
        self._total, self._reported = 0, 0
        self._run, self._longest = 0, 0
        self._watched: nn.Module | None = None
        self._statistics: list[Tensor] = []  # the model's norm buffers and their values before this step's forward
        self._saved: list[Tensor] = []
        self._params_bad: Tensor | None = None  # whether an update since the last check left non-finite parameters
        self._params_seen = False  # what the last check found
        self._reloaded: Path | None = None  # reloaded for non-finite parameters; None once an update stays finite
        if mode == "deferred":  # device-side counters: total, current run, longest run since the last check
            self._counts = torch.zeros(3, device=device)

    def begin_step(self, model: nn.Module) -> None:
        """Remember the running statistics that this step's forward will move (one multi-tensor copy)."""
        if model is not self._watched:
            self._watched, self._statistics = model, norm_statistics(model)
            self._saved = [b.detach().clone() for b in self._statistics]
        elif self._statistics:
            torch._foreach_copy_(self._saved, self._statistics)

    def judge(self, loss: Tensor, model: nn.Module) -> Verdict:
        """Whether (``step`` mode), or on what device-side condition (``deferred``), this step's update happens."""
        flag = nonfinite_flag(loss, model)
        if self.mode == "step":
            if agree(bool(flag.item() > 0)):
                self._total, self._run = self._total + 1, self._run + 1
                self._longest = max(self._longest, self._run)
                if self._statistics:
                    torch._foreach_copy_(self._statistics, self._saved)
                return Verdict(apply=False)
            self._run = 0
            return Verdict(apply=True)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # queued on the device; the host goes on
        flag = flag.to(self._counts.device)
        total, run, longest = self._counts.unbind()
        run_now = (run + flag) * flag  # consecutive non-finite steps, 0 after a finite one
        self._counts.copy_(torch.stack([total + flag, run_now, torch.maximum(longest, run_now)]))
        copy_where(flag.to(dtype=torch.bool), self._statistics, self._saved)
        return Verdict(apply=True, found_inf=flag)

    def after_update(self, model: nn.Module) -> None:
        """After the update and the EMA teachers: note on the device whether every parameter is still finite (no host
        read; :meth:`check` reads it)."""
        params = local_tensors([p.detach() for p in model.parameters()])
        if not params:
            return
        bad = any_nonfinite(params, params[0].device)
        self._params_bad = bad if self._params_bad is None else self._params_bad | bad

    def check(self) -> GuardReport:
        """The counts so far, and whether an update left non-finite parameters (agreed by every rank). This reads the
        device (a sync): in deferred mode call it at log steps.

        Raises CheckpointError when the parameters are non-finite again after a reload made for that reason: the
        reloaded checkpoint's state makes the update non-finite, and reloading it again would loop."""
        params = False
        if self._params_bad is not None:  # an update ran since the last check (on every rank alike)
            params = agree(bool(self._params_bad.item()))
            self._params_bad = None
            if params and self._reloaded is not None:
                raise CheckpointError(
                    f"the parameters are not finite again after reloading '{self._reloaded}', although the losses "
                    "and gradients were finite: the optimizer state saved there (or optim.lr) makes the updates "
                    f"non-finite. Delete '{self._reloaded}' and any later checkpoint to resume from the one before "
                    "it, or lower optim.lr"
                )
            if not params:
                self._reloaded = None
        self._params_seen = params
        if self.mode == "deferred":
            total, run, longest = (int(v) for v in self._counts.tolist())
            self._total, self._run = total, run
            self._longest = longest
            self._counts[2] = self._counts[1]  # the next window's longest run starts from the current one
        report = GuardReport(self._total, self._total - self._reported, self._longest, params)
        self._reported, self._longest = self._total, self._run
        return report

    def reset_run(self, reloaded: Path | None = None) -> None:
        """Forget the current run of non-finite steps (after the weights were ``reloaded`` from that checkpoint)."""
        self._reloaded = reloaded if self._params_seen else None
        self._run = self._longest = 0
        if self.mode == "deferred":
            self._counts[1:] = 0

    @property
    def total(self) -> int:
        """Non-finite steps so far (a device read in deferred mode, without consuming a check's report)."""
        return int(self._counts[0].item()) if self.mode == "deferred" else self._total

    def load(self, total: int) -> None:
        """Start the count of skipped steps from a checkpoint's."""
        self._total = self._reported = total
        if self.mode == "deferred":
            self._counts[0] = total
