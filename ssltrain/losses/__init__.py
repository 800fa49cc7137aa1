"""Eager reference implementations of the self-supervised losses, in plain torch: one module per family.

These are the specification: fused kernels and distributed variants are tested against them, so every function
favours exactness and readability over speed. Each loss is one function whose docstring states the formula;
inputs are upcast to at least float32 (bf16/fp16 -> float32, float64 stays float64) before any arithmetic,
because variances, Gram matrices and log-sum-exps lose too much in half precision. :mod:`.dispatch` is the one
place that picks a loss's fused Triton kernel instead (``loss.impl``).

Shapes: ``z_a`` and ``z_b`` are ``(N, D)`` embeddings of two views of the same N samples; row ``i`` of
``z_a`` and row ``i`` of ``z_b`` are a positive pair. Losses over the stacked 2N rows ``[view a; view b]``
(NT-Xent, CISSL) take an optional ``rows`` index so that a distributed caller can evaluate only its own rows
against the gathered batch; the mean over equal-sized row partitions equals the full loss.
"""

from __future__ import annotations

from ssltrain.losses.barlow_twins import barlow_twins_loss
from ssltrain.losses.byol import byol_loss
from ssltrain.losses.cissl import cissl_loss
from ssltrain.losses.common import marginal_entropy
from ssltrain.losses.diet import diet_loss, sharded_diet_loss
from ssltrain.losses.dino import dino_loss
from ssltrain.losses.dinov2 import dinov2_dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp_teacher
from ssltrain.losses.dissl import dissl_loss, global_marginal_entropy
from ssltrain.losses.ijepa import ijepa_loss
from ssltrain.losses.infonce import nt_xent_loss
from ssltrain.losses.lejepa import lejepa_loss, sigreg, sigreg_directions
from ssltrain.losses.mae import mae_loss, patchify, unpatchify
from ssltrain.losses.mocov3 import moco_contrastive_loss, mocov3_loss
from ssltrain.losses.swav import sinkhorn_knopp, swav_loss
from ssltrain.losses.vcreg import orthonormality_penalty, vcreg_loss
from ssltrain.losses.vicreg import (
    covariance_offdiag,
    logdet_entropy,
    pairwise_entropy,
    variance_hinge,
    vicreg_logdet_loss,
    vicreg_loss,
    vicreg_pairwise_loss,
)

__all__ = [
    "barlow_twins_loss",
    "byol_loss",
    "cissl_loss",
    "covariance_offdiag",
    "diet_loss",
    "dino_loss",
    "dinov2_dino_loss",
    "dissl_loss",
    "global_marginal_entropy",
    "ibot_patch_loss",
    "ijepa_loss",
    "koleo_loss",
    "lejepa_loss",
    "logdet_entropy",
    "mae_loss",
    "marginal_entropy",
    "moco_contrastive_loss",
    "mocov3_loss",
    "nt_xent_loss",
    "orthonormality_penalty",
    "pairwise_entropy",
    "patchify",
    "sharded_diet_loss",
    "sigreg",
    "sigreg_directions",
    "sinkhorn_knopp",
    "sinkhorn_knopp_teacher",
    "swav_loss",
    "unpatchify",
    "variance_hinge",
    "vcreg_loss",
    "vicreg_logdet_loss",
    "vicreg_loss",
    "vicreg_pairwise_loss",
]
