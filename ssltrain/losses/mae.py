"""MAE's reconstruction loss (He et al. 2022; facebookresearch/mae, models_mae.py ``patchify``, ``unpatchify`` and
``forward_loss``): mean squared error between predicted and true pixels, averaged over the masked patches only.

With ``norm_pix`` (the paper's best setting) each target patch is normalised by its own mean and unbiased variance
(``(x - mean) / sqrt(var + 1e-6)``), so the decoder predicts local contrast rather than absolute intensity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssltrain.losses.common import compute_dtype


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, 3, H, W] -> [B, (H/p)(W/p), p*p*3]: patches in row-major grid order, each flattened as (row, column,
    channel), the official layout (its einsum ``nchpwq->nhwpqc``)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """The inverse of :func:`patchify` for a ``grid`` of (rows, columns) patches."""
    b = patches.shape[0]
    (h, w), p = grid, patch_size
    x = patches.reshape(b, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, h * p, w * p)


def mae_loss(images: Tensor, pred: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = True) -> Tensor:
    """``sum_masked mean_d (pred - target)^2 / #masked``.

    ``images`` [B, 3, H, W]; ``pred`` [B, L, p*p*3] (the decoder's output, patches in grid order); ``mask`` [B, L],
    1 where a patch was removed (the only ones scored), 0 where it was visible. Computed in at least float32.
    """
    dtype = compute_dtype(images, pred)
    target, pred = patchify(images, patch_size).to(dtype), pred.to(dtype)
    mask = mask.to(dtype)
    if pred.shape != target.shape or mask.shape != target.shape[:2]:
        raise ValueError(
            f"mae_loss: pred {tuple(pred.shape)} and mask {tuple(mask.shape)} must match the patches "
            f"{tuple(target.shape)} (and their first two dimensions)"
        )
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # [B, L]: mean loss per patch
    return (loss * mask).sum() / mask.sum()


__all__ = ["mae_loss", "patchify", "unpatchify"]
