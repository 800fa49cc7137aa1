"""What every method shares: a backbone, a forward over all views grouped by resolution, pairing of views, the
hooks the loop calls around the optimizer step (schedules, EMA teachers), and the outputs it returns."""

from __future__ import annotations

from itertools import combinations
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ssltrain.config import Config
from ssltrain.core.collectives import gather, local_rows, world_size
from ssltrain.data.loaders import Views
from ssltrain.data.masks import MaskGenerator
from ssltrain.models.heads import MLP


def view_pairs(num_global: int, num_local: int) -> list[tuple[int, int]]:
    """Pairs compared by two-view losses under multi-crop: every two global views, and every local with every global.

    Indices count global views first, then local views.
    """
    pairs = list(combinations(range(num_global), 2))
    pairs += [(g, num_global + l) for l in range(num_local) for g in range(num_global)]
    return pairs


class Encoded(NamedTuple):
    """What :meth:`Method.encode_views` computed: one output per view, and the backbone features of the first
    global view (detached; the online linear probe's input)."""

    views: list[Tensor]
    features: Tensor


class Method(nn.Module):
    """Backbone + heads + loss. ``forward(views)`` returns ``{"loss": scalar, <term>: scalar, ...,
    "embeddings": (B, D), "features": (B, F)}``: the loss terms (0-d), then, detached, this rank's embedding batch
    the loss saw (for the collapse monitors) and the backbone features of the first global view (for the online
    linear probe).

    The loop calls, per step: ``on_step_start(step, total)`` (schedules), ``forward``, backward,
    ``before_optimizer_step(step)`` (gradient surgery such as frozen prototypes), the optimizer, then
    ``on_step_end(step, total, gate)`` (EMA teachers). Everything these depend on is a function of the step or lives
    in the state dict, so a resumed run continues exactly.
    """

    masks: MaskGenerator | None = None  # what a masked method draws per sample into ``Views.masks`` (data/masks)
    # The submodule ``features`` reads and ``ssltrain export`` writes: the student backbone, or (I-JEPA) the EMA
    # target encoder the paper evaluates. Feature caches are keyed by its weights.
    feature_module: str = "backbone"

    def __init__(self, backbone: nn.Module, feature_dim: int, loss_impl: str = "auto") -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.loss_impl = loss_impl

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> Method:
        """The method as ``cfg`` describes it, on ``backbone``; ``num_samples`` is the dataset size."""
        raise NotImplementedError

    def features(self, images: Tensor) -> Tensor:
        """Backbone features: what probes evaluate and what is exported."""
        return self.backbone(images)

    def encode_views(
        self,
        views: Views,
        head: nn.Module | None = None,
        backbone: nn.Module | None = None,
        num_views: int | None = None,
    ) -> Encoded:
        """Run backbone (+ head) once per resolution (views of one size share a batch), split back per view.

        ``num_views`` limits the views encoded (e.g. a teacher sees only the global views).
        """
        backbone = self.backbone if backbone is None else backbone
        groups = [views.global_views, views.local_views]
        if num_views is not None:
            groups = [views.global_views[:num_views], views.local_views[: max(0, num_views - len(views.global_views))]]
        out: list[Tensor] = []
        features: Tensor | None = None
        for group in groups:
            if not group:
                continue
            z = backbone(torch.cat(group))
            if features is None:
                features = z[: group[0].shape[0]].detach()
            if head is not None:
                z = head(z)
            out.extend(z.chunk(len(group)))
        if features is None:
            raise ValueError("a batch needs at least one view")
        return Encoded(out, features)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix (e.g. ``{"predictor.": 10.0}``); the optimizer puts
        each in a group of its own on the common schedule."""
        return {}

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Set step-dependent schedules (teacher temperature, ...) before the forward."""

    def before_optimizer_step(self, step: int) -> None:
        """Adjust gradients after backward (e.g. keep some parameters frozen for the first steps)."""

    def on_step_end(self, step: int, total_steps: int, gate: Tensor | None = None) -> None:
        """Update EMA teachers after the optimizer step (on the device only where ``gate`` is 1, when given)."""

    def forward(self, views: Views) -> dict[str, Tensor]:
        raise NotImplementedError


def outputs(terms: dict[str, Tensor], embeddings: Tensor, features: Tensor) -> dict[str, Tensor]:
    """A forward's result: the loss terms, then the embeddings and features, detached."""
    return {**terms, "embeddings": embeddings.detach(), "features": features.detach()}


class TwoViewMethod(Method):
    """Projector + a loss over pairs of views of the batch gathered from all ranks (VICReg and its variants,
    VCReg, Barlow Twins, SimCLR): subclasses define :meth:`pair_loss` and :meth:`section` only.

    ``row_split`` methods (contrastive ones) are handed ``rows``, this rank's rows of the stacked pair, to compute
    only those against all gathered columns; the others compute the whole loss on every rank.
    """

    row_split = False

    def __init__(
        self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: Any, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    @classmethod
    def section(cls, cfg: Config) -> object:
        """This method's own part of ``cfg.method`` (e.g. ``cfg.method.vicreg``)."""
        raise NotImplementedError

    @classmethod
    def from_config(
        cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None
    ) -> TwoViewMethod:
        return cls(backbone, feature_dim, list(cfg.method.projector), cls.section(cfg), cfg.loss.impl)

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, views: Views) -> dict[str, Tensor]:
        z, features = self.encode_views(views, self.projector)
        embeddings = z[0]
        rows = local_rows(z[0].shape[0], z[0].device) if self.row_split and world_size() > 1 else None
        z = [gather(v) for v in z]
        pairs = view_pairs(len(views.global_views), len(views.local_views))
        return outputs(average_terms([self.pair_loss(z[i], z[j], rows) for i, j in pairs]), embeddings, features)


def apply_head(head: nn.Module, parts: list[Tensor]) -> list[Tensor]:
    """One head call over several views' features (one batch for its BatchNorm), split back per view."""
    return list(head(torch.cat(parts)).chunk(len(parts)))


def average_terms(results: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Mean of each term over view pairs."""
    return {k: torch.stack([r[k] for r in results]).mean() for k in results[0]}
