"""Backbones (ResNets from torchvision, ViTs from timm with interpolated position embeddings) and heads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from ssltrain.models import BACKBONES, MLP, DINOHead, Prototypes, ViT, build_backbone


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- ViT backbones


def test_backbones_lists_every_name() -> None:
    assert BACKBONES == ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base")


@pytest.mark.parametrize(
    ("name", "dim", "depth", "heads"), [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6), ("vit_base", 768, 12, 12)]
)
def test_vit_sizes_and_multicrop_forward(name: str, dim: int, depth: int, heads: int) -> None:
    torch.manual_seed(0)
    net, feature_dim = build_backbone(name)  # ViT-x/16 at 224
    assert isinstance(net, ViT) and feature_dim == dim
    assert len(net.blocks) == depth and net.blocks[0].attn.num_heads == heads
    assert net.patch_embed.patch_size == (16, 16) and tuple(net.pos_embed.shape) == (1, 1 + 14 * 14, dim)
    net.eval()
    with torch.no_grad():
        sizes = (224, 96) if name == "vit_tiny" else (96,)  # 224 only for the smallest, for speed
        for size in sizes:
            out = net(_images(2, size))
            assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_vit_demo_config_patch4_at_32px_and_local_crops() -> None:
    torch.manual_seed(0)
    net, dim = build_backbone("vit_tiny", patch_size=4, image_size=32, drop_path=0.1)
    assert tuple(net.pos_embed.shape) == (1, 1 + 8 * 8, dim)
    net.eval()
    with torch.no_grad():
        for size in (32, 16, 24, 40):
            assert net(_images(3, size)).shape == (3, dim)
        assert net(torch.randn(2, 3, 32, 16)).shape == (2, dim)  # rectangular grids work too
    # Stochastic depth is wired: rates rise linearly to drop_path over the blocks.
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in net.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])


def test_vit_native_size_output_equals_the_plain_path() -> None:
    """At the native grid the interpolation path is an exact identity: same output as a static-size timm ViT."""
    torch.manual_seed(0)
    net, _ = build_backbone("vit_tiny", patch_size=4, image_size=16)
    plain = ViT(img_size=16, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=0, dynamic_img_size=False)
    plain.load_state_dict(net.state_dict())
    net.eval(), plain.eval()
    x = _images(2, 16)
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


@pytest.mark.parametrize("size", [8, 24, 36])  # grid 2x2 (shrink, antialiased), 6x6 and 9x9 (grow) from 4x4
def test_vit_interpolated_pos_embed_matches_bicubic_resampling(size: int) -> None:
    torch.manual_seed(0)
    net, dim = build_backbone("vit_tiny", patch_size=4, image_size=16)
    with torch.no_grad():
        net.pos_embed.normal_()  # a non-trivial embedding, so interpolation errors would show
        tokens = net.patch_embed(_images(1, size))  # (1, g, g, C) in the dynamic path
        g = size // 4
        assert tokens.shape == (1, g, g, dim)
        got = net._pos_embed(tokens) - torch.cat([net.cls_token, tokens.reshape(1, g * g, dim)], dim=1)
        expected = resample_abs_pos_embed(net.pos_embed, new_size=[g, g], old_size=[4, 4], num_prefix_tokens=1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # ... which is the CLS entry untouched plus a bicubic (antialiased) resampling of the 4x4 grid.
        grid = net.pos_embed[:, 1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(g, g), mode="bicubic", antialias=True, align_corners=False)
        by_hand = torch.cat([net.pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, g * g, dim)], dim=1)
        torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)


def test_vit_size_errors() -> None:
    net, _ = build_backbone("vit_tiny", patch_size=4, image_size=32)
    with pytest.raises(ValueError, match="not divisible by the ViT patch size 4x4"):
        net(_images(1, 30))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_backbone("vit_tiny", patch_size=4, image_size=30)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        build_backbone("vit_tiny", patch_size=0)
    with pytest.raises(ValueError, match="drop_path"):
        build_backbone("vit_tiny", patch_size=4, image_size=32, drop_path=1.0)


def test_option_mismatches_and_unknown_name() -> None:
    with pytest.raises(ValueError, match="small_stem applies to ResNets only"):
        build_backbone("vit_tiny", small_stem=True)
    with pytest.raises(ValueError, match="zero_init_residual applies to ResNets only"):
        build_backbone("vit_tiny", zero_init_residual=True)
    with pytest.raises(ValueError, match="drop_path applies to ViTs only"):
        build_backbone("resnet18", drop_path=0.1)
    valid = "resnet18, resnet50, vit_tiny, vit_small, vit_base"
    with pytest.raises(ValueError, match=f"unknown backbone 'vit_huge'; choose one of {valid}"):
        build_backbone("vit_huge")


# --------------------------------------------------------------------------------------------- ResNets unchanged


def test_resnet_behaviour_unchanged() -> None:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet18")
    assert dim == 512 and isinstance(net.fc, nn.Identity) and net.conv1.kernel_size == (7, 7)
    # ViT-only arguments leave ResNets alone.
    torch.manual_seed(0)
    same, _ = build_backbone("resnet18", patch_size=4, image_size=32)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    small, _ = build_backbone("resnet18", small_stem=True, zero_init_residual=True)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert torch.count_nonzero(small.layer1[0].bn2.weight) == 0
    net.eval()
    with torch.no_grad():
        assert net(_images(2, 32)).shape == (2, 512)


# --------------------------------------------------------------------------------------------- heads


def test_mlp_still_works() -> None:
    head = MLP(8, [16, 4], last_bn=True)
    assert head(torch.randn(5, 8)).shape == (5, 4) and head.out_dim == 4


@pytest.mark.parametrize("layers", [1, 3])
def test_dino_head_shapes_and_norms(layers: int) -> None:
    torch.manual_seed(0)
    head = DINOHead(24, out_dim=100, hidden_dim=32, bottleneck_dim=8, layers=layers)
    x = torch.randn(6, 24)
    out = head(x)
    assert out.shape == (6, 100)
    b = head.bottleneck(x)
    assert b.shape == (6, 8)
    torch.testing.assert_close(b.norm(dim=1), torch.ones(6))
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == layers and not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert all(abs(float(m.weight.detach().std()) - 0.02) < 0.006 and not m.bias.any() for m in linears)
    last = head.last_layer
    assert last.bias is None
    magnitude = last.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.equal(magnitude, torch.ones_like(magnitude))
    torch.testing.assert_close(last.weight.norm(dim=1), torch.ones(100))
    # Output is the cosine similarity of the bottleneck with each (unit) prototype row, so bounded by 1.
    torch.testing.assert_close(out, b @ last.weight.T)
    assert out.abs().max() <= 1 + 1e-5


def test_dino_head_training_keeps_last_layer_rows_unit_norm() -> None:
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=50, hidden_dim=16, bottleneck_dim=8)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(4, 12)).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    # The free head trains the magnitude; a teacher copy (deepcopy, as EMA teachers are made) works.
    free = DINOHead(12, out_dim=50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False, use_bn=True)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert any(isinstance(m, nn.BatchNorm1d) for m in free.modules())
    teacher = copy.deepcopy(head)
    x = torch.randn(3, 12)
    torch.testing.assert_close(teacher(x), head(x))


def test_prototypes_normalize() -> None:
    torch.manual_seed(0)
    protos = Prototypes(8, 30)
    assert protos.bias is None and protos.weight.shape == (30, 8)
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(30))  # unit at construction
    with torch.no_grad():
        protos.weight.mul_(torch.rand(30, 1) * 5 + 0.1)
    protos.normalize_()
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(30))
    z = F.normalize(torch.randn(4, 8), dim=1)
    scores = protos(z)
    assert scores.shape == (4, 30) and scores.abs().max() <= 1 + 1e-5


def test_ema_teachers_have_no_stochastic_depth() -> None:
    """The official DINO/iBOT/DINOv2 build the teacher without drop path; the student keeps its own."""
    from ssltrain.models.ema import frozen_copy

    net, _ = build_backbone("vit_tiny", patch_size=4, image_size=16, drop_path=0.5)
    teacher = frozen_copy(net).train()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(teacher(x), teacher(x))  # in train mode, yet deterministic
    assert max(getattr(b.drop_path1, "drop_prob", 0.0) for b in net.blocks) == 0.5
