"""LARS against its formula, parameter exclusions, and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssltrain.config import OptimConfig
from ssltrain.engine.optim import LARS, build_optimizer, lr_at, param_groups, scaled_lr, set_lr


def test_lars_step_matches_the_formula() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS(
        [{"params": [w]}, {"params": [b], "weight_decay": 0.0, "exclude": True}],
        lr=0.1,
        weight_decay=0.5,
        momentum=0.9,
        eta=0.01,
    )
    w.grad = torch.tensor([[0.5, 1.0], [0.0, -2.0]])
    b.grad = torch.tensor([2.0, 4.0])
    d = w.grad + 0.5 * w.detach()  # [[2, 1], [0, 0]]; ||d|| = sqrt(5)
    opt.step()
    q = 0.01 * 5 / math.sqrt(5)
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - 0.1 * q * d)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.2, -1.0 - 0.4]))  # excluded: plain SGD
    # second step: momentum buffer = 0.9 * previous + new update
    prev_w = w.detach().clone()
    buf = q * d
    w.grad = torch.zeros(2, 2)
    opt.step()
    d2 = 0.5 * prev_w
    q2 = 0.01 * prev_w.norm() / d2.norm()
    assert torch.allclose(w.detach(), prev_w - 0.1 * (0.9 * buf + q2 * d2), atol=1e-6)


def test_biases_and_norms_are_excluded() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    regular, excluded = param_groups(model)
    assert [p.shape for p in regular] == [torch.Size([8, 4]), torch.Size([2, 8])]
    assert len(excluded) == 4  # two biases, BN weight and bias
    for name in ("lars", "adamw"):
        opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1), 512)
        assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.1
        assert opt.param_groups[0]["lr"] == pytest.approx(OptimConfig().lr * 2)
    assert LARS(model.parameters(), lr=1.0).param_groups[0]["exclude"] is False


def test_lr_scales_with_batch_and_follows_warmup_then_cosine() -> None:
    assert scaled_lr(OptimConfig(lr=0.2), 2048) == pytest.approx(1.6)
    peak, total, warm = 1.0, 110, 10
    lrs = [lr_at(s, total, peak, warm, 0.01) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the cosine
    assert lr_at(total, total, peak, warm, 0.01) == pytest.approx(0.01)


def test_a_method_lr_scale_trains_its_parameters_at_that_multiple() -> None:
    from ssltrain.config import BYOLConfig
    from ssltrain.methods.byol import BYOL

    torch.manual_seed(0)
    byol = BYOL(nn.Linear(12, 6), 6, [8, 4], BYOLConfig(predictor=[8, 4], predictor_lr_scale=10.0))
    predictor = {id(p) for p in byol.predictor.parameters()}
    trainable = [p for p in byol.parameters() if p.requires_grad]
    for name in ("lars", "adamw"):
        opt = build_optimizer(byol, OptimConfig(name=name, weight_decay=0.1), 256)
        set_lr(opt, 0.5)
        grouped = [p for g in opt.param_groups for p in g["params"]]
        assert sorted(map(id, grouped)) == sorted(map(id, trainable)), "every parameter in exactly one group"
        for group in opt.param_groups:
            kinds = {id(p) in predictor for p in group["params"]}
            assert len(kinds) == 1, "a group is all predictor or none of it"
            assert group["lr"] == pytest.approx(5.0 if kinds == {True} else 0.5)
            assert group["weight_decay"] == (0.0 if group["params"][0].ndim == 1 else 0.1)
    # One AdamW step moves the predictor as AdamW at 10x the rate would, and the rest as at 1x.
    for p in trainable:
        p.grad = torch.randn_like(p)
    before = {id(p): p.detach().clone() for p in trainable}
    opt.step()
    for p in trainable:
        ref = before[id(p)].clone().requires_grad_(True)
        ref.grad = p.grad
        lr = 5.0 if id(p) in predictor else 0.5
        torch.optim.AdamW([ref], lr=lr, weight_decay=0.1 if p.ndim > 1 else 0.0).step()
        torch.testing.assert_close(p.detach(), ref.detach())
