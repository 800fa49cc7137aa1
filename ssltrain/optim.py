"""Optimizers and the learning-rate schedule.

Biases and normalisation parameters (every 1-D parameter) get no weight decay and, under LARS, no layer-wise
adaptation, as in the SimCLR/BYOL/VICReg recipes. The learning rate scales linearly with the global batch
(``lr * batch / 256``) and follows linear warm-up then cosine decay; it is a pure function of the step, so
resuming needs only the step.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from ssltrain.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio ``eta * ||w|| / ||g + wd * w||`` (You et al., 2017).

    Parameter groups with ``exclude=True`` skip weight decay and the trust ratio (plain momentum SGD).
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not group["exclude"]:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0, torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(dp).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(dp)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Split trainable parameters into (decayed/adapted, excluded): excluded are biases and norm weights (1-D).
    The online probe's parameters are in neither: :func:`build_optimizer` gives them a group of their own."""
    regular, excluded = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("online_probe."):
            (excluded if p.ndim <= 1 else regular).append(p)
    return regular, excluded


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / 256


def _by_sharding(groups: list[dict]) -> list[dict]:
    """Split each group into parameters ssltrain shards itself (DIET's head) and the rest, dropping empty ones.

    Under FSDP the rest are DTensors and the sharded head plain tensors; a fused optimizer kernel takes one kind per
    call, and it makes one call per group.
    """
    out = []
    for group in groups:
        for own in (False, True):
            params = [p for p in group["params"] if getattr(p, "ssltrain_sharded", False) is own]
            if params:
                out.append({**group, "params": params})
    return out


def _probe_group(model: nn.Module, cfg: OptimConfig, peak_lr: float, probe_lr: float) -> list[dict]:
    """The online probe's group: no weight decay, no LARS adaptation, its own peak rate on the same schedule."""
    probe = getattr(model, "online_probe", None)
    if probe is None:
        return []
    probe_lr = probe_lr or (0.1 if cfg.name == "lars" else 1e-3)
    return [{"params": list(probe.parameters()), "weight_decay": 0.0, "exclude": True, "lr_scale": probe_lr / peak_lr}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int, probe_lr: float = 0.0) -> torch.optim.Optimizer:
    regular, excluded = param_groups(model)
    lr = scaled_lr(cfg, global_batch)
    probe = _probe_group(model, cfg, lr, probe_lr)
    if cfg.name == "lars":
        groups = _by_sharding([{"params": regular}, {"params": excluded, "weight_decay": 0.0, "exclude": True}])
        return LARS(groups + probe, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.eta)
    if cfg.name == "adamw":
        groups = _by_sharding([{"params": regular}, {"params": excluded, "weight_decay": 0.0}])
        groups += [{k: v for k, v in g.items() if k != "exclude"} for g in probe]
        # The fused kernel (CPU and CUDA) is 4x faster than the per-tensor loop for ResNet-18 on 2 CPU cores.
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), fused=True)
    raise ValueError(f"unknown optimizer '{cfg.name}'; choose lars or adamw")


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up from peak/warmup to peak over ``warmup_steps``, then cosine to ``peak * min_lr_ratio``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled rate; a group with ``lr_scale`` (the online probe's) follows the schedule at its own peak."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
