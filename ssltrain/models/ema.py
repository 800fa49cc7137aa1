"""Teachers that follow the student by exponential moving average (BYOL, DINO, ...), and the gated copy that lets a
skipped step leave them (and the norm statistics, ssltrain.engine.guard) untouched without a host read."""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import DropPath
from torch import Tensor, nn


def copy_where(condition: Tensor, targets: list[Tensor], sources: list[Tensor]) -> None:
    """``target <- source`` where the 0-d bool ``condition`` holds, on the device (no host read). ``torch.where``,
    not a blend by multiplication: a NaN target times 0 would stay NaN."""
    for target, source in zip(targets, sources):
        target.copy_(torch.where(condition.to(target.device), source, target))


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """EMA momentum from ``base`` at step 0 to 1.0 at the last step, on a cosine (BYOL, DINO)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, gate: Tensor | None = None) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for parameters; buffers are copied.

    ``gate`` (a 0-d tensor, 1 or 0; see ssltrain/engine/guard.py) decides on the device whether the update happens
    at all.
    """
    t_params: list[Tensor] = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if gate is None:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)
        return
    # A 0-d tensor passed as _foreach_lerp_'s Scalar weight is read back to the host (.item(), a device sync); the
    # List overload takes tensors (broadcast per parameter) and computes the host path's lerp bit for bit.
    weight = (1.0 - momentum) * gate.to(t_params[0].device)
    torch._foreach_lerp_(t_params, s_params, [weight] * len(t_params))
    copy_where(gate.to(dtype=torch.bool), list(teacher.buffers()), list(student.buffers()))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a deep copy that the optimizer never sees (``requires_grad`` off), updated by EMA only.

    Without stochastic depth: the official DINO, iBOT and DINOv2 build their teachers with no drop path (only the
    student drops residual branches), and a teacher's targets should not be noised by it.
    """
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return teacher
