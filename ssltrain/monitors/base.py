"""What a monitor is: a callback of the training loop that reads each step's outputs and adds figures to the records
of log steps. Monitors see what the method's forward returned (loss terms, embeddings, features) and never reach into
the model for hidden state; the loop calls every monitor on every rank at every step, so a collective monitor (online
kNN) stays in step across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssltrain.config import Config


@dataclass(frozen=True)
class StepOutputs:
    """One optimizer step as the monitors see it (every tensor detached)."""

    step: int  # optimizer steps done, this one included: the ``step`` of the record it may add to
    terms: Mapping[str, Tensor]  # the method's 0-d loss terms of the last micro-batch ("loss", "invariance", ...)
    embeddings: Tensor | None  # this rank's embedding batch that the loss saw (collapse monitors)
    features: Tensor | None  # backbone features of the first global view (online linear probe)
    labels: Tensor | None  # the batch's labels, when the data has them
    log_due: bool  # a record is written after this step: figures returned now are logged
    lr: float  # the learning rate this step ran at
    lr_factor: float  # the schedule's factor at this step (lr / peak lr): probes follow the same warm-up and cosine


@dataclass(frozen=True)
class MonitorContext:
    """What a monitor may be built from: the run's config, device and (for feature probes) the live method."""

    cfg: Config
    device: torch.device
    model: nn.Module  # the Method, unwrapped (probes call ``model.features``)
    wrapped: nn.Module  # the DDP/FSDP-wrapped module (online kNN unshards FSDP's root around its extraction)
    is_main: bool  # rank 0: the rank whose figures are logged
    num_classes: int  # labels in the training data (0 when it has none)


class Monitor:
    """Base of every monitor. Override what the monitor needs; the defaults do nothing.

    ``state_dict`` returns what exact resume needs (tensors, numbers, lists and dicts of them: it is saved by rank 0
    with ``torch.save`` and loaded with ``weights_only=True``); monitors without state return ``{}``.
    """

    name = "monitor"

    def due(self, step: int) -> bool:
        """Whether ``step`` must be a log step because this monitor measures at it (online kNN's schedule)."""
        return False

    def on_step(self, out: StepOutputs) -> dict[str, float]:
        """Called after every optimizer step on every rank; the figures returned are added to the record when
        ``out.log_due`` (rank 0's are the ones written)."""
        return {}

    def warnings(self, record: Mapping[str, Any]) -> list[str]:
        """Lines for the training log, given the record about to be written (collapse warnings)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
