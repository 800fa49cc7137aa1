"""MAE: the method against a float64 transcription of the official model on the same weights and masking noise
(loss, input and parameter gradients), the loss on a hand-worked case, masks as a function of (seed, position),
training and exact resume through the real loop."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_same_params, final_params, tiny_config
from timm.models.vision_transformer import Block, PatchEmbed

from ssltrain.config import MAEConfig, load_config
from ssltrain.data.loaders import Views
from ssltrain.data.masks import sample_rng
from ssltrain.data.masks.random import RandomMaskNoise
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.losses.mae import mae_loss, patchify, unpatchify
from ssltrain.methods import build_method
from ssltrain.methods.mae import MAE, random_masking
from ssltrain.models.backbones import ViT
from ssltrain.models.pos_embed import sincos_pos_embed_2d

# --- Transcription of facebookresearch/mae @ efb2a80 (util/pos_embed.py, models_mae.py MaskedAutoencoderViT) -----
# Verbatim but for: np.float -> np.float64 (removed from numpy), timm's Block without qk_scale (removed from timm),
# random_masking / forward_encoder / forward taking the noise that the official draws with torch.rand, and forward
# also returning the encoder output (the latent).


def official_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)

    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = official_get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def official_get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0

    # use half of dimensions to encode grid_h
    emb_h = official_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = official_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)

    emb = np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)
    return emb  # noqa: RET504 (verbatim)


def official_get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)

    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product

    emb_sin = np.sin(out)  # (M, D/2)
    emb_cos = np.cos(out)  # (M, D/2)

    emb = np.concatenate([emb_sin, emb_cos], axis=1)  # (M, D)
    return emb  # noqa: RET504 (verbatim)


class OfficialMAE(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss=False,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for i in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for i in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        pos_embed = official_get_2d_sincos_pos_embed(
            self.pos_embed.shape[-1], int(self.patch_embed.num_patches**0.5), cls_token=True
        )
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        decoder_pos_embed = official_get_2d_sincos_pos_embed(
            self.decoder_pos_embed.shape[-1], int(self.patch_embed.num_patches**0.5), cls_token=True
        )
        self.decoder_pos_embed.data.copy_(torch.from_numpy(decoder_pos_embed).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0

        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
        x = torch.einsum("nchpwq->nhwpqc", x)
        x = x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))
        return x  # noqa: RET504 (verbatim)

    def unpatchify(self, x):
        p = self.patch_embed.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]

        x = x.reshape(shape=(x.shape[0], h, w, p, p, 3))
        x = torch.einsum("nhwpqc->nchpwq", x)
        imgs = x.reshape(shape=(x.shape[0], 3, h * p, h * p))
        return imgs  # noqa: RET504 (verbatim)

    def random_masking(self, x, mask_ratio, noise):
        N, L, D = x.shape  # batch, length, dim
        len_keep = int(L * (1 - mask_ratio))

        # noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]  (given here)

        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))

        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)

        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        x = x[:, 1:, :]
        return x  # noqa: RET504 (verbatim)

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5

        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch

        loss = (loss * mask).sum() / mask.sum()  # mean loss on removed patches
        return loss  # noqa: RET504 (verbatim)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*3]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask, latent


# --- Against the official ------------------------------------------------------------------------------------

IMG, PATCH, DIM, GRID = 16, 4, 16, 4


def _ours(norm_pix: bool, mask_ratio: float = 0.75, views: int = 2) -> MAE:
    torch.manual_seed(0)
    vit = ViT(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)
    cfg = MAEConfig(mask_ratio=mask_ratio, decoder_dim=8, decoder_depth=2, decoder_heads=2, norm_pix_loss=norm_pix)
    return MAE(vit, DIM, cfg, grid=GRID, views=views)


def _official(norm_pix: bool) -> OfficialMAE:
    torch.manual_seed(1)
    return OfficialMAE(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=2,
        num_heads=2,
        decoder_embed_dim=8,
        decoder_depth=2,
        decoder_num_heads=2,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),  # as the official mae_vit_* constructors
        norm_pix_loss=norm_pix,
    )


def test_sincos_position_embedding_is_the_officials() -> None:
    for dim, grid, cls in [(16, 4, True), (32, 7, False), (8, 1, True)]:
        ref = torch.from_numpy(official_get_2d_sincos_pos_embed(dim, grid, cls))
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid, grid, cls), ref, rtol=0, atol=1e-15)


def test_patchify_is_the_officials_and_unpatchify_inverts_it() -> None:
    official = _official(False)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    patches = patchify(x, PATCH)
    torch.testing.assert_close(patches, official.patchify(x), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patches, PATCH, (GRID, GRID)), official.unpatchify(patches), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patches, PATCH, (GRID, GRID)), x, rtol=0, atol=0)


def test_random_masking_is_the_officials() -> None:
    noise = torch.rand(3, GRID * GRID, dtype=torch.float64)
    x = torch.randn(3, GRID * GRID, 5, dtype=torch.float64)
    kept, mask, restore = _official(False).random_masking(x, 0.75, noise)
    ids_keep, our_mask, our_restore = random_masking(noise, int(GRID * GRID * 0.25))
    torch.testing.assert_close(x.gather(1, ids_keep[..., None].expand(-1, -1, 5)), kept, rtol=0, atol=0)
    torch.testing.assert_close(our_mask, mask.double(), rtol=0, atol=0)
    assert torch.equal(our_restore, restore)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_and_gradients_equal_the_official_model(norm_pix: bool) -> None:
    ours, official = _ours(norm_pix).double(), _official(norm_pix).double()
    # the fixed sin-cos tables are computed independently and agree; then the official takes our weights
    torch.testing.assert_close(ours.backbone.pos_embed, official.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(ours.decoder_pos_embed, official.decoder_pos_embed, rtol=0, atol=0)
    assert not ours.backbone.pos_embed.requires_grad
    state = {k.removeprefix("backbone."): v for k, v in ours.state_dict().items()}
    official.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(3)
    batch = 3
    images = [torch.randn(batch, 3, IMG, IMG, generator=g, dtype=torch.float64) for _ in range(2)]
    noise = torch.rand(batch, 2, GRID * GRID, generator=g, dtype=torch.float64)

    xs = [x.clone().requires_grad_(True) for x in images]
    out = ours(Views(xs, [], torch.arange(batch), None, position=torch.arange(batch), masks={"noise": noise}))
    out["loss"].backward()

    ys = [x.clone().requires_grad_(True) for x in images]
    results = [official(y, 0.75, noise[:, v]) for v, y in enumerate(ys)]
    expected = torch.stack([r[0] for r in results]).mean()
    expected.backward()

    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=1e-12)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    theirs = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs[name.removeprefix("backbone.")].grad, rtol=1e-10, atol=1e-12)
    # the monitors' and online probe's input: the encoder's CLS token of view 0 on its visible patches
    torch.testing.assert_close(out["features"], results[0][3][:, 0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["embeddings"], out["features"], rtol=0, atol=0)
    assert not out["features"].requires_grad


def test_initialisation_follows_the_official() -> None:
    ours = _ours(True)
    assert torch.count_nonzero(ours.backbone.pos_embed[0, 0]) == 0  # the CLS entry of the sin-cos table
    for name, module in ours.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name
            bound = math.sqrt(6 / (module.in_features + module.out_features))  # xavier-uniform
            assert module.weight.abs().max() <= bound, name
    assert 0.005 < ours.mask_token.std() < 0.05 and 0.005 < ours.backbone.cls_token.std() < 0.05


def test_registers_pass_through_the_decoder_like_the_cls_token() -> None:
    """With registers timm embeds positions for the patches only: the encoder's table then has no CLS entry."""
    torch.manual_seed(0)
    vit = ViT(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1, num_heads=2, num_classes=0, dynamic_img_size=True,
        reg_tokens=2, no_embed_class=True,
    )  # fmt: skip
    method = MAE(vit, DIM, MAEConfig(decoder_dim=8, decoder_depth=1, decoder_heads=2), grid=GRID, views=1)
    table = sincos_pos_embed_2d(DIM, GRID, GRID).float()
    torch.testing.assert_close(vit.pos_embed[0], table, rtol=0, atol=0)
    views = Views([torch.randn(2, 3, IMG, IMG)], [], torch.arange(2), None, position=torch.arange(2))
    views.masks = method.masks(np.arange(2), 0, 2)
    out = method(views)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and vit.reg_token.grad is not None


