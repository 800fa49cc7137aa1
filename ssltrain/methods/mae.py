"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"; facebookresearch/mae, models_mae.py and
util/pos_embed.py): the ViT encodes a random 25% of the patches (CLS included); a light transformer decoder fills
the rest with a shared mask token, adds fixed 2-D sin-cos positions and predicts every patch's pixels; the loss is
the (per-patch normalised) pixel MSE on the masked patches.

The masking noise (one uniform draw per patch, as ``random_masking``'s ``torch.rand``) comes from the sample stream
(:class:`ssltrain.data.masks.random.RandomMaskNoise`, a function of (seed, position)); the argsort that turns it
into kept / restored indices is the official one. Every global view gets its own mask and is reconstructed; the
loss is the mean of the per-view losses. Initialisation is the official ``initialize_weights`` for encoder and
decoder alike (xavier-uniform Linear layers and patch projection, N(0, 0.02) CLS and mask tokens, and the encoder's
position embedding replaced by the fixed sin-cos one and frozen).

The outputs ``embeddings`` and ``features`` are the encoder's CLS token of view 0 as trained, i.e. on its visible
patches only: the online probe sees the masked encoding (no extra full-image forward); offline probes and exports
use :meth:`Method.features`, the full image.
"""

from __future__ import annotations

from typing import cast

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssltrain.config import Config, MAEConfig
from ssltrain.data.loaders import Views
from ssltrain.data.masks.random import RandomMaskNoise
from ssltrain.losses.mae import mae_loss
from ssltrain.methods.base import Method, outputs
from ssltrain.models.backbones import VITS, ViT
from ssltrain.models.pos_embed import freeze_sincos_pos_embed, sincos_pos_embed_2d


def random_masking(noise: Tensor, len_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The official ``random_masking`` given its noise [B, L]: ``(ids_keep [B, len_keep], mask [B, L] with 1 where a
    patch is removed, ids_restore [B, L])``; the patches of smallest noise are kept."""
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    mask = torch.ones_like(noise)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


def _xavier_linear(module: nn.Module) -> None:
    """The official ``_init_weights``: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.bias, 0)
        nn.init.constant_(module.weight, 1.0)


class MAE(Method):
    decoder_pos_embed: Tensor  # fixed 2-D sin-cos table [1, 1 + grid**2, decoder_dim] (a buffer)

    def __init__(
        self, backbone: nn.Module, feature_dim: int, cfg: MAEConfig, grid: int, views: int = 1, loss_impl: str = "auto"
    ) -> None:
        super().__init__(backbone, feature_dim, loss_impl)
        if not isinstance(backbone, ViT):
            raise ValueError(f"MAE encodes a ViT's visible patches; got a {type(backbone).__name__} backbone")
        p_h, p_w = backbone.patch_embed.patch_size
        if p_h != p_w:
            raise ValueError(f"MAE's patchify takes square patches, got {p_h}x{p_w}")
        if not 0.0 < cfg.mask_ratio < 1.0:
            raise ValueError(f"method.mae.mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        self.cfg, self.patch_size, self.grid = cfg, p_h, grid
        self.num_patches = grid * grid
        self.len_keep = int(self.num_patches * (1 - cfg.mask_ratio))  # official rounding
        if not 0 < self.len_keep < self.num_patches:
            raise ValueError(
                f"method.mae.mask_ratio {cfg.mask_ratio} keeps {self.len_keep} of the {self.num_patches} patches of a "
                f"{grid}x{grid} grid; it must keep at least one and mask at least one"
            )
        self.masks = RandomMaskNoise(grid, views)
        dim = cfg.decoder_dim
        self.decoder_embed = nn.Linear(feature_dim, dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed_2d(dim, grid, grid, cls_token=True).float().unsqueeze(0)
        self.register_buffer("decoder_pos_embed", pos)  # fixed, as the official's requires_grad=False parameter
        # timm's Block and LayerNorm (eps 1e-6, the official mae_vit_* norm_layer), as the official decoder
        self.decoder_blocks = nn.ModuleList(
            [Block(dim, cfg.decoder_heads, 4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * 3, bias=True)
        self._initialize_weights()

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module, feature_dim: int, num_samples: int | None = None) -> MAE:
        if not isinstance(backbone, ViT):
            raise ValueError(
                f"method mae reconstructs masked patches of a ViT: model.backbone must be one of {', '.join(VITS)}, "
                f"got model.backbone={cfg.model.backbone}"
            )
        crops = cfg.augment
        if crops.local_crops.count:
            raise ValueError(
                f"method mae reconstructs the global views only; set augment.local_crops.count=0 "
                f"(got {crops.local_crops.count})"
            )
        grid = crops.global_crops.size // cfg.model.patch_size
        return cls(backbone, feature_dim, cfg.method.mae, grid, crops.global_crops.count, cfg.loss.impl)

    @property
    def vit(self) -> ViT:
        """The backbone, as the ViT that ``__init__`` checked it is."""
        return cast(ViT, self.backbone)

    def _initialize_weights(self) -> None:
        """The official ``initialize_weights``, on the encoder too: its position embedding becomes the fixed
        sin-cos one (CLS entry zero; no CLS entry when the ViT embeds registers without positions)."""
        vit = self.vit
        pos, cls_token = vit.pos_embed, vit.cls_token
        if pos is None or cls_token is None:
            raise ValueError("MAE needs a ViT with a CLS token and an absolute position embedding")
        freeze_sincos_pos_embed(vit, (self.grid, self.grid))
        w = vit.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_xavier_linear)

    def decode(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """The official ``forward_decoder``: encoder tokens [B, prefix + K, D_enc] -> pixel predictions [B, L, p*p*3]
        for every patch, in grid order. Prefix tokens (CLS, registers) take the CLS position entry (zero)."""
        prefix = self.vit.num_prefix_tokens
        x = self.decoder_embed(latent)
        head, visible = x[:, :prefix], x[:, prefix:]
        mask_tokens = self.mask_token.to(x.dtype).expand(x.shape[0], ids_restore.shape[1] - visible.shape[1], -1)
        x_ = torch.cat([visible, mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        pos = self.decoder_pos_embed
        x = torch.cat([head + pos[:, :1], x_ + pos[:, 1:]], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]

    def forward(self, views: Views) -> dict[str, Tensor]:
        images = views.global_views
        noise = views.masks.get("noise")
        if noise is None:
            raise ValueError("method mae needs its masking noise in Views.masks['noise'] (drawn by self.masks)")
        count, batch = len(images), images[0].shape[0]
        if noise.dim() != 3 or noise.shape[0] != batch or noise.shape[1] < count or noise.shape[2] != self.num_patches:
            raise ValueError(
                f"mask noise {tuple(noise.shape)} must be [{batch}, >= {count} views, {self.num_patches} patches]"
            )
        noise = noise[:, :count].transpose(0, 1).reshape(count * batch, -1)  # view-major, as torch.cat(images)
        ids_keep, mask, ids_restore = random_masking(noise, self.len_keep)
        latent = self.vit.tokens(torch.cat(images), keep=ids_keep)
        pred = self.decode(latent, ids_restore)
        rows = [slice(v * batch, (v + 1) * batch) for v in range(count)]
        losses = [
            mae_loss(images[v], pred[r], mask[r], self.patch_size, self.cfg.norm_pix_loss) for v, r in enumerate(rows)
        ]
        cls = latent[:batch, 0]
        return outputs({"loss": torch.stack(losses).mean()}, cls, cls)
