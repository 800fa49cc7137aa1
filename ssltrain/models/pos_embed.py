"""The fixed 2-D sin-cos position embedding of MAE and I-JEPA (facebookresearch/mae util/pos_embed.py, copied into
facebookresearch/ijepa src/models/vision_transformer.py): one table for both, and the step that puts it into a
ViT's learned position embedding and freezes it, as both official encoders have it."""

from __future__ import annotations

import torch
from torch import Tensor

from ssltrain.models.backbones import ViT


def sincos_pos_embed_2d(dim: int, height: int, width: int, cls_token: bool = False) -> Tensor:
    """The official ``get_2d_sincos_pos_embed``: [(1 +) height * width, dim], float64, patches row-major; the first
    half of the features encodes the column (the official meshgrid puts w first), the second the row, each as
    (sin, cos) of the frequencies 10000^(-i / (dim / 4)); with ``cls_token`` an all-zero entry first."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    table = torch.cat([one_axis(cols), one_axis(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])
    return table


def freeze_sincos_pos_embed(vit: ViT, grid: tuple[int, int]) -> None:
    """Replace ``vit``'s learned position embedding by the fixed sin-cos table of its stored grid and stop its
    gradient (the official ``requires_grad=False``); the CLS entry, where the ViT embeds one, is zero. ``grid`` is
    the patch grid the method's crops make: the table must be stored for it."""
    pos = vit.pos_embed
    if pos is None:
        raise ValueError("a fixed sin-cos position embedding needs a ViT with an absolute position embedding")
    height, width = vit.patch_embed.grid_size
    if (height, width) != tuple(grid):
        raise ValueError(f"the ViT's position embedding is stored for a {(height, width)} grid, the crops make {grid}")
    with_cls = pos.shape[1] == height * width + 1
    table = sincos_pos_embed_2d(pos.shape[-1], height, width, cls_token=with_cls)
    with torch.no_grad():
        pos.copy_(table.to(pos.dtype).unsqueeze(0))
    pos.requires_grad_(False)


__all__ = ["freeze_sincos_pos_embed", "sincos_pos_embed_2d"]
