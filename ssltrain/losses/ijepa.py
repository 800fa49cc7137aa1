"""I-JEPA's loss (Assran et al. 2023; facebookresearch/ijepa src/train.py ``loss_fn``): the predictor's outputs at
the target blocks regressed onto the layer-normed target-encoder features there, smooth L1 (beta 1), mean over
every element.

Per rank the mean over this rank's rows; every rank holds the same number of rows of the same shapes (the masks
are truncated over the global batch), so the mean over ranks is the whole batch's loss, which is what the
official ``AllReduce`` reports (its backward passes each rank's gradient through unchanged, as here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x`` [B, N, D] at ``index`` [B, K] -> [B, K, D] (the official ``apply_masks`` for one mask)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def target_features(tokens: Tensor, targets: Tensor) -> Tensor:
    """The regression targets: the target encoder's patch tokens [B, N, D], layer-normed over the features without
    affine parameters, at the target blocks ``targets`` [B, npred, Nt] -> [npred * B, Nt, D], block-major like
    the official ``apply_masks(h, masks_pred)``."""
    h = F.layer_norm(tokens, (tokens.shape[-1],))
    return torch.cat([gather_tokens(h, targets[:, j]) for j in range(targets.shape[1])])


def ijepa_loss(predictions: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """``{"loss": smooth_l1(predictions, targets)}``, both [M, Nt, D], computed in at least float32."""
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    dtype = torch.promote_types(predictions.dtype, torch.float32)
    return {"loss": F.smooth_l1_loss(predictions.to(dtype), targets.to(dtype))}


__all__ = ["gather_tokens", "ijepa_loss", "target_features"]
