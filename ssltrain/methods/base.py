"""What every method shares: a backbone, a forward over all views grouped by resolution, pairing of views, the
hooks the loop calls around the optimizer step (schedules, EMA teachers), and the collapse monitors."""

from __future__ import annotations

import copy
import math
from itertools import combinations

import torch
from torch import Tensor, nn

from ssltrain.data.loaders.cpu import Views
from ssltrain.core.collectives import gather, local_rows, world_size
from ssltrain.models.heads import MLP
from ssltrain.eval.representation import embedding_monitors


def view_pairs(num_global: int, num_local: int) -> list[tuple[int, int]]:
    """Pairs compared by two-view losses under multi-crop: every two global views, and every local with every global.

    Indices count global views first, then local views.
    """
    pairs = list(combinations(range(num_global), 2))
    pairs += [(g, num_global + l) for l in range(num_local) for g in range(num_global)]
    return pairs


class Method(nn.Module):
    """Backbone + heads + loss. ``forward(views)`` returns ``{"loss": scalar, <term>: scalar, ...}``.

    The loop calls, per step: ``on_step_start(step, total)`` (schedules), ``forward``, backward,
    ``before_optimizer_step(step)`` (gradient surgery such as frozen prototypes), the optimizer, then
    ``on_step_end(step, total, gate)`` (EMA teachers). Everything these depend on is a function of the step or lives
    in the state dict, so a resumed run continues exactly.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, loss_impl: str = "auto") -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.loss_impl = loss_impl
        self._watched: Tensor | None = None
        self._features: Tensor | None = None  # backbone features of the first global view, this step
        self.online_probe: nn.Module | None = None  # set by build_method when eval.online_linear is on
        # Runs inside the module call, so DDP and FSDP see the probe's parameters used in the forward.
        self.register_forward_hook(_online_probe_terms)

    def features(self, images: Tensor) -> Tensor:
        """Backbone features: what probes evaluate and what is exported."""
        return self.backbone(images)

    def encode_views(self, views: Views, head: nn.Module | None = None, backbone: nn.Module | None = None,
                     num_views: int | None = None) -> list[Tensor]:
        """Run backbone (+ head) once per resolution (views of one size share a batch), split back per view.

        ``num_views`` limits the views encoded (e.g. a teacher sees only the global views).
        """
        backbone = self.backbone if backbone is None else backbone
        groups = [views.global_views, views.local_views]
        if num_views is not None:
            groups = [views.global_views[:num_views], views.local_views[: max(0, num_views - len(views.global_views))]]
        out: list[Tensor] = []
        for group in groups:
            if not group:
                continue
            z = backbone(torch.cat(group))
            if backbone is self.backbone and group is groups[0]:
                self._features = z[: group[0].shape[0]].detach()
            if head is not None:
                z = head(z)
            out.extend(z.chunk(len(group)))
        return out

    def watch(self, embedding: Tensor) -> None:
        """Keep this step's (local) embedding batch for the collapse monitors, detached."""
        self._watched = embedding.detach()

    def monitors(self) -> dict[str, float]:
        """Embedding std, RankMe and LogDet entropy of the last watched batch (computed only when logged)."""
        if self._watched is None or self._watched.shape[0] < 2:
            return {}
        return embedding_monitors(self._watched.float(), prefix="emb")

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


def _online_probe_terms(method: Method, args: tuple, output: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the online linear probe's terms (``online_linear_loss``, ``online_linear_top1``) to a forward's output.

    The probe sees detached features, so its loss trains the probe alone; the loop adds it to the loss it
    backpropagates, and logs ``loss`` (the method's own) apart from it.
    """
    views = args[0] if args else None
    if method.online_probe is None or method._features is None or getattr(views, "label", None) is None:
        return output
    return {**output, **method.online_probe(method._features, views.label)}


class TwoViewMethod(Method):
    """Projector + a loss over pairs of views of the batch gathered from all ranks (VICReg and its variants,
    VCReg, Barlow Twins, SimCLR): subclasses define :meth:`pair_loss` only.

    ``row_split`` methods (contrastive ones) are handed ``rows``, this rank's rows of the stacked pair, to compute
    only those against all gathered columns; the others compute the whole loss on every rank.
    """

    row_split = False

    def __init__(self, backbone: nn.Module, feature_dim: int, projector: list[int], cfg: object,
                 loss_impl: str = "auto") -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        self.projector = MLP(feature_dim, projector)
        self.cfg = cfg

    def pair_loss(self, z_a: Tensor, z_b: Tensor, rows: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, views: Views) -> dict[str, Tensor]:
        z = self.encode_views(views, self.projector)
        self.watch(z[0])
        rows = local_rows(z[0].shape[0], z[0].device) if self.row_split and world_size() > 1 else None
        z = [gather(v) for v in z]
        pairs = view_pairs(len(views.global_views), len(views.local_views))
        return average_terms([self.pair_loss(z[i], z[j], rows) for i, j in pairs])


def apply_head(head: nn.Module, parts: list[Tensor]) -> list[Tensor]:
    """One head call over several views' features (one batch for its BatchNorm), split back per view."""
    return list(head(torch.cat(parts)).chunk(len(parts)))


def average_terms(results: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Mean of each term over view pairs."""
    return {k: torch.stack([r[k] for r in results]).mean() for k in results[0]}
