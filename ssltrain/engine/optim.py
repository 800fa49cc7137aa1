"""Optimizers and the learning-rate schedule.

Biases and normalisation parameters (every 1-D parameter) get no weight decay and, under LARS and LAMB, no
layer-wise adaptation, as in the SimCLR/BYOL/VICReg recipes. The learning rate scales linearly with the global batch
(``lr * batch / 256``) and follows linear warm-up then cosine decay; it is a pure function of the step, so
resuming needs only the step.

``optim.impl`` picks the kernels, never the math: apex's FusedAdam / FusedLAMB where apex imports and the parameters
are plain CUDA tensors, torch's fused AdamW and the multi-tensor LARS / LAMB below otherwise; tests/test_optim_impl.py
checks each native update against a transcription of apex's kernel. LARS always runs natively: apex has no LARS
kernel, and its LARC is a Python loop that syncs the host on every parameter and divides by ``||g|| + wd ||w||``
where ssltrain (like the VICReg and BYOL code) divides by ``||g + wd w||``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from types import ModuleType

import torch
from torch import Tensor, nn

from ssltrain.config import ConfigError, OptimConfig
from ssltrain.engine.apex_probe import load_apex

log = logging.getLogger("ssltrain")

# What torch's multi-tensor (``_foreach_*``) functions take and return.
TensorList = list[Tensor] | tuple[Tensor, ...]

APEX_MISSING = (
    "optim.impl=apex, but NVIDIA apex cannot be imported. It ships in the NGC PyTorch containers (the "
    "Dockerfile builds on one; see docs/docker.md), or build it from https://github.com/NVIDIA/apex with "
    "its CUDA extensions (the PyPI package named 'apex' is another project). Or set optim.impl=native: "
    "the same updates through torch's kernels."
)


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "to_local")


def _trust_ratio(param_norm: Tensor, update_norm: Tensor, eta: float) -> Tensor:
    """``eta * ||w|| / ||u||``, or 1 where either norm is 0 (a fresh zero-initialised layer, a zero update)."""
    one = torch.ones_like(param_norm)
    return torch.where((param_norm > 0) & (update_norm > 0), eta * param_norm / update_norm, one)


def _trust_ratios(params: TensorList, updates: TensorList, eta: float) -> list[Tensor]:
    """One 0-d ratio per tensor: two multi-tensor norm kernels for plain tensors; per tensor for FSDP's DTensors,
    whose norms are reductions across ranks."""
    if any(_is_dtensor(p) for p in params):
        return [_trust_ratio(torch.norm(p), torch.norm(u), eta) for p, u in zip(params, updates)]
    param_norms = torch.stack(torch._foreach_norm(params))
    update_norms = torch.stack(torch._foreach_norm(updates))
    return list(_trust_ratio(param_norms, update_norms, eta).unbind())


def _zero_nonfinite(tensors: TensorList) -> list[Tensor]:
    """Copies with NaN and inf entries set to 0, before a device-side skip masks them (NaN * 0 is NaN)."""
    return [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in tensors]


def _scaled(updates: TensorList, ratios: TensorList) -> TensorList:
    """Each update times its ratio: one multi-tensor kernel for plain tensors, per tensor for DTensors."""
    if any(_is_dtensor(u) for u in updates):
        return [u.mul(q) for u, q in zip(updates, ratios)]
    return torch._foreach_mul(updates, ratios)


def _momentum_step(
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    updates: TensorList,
    momentum: float,
    lr: float,
    keep: Tensor | None = None,
) -> None:
    """``buf = momentum * buf + u`` (``buf = u`` on a parameter's first step), ``w -= lr * buf``, as torch's SGD.

    ``keep`` (0-d, 1 or 0) makes the whole update conditional on the device: with 0 every buffer and weight keeps
    its value (a buffer created by a skipped first step is 0, so the next step still sets ``buf = u``).
    """
    if keep is not None:
        updates = torch._foreach_mul(updates, keep)
    bufs = []
    for p, u in zip(params, updates):
        state = optimizer.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.clone(u).detach()
        else:
            bufs.append((state["momentum_buffer"], u))
    if bufs:
        old, new = [b for b, _ in bufs], [u for _, u in bufs]
        torch._foreach_mul_(old, momentum if keep is None else keep * momentum + (1 - keep))
        torch._foreach_add_(old, new)
    steps = [optimizer.state[p]["momentum_buffer"] for p in params]
    if keep is None:
        torch._foreach_add_(params, steps, alpha=-lr)
    else:
        torch._foreach_add_(params, torch._foreach_mul(steps, keep * -lr))


class _MultiTensorOptimizer(torch.optim.Optimizer):
    """The ``step`` of LARS and LAMB: the closure, then ``_update_group`` for each group's parameters with grads."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        raise NotImplementedError


def _grads(params: list[Tensor]) -> TensorList:
    """The gradients of ``params`` (``step`` passes only parameters that have one)."""
    return [p.grad for p in params if p.grad is not None]


class LARS(_MultiTensorOptimizer):
    """SGD with momentum and layer-wise trust ratio ``eta * ||w|| / ||g + wd * w||`` (You et al., 2017).

    Parameter groups with ``exclude=True`` skip weight decay and the trust ratio (plain momentum SGD). Each group
    is updated with multi-tensor kernels: a ResNet-50 step is about ten kernel launches instead of ~1,600.

    A ``found_inf`` attribute (a 0-d tensor, set by :func:`optimizer_step` under ``train.finite_check=deferred``) skips
    the step on the device: non-finite gradients are zeroed first, then every write is scaled by ``1 - found_inf``.
    """

    supports_found_inf = True

    def __init__(
        self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum}, eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, exclude=False))

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        updates = _grads(params)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            updates = _zero_nonfinite(updates)
        if not group["exclude"]:
            updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
            updates = _scaled(updates, _trust_ratios(params, updates, group["eta"]))
        keep = None if found_inf is None else 1.0 - found_inf.to(params[0].device)
        _momentum_step(self, params, updates, group["momentum"], group["lr"], keep)


