"""The masks' place in the sample stream and the ViT's token interface the masked methods build on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shards, tiny_config

from ssltrain.data.loaders import build_train_loader
from ssltrain.data.masks import MaskDraw, sample_rng
from ssltrain.data.stream import GlobalBatchSampler, ShardCatalog
from ssltrain.models.backbones import build_backbone


def _vit(registers: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    net, _ = build_backbone("vit_tiny", patch_size=4, image_size=16, registers=registers)
    return net.eval()


@pytest.mark.parametrize("registers", [0, 2])
def test_tokens_are_timms_features_and_the_cls_token_is_the_feature(registers: int) -> None:
    net, x = _vit(registers), torch.randn(2, 3, 16, 16)
    tokens = net.tokens(x)
    assert tokens.shape == (2, 1 + registers + 16, 192)
    torch.testing.assert_close(tokens, net.forward_features(x))
    torch.testing.assert_close(tokens[:, 0], net(x))


def test_keeping_every_patch_in_order_is_the_full_encoder_and_keep_selects_after_the_position_embedding() -> None:
    net, x = _vit(), torch.randn(2, 3, 16, 16)
    full = net.tokens(x, keep=torch.arange(16).expand(2, 16))
    torch.testing.assert_close(full, net.tokens(x))
    keep = torch.tensor([[3, 0, 9], [15, 4, 5]])
    embedded = net._pos_embed(net.patch_embed(x))
    expected = torch.cat([embedded[:, :1], torch.stack([embedded[b, 1 + keep[b]] for b in range(2)])], dim=1)
    torch.testing.assert_close(net.tokens(x, keep=keep), net.norm(net.blocks(expected)))


def test_masked_patches_become_the_mask_token_before_the_position_embedding() -> None:
    net, x = _vit(), torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 7]] = True
    token = torch.randn(192)
    patches = net.patch_embed(x)  # [B, 4, 4, D]
    patches = patches.reshape(2, 16, 192).clone()
    patches[0, [1, 7]] = token
    expected = net.norm(net.blocks(net._pos_embed(patches.reshape(2, 4, 4, 192))))
    torch.testing.assert_close(net.tokens(x, mask=mask, mask_token=token), expected)
    with pytest.raises(ValueError, match="mask_token"):
        net.tokens(x, mask=mask)


class _Noise:
    """A generator drawing one number per sample and the batch it belongs to: enough to see what masks depend on."""

    def __call__(self, positions: np.ndarray, seed: int, group_size: int) -> dict[str, torch.Tensor]:
        draws = [sample_rng(seed, int(p)).random() for p in positions]
        return {"noise": torch.tensor(draws, dtype=torch.float64), "group": torch.from_numpy(positions // group_size)}


@pytest.mark.parametrize("world_size", [1, 2])
def test_masks_are_a_function_of_seed_and_position_on_any_world_size(tmp_path: Path, world_size: int) -> None:
    make_shards(tmp_path / "d", [24])
    cfg = tiny_config(tmp_path, str(tmp_path / "d"), **{"data.workers": 1})
    catalog = ShardCatalog.from_spec(cfg.data.train)
    drawn: dict[int, float] = {}
    for rank in range(world_size):
        sampler = GlobalBatchSampler(len(catalog), 8, cfg.seed, start=8, end=24, rank=rank, world_size=world_size)
        loader = build_train_loader(cfg, catalog, sampler, torch.device("cpu"), MaskDraw(_Noise(), cfg.seed, 8))
        for views, positions in zip(loader, sampler):  # drawn in the loader's worker (data.workers 1)
            assert views.position.tolist() == [p for _, p in positions]
            assert views.masks["group"].tolist() == [p // 8 for _, p in positions]
            drawn.update(zip(views.position.tolist(), views.masks["noise"].tolist()))
    assert sorted(drawn) == list(range(8, 24))
    assert drawn == {p: sample_rng(cfg.seed, p).random() for p in range(8, 24)}
