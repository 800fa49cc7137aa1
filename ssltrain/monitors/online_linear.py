"""The online linear probe: a linear classifier on detached backbone features, trained alongside pretraining.

Its accuracy is an *online* figure: measured on augmented training batches while the backbone moves, it runs below
the offline probe of ``ssltrain eval`` (frozen backbone, unaugmented images, a tuned probe), and is logged as
``online_linear_top1`` so the two are never confused.

The probe is the monitor's own: its ``nn.Linear`` and optimizer live here, not in the method, so it can neither
send a gradient into the backbone nor change the method's optimizer. It is replicated on every rank; each step its
gradients are averaged over the ranks by one all-reduce (as DDP would) that also carries the figures and flags, so
a step costs no host synchronisation outside log steps. Its rate follows the method's schedule (``lr_factor``) at
its own peak: ``eval.online_linear_lr``, or by default 0.1 as momentum SGD when the method trains with LARS, else
1e-3 with AdamW; no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssltrain.config import ConfigError
from ssltrain.core.collectives import all_reduce_mean_no_grad
from ssltrain.methods.base import Method
from ssltrain.monitors.base import Monitor, MonitorContext, StepOutputs

__all__ = ["OnlineLinear"]

_IGNORE = -100  # cross_entropy's ignore_index: out-of-range labels are left out, and reported at the log step


class OnlineLinear(Monitor):
    """Trains on ``out.features`` / ``out.labels`` every step; logs ``online_linear_loss`` (rank 0's) and
    ``online_linear_top1`` (averaged over ranks) at log steps.

    A step whose probe loss or averaged gradient is not finite on any rank leaves the probe and its optimizer
    state as they were: the fused optimizers skip it on the device (``found_inf``, as ``GradScaler`` uses it).
    """

    name = "online_linear"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        peak_lr: float,
        kind: str,
        device: torch.device,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        seed: int = 0,
    ) -> None:
        """``kind``: "sgd" (momentum SGD, dampening 0, as LARS's excluded group) or "adamw"."""
        self.num_classes, self.peak_lr, self.device = num_classes, peak_lr, device
        self.linear = nn.utils.skip_init(nn.Linear, feature_dim, num_classes, device=device)
        _init_linear(self.linear, seed)  # a private generator: the probe leaves the global RNG (and training) alone
        params = list(self.linear.parameters())
        self.optimizer: torch.optim.Optimizer
        if kind == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=peak_lr, momentum=momentum, weight_decay=0.0, fused=True)
            # A zero buffer makes the first update buf = grad as a fresh one would, and keeps a skipped first step
            # exact: the fused kernel would otherwise read an uninitialised buffer on the step after it.
            for p in params:
                self.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        elif kind == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=betas, weight_decay=0.0, fused=True)
        else:
            raise ValueError(f"unknown online probe optimizer '{kind}'; choose sgd or adamw")

    @classmethod
    def build(cls, ctx: MonitorContext) -> OnlineLinear | None:
        """None when ``eval.online_linear`` is off. The classes are ``eval.online_linear_classes``, or when that is
        0 the count the loop read from the training labels (``ctx.num_classes``, saved with the run's config)."""
        cfg = ctx.cfg
        if not cfg.eval.online_linear:
            return None
        classes = cfg.eval.online_linear_classes or ctx.num_classes
        if classes < 1:
            raise ConfigError(
                "eval.online_linear needs the number of classes: set eval.online_linear_classes, or "
                "train on labeled shards (.cls) so it is read from them"
            )
        lars = cfg.optim.name == "lars"
        peak = cfg.eval.online_linear_lr or (0.1 if lars else 1e-3)
        betas = (float(cfg.optim.betas[0]), float(cfg.optim.betas[1]))
        feature_dim = cast(Method, ctx.model).feature_dim  # the unwrapped Method, as MonitorContext says
        return cls(
            feature_dim,
            classes,
            peak,
            "sgd" if lars else "adamw",
            ctx.device,
            momentum=cfg.optim.momentum,
            betas=betas,
            seed=cfg.seed,
        )

    def on_step(self, out: StepOutputs) -> dict[str, float]:
        weight, bias = self.linear.weight, self.linear.bias
        if out.features is not None and out.labels is not None:
            loss, grad_w, grad_b, stats = self._local_step(out.features, out.labels)
        else:  # nothing to learn from on this rank: take part in the average with zeros
            loss = torch.full((), math.nan, device=self.device)
            grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
            stats = torch.zeros(4, device=self.device)
        flat = all_reduce_mean_no_grad(torch.cat([grad_w.reshape(-1), grad_b, stats]))
        n = weight.numel() + bias.numel()
        weight.grad, bias.grad = flat[: weight.numel()].view_as(weight), flat[weight.numel() : n]
        nonfinite, top1, present, bad_labels = flat[n:].unbind()  # each a mean over ranks
        skip = (nonfinite > 0) | (present == 0) | ~torch.isfinite(flat[:n]).all()
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * out.lr_factor
        self.optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not out.log_due:
            return {}
        if float(bad_labels) > 0:  # read at log steps only, on every rank, so all of them stop together
            raise ValueError(
                f"a label is outside the online probe's {self.num_classes} classes; set "
                "eval.online_linear_classes to the number of classes"
            )
        if out.features is None or out.labels is None:
            return {}
        return {"online_linear_loss": float(loss), "online_linear_top1": float(top1 / present)}

    def _local_step(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This rank's loss, gradients and [non-finite loss, top-1, 1 (present), out-of-range labels], in float32
        whatever autocast the caller runs under; the features are detached, so nothing flows back from here."""
        x = features.detach().to(self.device, torch.float32)
        y = labels.to(self.device, torch.long)
        bad = (y < 0) | (y >= self.num_classes)
        with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            logits = self.linear(x)
            loss = F.cross_entropy(logits, y.masked_fill(bad, _IGNORE), ignore_index=_IGNORE)
            grad_w, grad_b = torch.autograd.grad(loss, [self.linear.weight, self.linear.bias])
        loss = loss.detach()
        top1 = (logits.detach().argmax(dim=1) == y).float().mean()
        stats = torch.stack([(~torch.isfinite(loss)).float(), top1, torch.ones_like(top1), bad.sum().float()])
        return loss, grad_w, grad_b, stats

    def state_dict(self) -> dict[str, Any]:
        return {"linear": self.linear.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])


def _init_linear(linear: nn.Linear, seed: int) -> None:
    """nn.Linear's default init (uniform in +-1/sqrt(fan_in)), drawn on the CPU from a generator of its own."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.copy_(torch.empty(linear.weight.shape).uniform_(-bound, bound, generator=gen))
        linear.bias.copy_(torch.empty(linear.bias.shape).uniform_(-bound, bound, generator=gen))