class LAMB(_MultiTensorOptimizer):
    """LAMB (You et al., 2020) exactly as apex's FusedLAMB computes it (``adam_w_mode``, grad averaging, bias
    correction, ``use_nvlamb=False``): ``u = m_hat / (sqrt(v_hat) + eps) + wd * w``, then
    ``w -= lr * (||w|| / ||u||) * u``. Groups with ``weight_decay == 0`` (biases and norms) take the plain Adam
    step ``w -= lr * u``, as FusedLAMB does for them. Global gradient clipping is ``optim.grad_clip``, applied
    before the step (FusedLAMB's own is disabled when ssltrain builds it).

    A ``found_inf`` attribute (see LARS) skips the step on the device: the step counts then live on the device and
    grow by ``1 - found_inf``, the bias corrections are computed there, and moments and weights move by their
    update times ``1 - found_inf`` (non-finite gradients zeroed first).
    """

    supports_found_inf = True

    def __init__(
        self,
        params: Iterable,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas) or eps <= 0:
            raise ValueError(f"LAMB: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else 1.0 - found_inf.to(params[0].device)
        grads = _grads(params)
        if keep is not None:  # a skipped step's gradients become 0
            grads = torch._foreach_mul(_zero_nonfinite(grads), keep)
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0) if keep is None else torch.zeros((), device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if keep is None:
                state["step"] += 1
            else:
                state["step"] = state["step"].to(p.device) + keep
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        if keep is None:
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            steps = [float(self.state[p]["step"]) for p in params]
            corrections1, corrections2 = [1 - beta1**s for s in steps], [1 - beta2**s for s in steps]
        else:  # the same moments, then kept or not on the device: new * keep + old * (1 - keep), exact for 0 and 1
            moved_m = torch._foreach_lerp(m, grads, 1 - beta1)
            moved_v = torch._foreach_mul(v, beta2)
            torch._foreach_addcmul_(moved_v, grads, grads, value=1 - beta2)
            for old, new in ((m, moved_m), (v, moved_v)):
                torch._foreach_mul_(new, keep)
                torch._foreach_mul_(old, 1.0 - keep)
                torch._foreach_add_(old, new)
            # In float64 as the host's Python floats are; a first step that was skipped leaves the count at 0, and
            # the clamp keeps 0 / 0 out of the (then discarded) update.
            counts = torch.stack([self.state[p]["step"] for p in params]).double().clamp_min(1)
            corrections1 = list((1 - beta1**counts).float().unbind())
            corrections2 = list((1 - beta2**counts).float().unbind())
        m_hat = torch._foreach_div(m, corrections1)
        denom = torch._foreach_sqrt(torch._foreach_div(v, corrections2))
        torch._foreach_add_(denom, group["eps"])
        updates: TensorList = torch._foreach_div(m_hat, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
            updates = _scaled(updates, _trust_ratios(params, updates, 1.0))
        if keep is not None:
            torch._foreach_mul_(updates, keep)
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def _apex_optimizers() -> ModuleType | None:
    """``apex.optimizers`` with its CUDA extensions, or None (not installed, the unrelated PyPI 'apex', no CUDA)."""
    return load_apex("optimizers", "amp_C")  # amp_C: the fused kernels, absent from a Python-only build


def resolve_impl(cfg: OptimConfig, params: list[Tensor]) -> str:
    """'apex' or 'native' for these parameters; ``optim.impl=apex`` where apex cannot run is a ConfigError."""
    plain_cuda = bool(params) and all(p.is_cuda and not _is_dtensor(p) for p in params)
    if cfg.impl == "native":
        return "native"
    apex = _apex_optimizers()
    if cfg.impl == "auto":
        return "apex" if apex is not None and plain_cuda and cfg.name != "lars" else "native"
    if apex is None:
        raise ConfigError(APEX_MISSING)
    if not plain_cuda:
        where = "FSDP-sharded (DTensors)" if any(_is_dtensor(p) for p in params) else f"on {params[0].device}"
        raise ConfigError(
            f"optim.impl=apex: apex's fused optimizers take plain CUDA tensors, and these parameters "
            f"are {where}; set optim.impl=native or auto"
        )
    if cfg.name == "lars":
        log.info(
            "optim.impl=apex: apex has no fused LARS (its LARC is a per-parameter Python loop with another "
            "trust ratio); using ssltrain's multi-tensor LARS"
        )
        return "native"
    return "apex"


def _apex_optimizer(kind: str, groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """apex's FusedAdam (AdamW mode) or FusedLAMB, taking ``zero_grad(set_to_none=...)`` like torch's optimizers
    (apex's own ``zero_grad`` takes no argument in some releases)."""
    apex = _apex_optimizers()
    if apex is None:  # resolve_impl chose apex only where it imports
        raise ConfigError(APEX_MISSING)
    base = apex.FusedAdam if kind == "adamw" else apex.FusedLAMB

    class Fused(base):  # type: ignore[misc, valid-type]
        def zero_grad(self, set_to_none: bool = True) -> None:
            torch.optim.Optimizer.zero_grad(self, set_to_none=set_to_none)

    Fused.__name__ = Fused.__qualname__ = f"Apex{base.__name__}"
    if kind == "adamw":
        return Fused(groups, lr=lr, betas=tuple(cfg.betas), eps=1e-8, weight_decay=cfg.weight_decay, adam_w_mode=True)
    return Fused(
        groups,
        lr=lr,
        betas=tuple(cfg.betas),
        eps=1e-6,
        weight_decay=cfg.weight_decay,
        adam_w_mode=True,
        grad_averaging=True,
        max_grad_norm=float("inf"),
        use_nvlamb=False,
    )


def param_groups(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Split trainable parameters into (decayed/adapted, excluded): excluded are biases and norm weights (1-D)."""
    regular: list[Tensor] = []
    excluded: list[Tensor] = []
    for p in model.parameters():
        if p.requires_grad:
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


def _by_lr_scale(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Split each group by the method's learning-rate multipliers (``Method.lr_scales``: parameter-name prefix ->
    scale); a scaled part gets ``lr_scale``, which :func:`set_lr` applies on the common schedule."""
    lr_scales = getattr(model, "lr_scales", None)
    scales: dict[str, float] = lr_scales() if callable(lr_scales) else {}
    if not scales:
        return groups
    scale_of = {
        id(p): s for name, p in model.named_parameters() for prefix, s in scales.items() if name.startswith(prefix)
    }
    out = []
    for group in groups:
        by_scale: dict[float, list[Tensor]] = {}
        for p in group["params"]:
            by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
        for scale, params in by_scale.items():
            out.append({**group, "params": params, **({"lr_scale": scale} if scale != 1.0 else {})})
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    regular, excluded = param_groups(model)
    lr = scaled_lr(cfg, global_batch)
    if cfg.name == "lars":
        resolve_impl(cfg, regular + excluded)  # optim.impl=apex without apex is still an error
        groups = _by_sharding([{"params": regular}, {"params": excluded, "weight_decay": 0.0, "exclude": True}])
        groups = _by_lr_scale(model, groups)
        return LARS(groups, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.eta)
    if cfg.name not in ("adamw", "lamb"):
        raise ValueError(f"unknown optimizer '{cfg.name}'; choose lars, adamw or lamb")
    beta1, beta2 = cfg.betas
    groups = _by_lr_scale(model, _by_sharding([{"params": regular}, {"params": excluded, "weight_decay": 0.0}]))
    if resolve_impl(cfg, [p for g in groups for p in g["params"]]) == "apex":
        return _apex_optimizer(cfg.name, groups, cfg, lr)
    if cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=(beta1, beta2), eps=1e-6, weight_decay=cfg.weight_decay)
    # The fused kernel (CPU and CUDA) rather than the per-tensor loop: see docs/results.md for the measured gain.
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, betas=(beta1, beta2), fused=True)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up from peak/warmup to peak over ``warmup_steps``, then cosine to ``peak * min_lr_ratio``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled rate; a group with ``lr_scale`` (BYOL's predictor) follows the schedule
    at its own peak."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(optimizer: torch.optim.Optimizer, found_inf: Tensor | None = None) -> None:
    """``optimizer.step()``, skipped on the device where ``found_inf`` is 1 (the guard's deferred mode).

    The flag travels as an attribute because that is how torch's GradScaler hands it to the fused optimizers, which
    read it in ``step``; LARS and LAMB here read it the same way. It is set for this call only.
    """
    if found_inf is None:
        optimizer.step()
        return
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