# --- The loss by hand -----------------------------------------------------------------------------------------


def test_loss_by_hand() -> None:
    # 1-px patches of a 2x2 RGB image: patches (1,2,3), (0,0,0), (2,4,6), (1,1,1); the 1st and 3rd are masked
    image = torch.tensor([[[1.0, 0.0], [2.0, 1.0]], [[2.0, 0.0], [4.0, 1.0]], [[3.0, 0.0], [6.0, 1.0]]])[None]
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    pred = torch.zeros(1, 4, 3)
    pred[0, 1] = 100.0  # a visible patch's prediction is not scored
    assert mae_loss(image, pred, mask, 1, norm_pix=False).item() == pytest.approx((14 / 3 + 56 / 3) / 2)
    # normalised per patch by its mean and unbiased variance:
    # (1,2,3) -> (-1,0,1) / sqrt(1 + eps), (2,4,6) -> (-2,0,2) / sqrt(4 + eps)
    expected = ((2 / 3) / (1 + 1e-6) + (8 / 3) / (4 + 1e-6)) / 2
    assert mae_loss(image, pred, mask, 1, norm_pix=True).item() == pytest.approx(expected, rel=1e-6)


def test_loss_runs_in_float32_under_bf16_autocast() -> None:
    method = _ours(True)
    x = [torch.randn(2, 3, IMG, IMG) for _ in range(2)]
    views = Views(x, [], torch.arange(2), None, position=torch.arange(2))
    views.masks = method.masks(np.arange(2), 0, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


# --- Masks ------------------------------------------------------------------------------------------------------


def test_masks_are_a_function_of_seed_and_position() -> None:
    gen = RandomMaskNoise(GRID, views=2)
    a = gen(np.array([5, 9, 2]), seed=3, group_size=3)["noise"]
    b = gen(np.array([9, 11]), seed=3, group_size=8)["noise"]
    assert a.shape == (3, 2, GRID * GRID) and a.dtype == torch.float64
    assert torch.equal(a[1], b[0])  # position 9 in two different batches
    assert torch.equal(a[1], torch.from_numpy(sample_rng(3, 9).random((2, GRID * GRID))))
    assert not torch.equal(a[1, 0], a[1, 1])  # each view its own mask
    assert not torch.equal(gen(np.array([9]), seed=4, group_size=1)["noise"][0], a[1])
    assert torch.equal(RandomMaskNoise(GRID, views=1)(np.array([9]), 3, 1)["noise"][0, 0], a[1, 0])


def test_the_method_keeps_the_official_count_and_the_smallest_noise() -> None:
    noise = RandomMaskNoise(GRID, views=1)(np.arange(4), 0, 4)["noise"][:, 0]
    ids_keep, mask, _ = random_masking(noise, _ours(True, mask_ratio=0.6).len_keep)
    assert ids_keep.shape == (4, int(16 * (1 - 0.6)))  # 6: the official int() rounding
    assert mask.sum(1).tolist() == [10.0] * 4
    for row, keep in zip(noise, ids_keep):
        assert set(keep.tolist()) == set(row.argsort()[:6].tolist())


def test_bad_settings_fail_clearly(tmp_path: Path) -> None:
    base = {"data.train": str(tmp_path), "method.name": "mae", "augment.global_crops.size": 16}
    resnet = load_config(None, [f"{k}={v}" for k, v in base.items()])
    with pytest.raises(ValueError, match="model.backbone=resnet18"):
        build_method(resnet)
    vit = {**base, "model.backbone": "vit_tiny", "model.patch_size": 4, "augment.local_crops.count": 2}
    with pytest.raises(ValueError, match="local_crops"):
        build_method(load_config(None, [f"{k}={v}" for k, v in {**vit, "augment.local_crops.size": 8}.items()]))
    with pytest.raises(ValueError, match="mask_ratio"):
        _ours(True, mask_ratio=0.99)
    with pytest.raises(ValueError, match="mask_ratio"):
        _ours(True, mask_ratio=1.0)
    method = _ours(True)
    with pytest.raises(ValueError, match="Views.masks"):
        method(Views([torch.randn(2, 3, IMG, IMG)], [], torch.arange(2), None, position=torch.arange(2)))


# --- Through the real loop -----------------------------------------------------------------------------------

OVERRIDES = {
    "method.name": "mae",
    "model.backbone": "vit_tiny",
    "model.patch_size": 4,
    "method.mae.decoder_dim": 32,
    "method.mae.decoder_depth": 1,
    "method.mae.decoder_heads": 2,
    "optim.lr": 0.001,
    "data.workers": 1,
}


def test_mae_trains_through_the_loop_and_resumes_exactly(shard_dir: Path, tmp_path: Path) -> None:
    whole = train(tiny_config(tmp_path / "a", str(shard_dir), steps=4, **OVERRIDES))
    records = read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert math.isfinite(r["loss"]) and r["loss"] > 0, r
    cfg = tiny_config(tmp_path / "b", str(shard_dir), steps=4, **OVERRIDES)
    train(cfg, stop_after_steps=2)
    resumed = train(cfg)
    assert_same_params(final_params(whole), final_params(resumed))
