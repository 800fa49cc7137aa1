"""MoCo v3: the loss against the official code (facebookresearch/moco-v3, moco/builder.py) transcribed, and by hand;
the method against the official forward and momentum update on the same weights; training and exact resume through
the real loop. Multi-process equality: tests/test_distributed_losses.py (dist_cases "mocov3")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_same_params, final_params, tiny_config
from torch import nn

from ssltrain.config import MoCoV3Config
from ssltrain.data.loaders import Views
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.losses import moco_contrastive_loss, mocov3_loss
from ssltrain.methods.mocov3 import MoCoV3

F64 = torch.float64


def _official_contrastive_loss(q: torch.Tensor, k: torch.Tensor, T: float, rank: int = 0) -> torch.Tensor:
    """``MoCo.contrastive_loss``, transcribed; ``k`` is already ``concat_all_gather(k)`` and ``rank`` this rank."""
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / T
    N = logits.shape[0]
    labels = torch.arange(N, dtype=torch.long) + N * rank
    return nn.CrossEntropyLoss()(logits, labels) * (2 * T)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("n,d,t", [(8, 5, 0.2), (5, 16, 1.0), (3, 2, 0.07)])
def test_loss_matches_official_values_and_gradients(n: int, d: int, t: float) -> None:
    inputs = [_randn(n, d, seed=10 + i).requires_grad_(True) for i in range(4)]
    q1, q2, k1, k2 = inputs
    out = mocov3_loss(q1, q2, k1, k2, t)
    grads = torch.autograd.grad(out["loss"], inputs)
    ref_inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    r1, r2, s1, s2 = ref_inputs
    ref = _official_contrastive_loss(r1, s2, t) + _official_contrastive_loss(r2, s1, t)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_offsets_match_official_labels_and_average_to_the_full_loss(world: int) -> None:
    """Rank r's queries against all ranks' keys, positives at ``N * r + i`` as the official labels; the mean over
    ranks is the single-process loss of the whole batch."""
    n = 3
    q, k = _randn(world * n, 4, seed=20), _randn(world * n, 4, seed=21)
    per_rank = []
    for r in range(world):
        mine = moco_contrastive_loss(q[r * n : (r + 1) * n], k, 0.5, offset=r * n)["loss"]
        official = _official_contrastive_loss(q[r * n : (r + 1) * n], k, 0.5, rank=r)
        torch.testing.assert_close(mine, official, rtol=1e-13, atol=1e-13)
        per_rank.append(mine)
    full = moco_contrastive_loss(q, k, 0.5)["loss"]
    torch.testing.assert_close(torch.stack(per_rank).mean(), full, rtol=1e-13, atol=1e-13)


def test_hand_computed() -> None:
    """Orthonormal queries = keys: positive logit 1/t, N-1 negatives at 0, so each direction is
    ``2t (log(e^{1/t} + N - 1) - 1/t)``; with keys rolled, no query finds its positive."""
    t, n = 0.5, 3
    e = torch.eye(n, dtype=F64)
    one = 2 * t * (math.log(math.exp(1 / t) + n - 1) - 1 / t)
    out = mocov3_loss(e, e, e, e, t)
    assert out["loss"].item() == pytest.approx(2 * one, rel=1e-14)
    assert out["accuracy"].item() == 1.0
    rolled = moco_contrastive_loss(e, e.roll(1, dims=0), t)
    assert rolled["loss"].item() == pytest.approx(2 * t * (math.log(math.exp(1 / t) + n - 1)), rel=1e-14)
    assert rolled["accuracy"].item() == 0.0
    assert moco_contrastive_loss(e, torch.ones(n, n, dtype=F64), t)["accuracy"].item() == 0.0  # ties are wrong


def test_gradcheck_and_bad_input() -> None:
    q, k = _randn(3, 4, seed=30).requires_grad_(True), _randn(6, 4, seed=31).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: moco_contrastive_loss(a, b, 0.3, offset=3)["loss"], (q, k))
    with pytest.raises(ValueError, match="temperature"):
        moco_contrastive_loss(q, k, 0.0)
    with pytest.raises(ValueError, match="do not fit"):
        moco_contrastive_loss(q, k, 0.3, offset=4)
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        moco_contrastive_loss(q, k[:, :2], 0.3)


def _official_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool) -> nn.Sequential:
    """``MoCo._build_mlp``, transcribed."""
    mlp: list[nn.Module] = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def test_method_equals_the_official_forward_and_momentum_update() -> None:
    """On an identity backbone, the method's projector/predictor are the official ViT MLPs (3-layer projector and
    2-layer predictor, both ending in BN without affine) and its loss and gradients equal ``MoCo.forward``'s on the
    same weights, each view through the encoders on its own; ``on_step_end`` is the official momentum update with
    ``adjust_moco_momentum``'s cosine schedule, and a gate of 0 leaves the momentum encoder as it was."""
    torch.manual_seed(7)
    method = MoCoV3(nn.Linear(6, 6), 6, [8, 8, 5], MoCoV3Config(predictor=[8, 5], temperature=0.2)).double()
    projector = _official_mlp(3, 6, 8, 5, True).double()
    predictor = _official_mlp(2, 5, 8, 5, True).double()
    assert set(projector.state_dict()) == set(method.projector.state_dict())  # the same layers, names and shapes
    assert set(predictor.state_dict()) == set(method.predictor.state_dict())
    projector.load_state_dict(method.projector.state_dict())
    predictor.load_state_dict(method.predictor.state_dict())
    base = nn.Sequential(nn.Linear(6, 6), projector).double()  # base_encoder: the backbone, its head the projector
    base[0].load_state_dict(method.backbone.state_dict())
    teacher = nn.Sequential(method.teacher_backbone, method.teacher_projector)
    with torch.no_grad():  # a momentum encoder that differs from the base encoder
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    momentum = nn.Sequential(nn.Linear(6, 6), _official_mlp(3, 6, 8, 5, True)).double()
    momentum.load_state_dict(teacher.state_dict())

    x1, x2 = _randn(8, 6, seed=40), _randn(8, 6, seed=41)
    out = method(Views([x1, x2], [], None, None))
    out["loss"].backward()
    q1, q2 = predictor(base(x1)), predictor(base(x2))
    with torch.no_grad():
        k1, k2 = momentum(x1), momentum(x2)
    ref = _official_contrastive_loss(q1, k2, 0.2) + _official_contrastive_loss(q2, k1, 0.2)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-12, atol=1e-12)
    mine = nn.Sequential(method.backbone, method.projector, method.predictor)
    theirs = nn.Sequential(base[0], projector, predictor)
    for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for p in teacher.parameters())
    assert out["embeddings"].shape == (8, 5) and not out["embeddings"].requires_grad
    assert torch.equal(out["features"], method.backbone(x1).detach())

    # momentum update at step 3 of 10: m = 1 - 0.5 (1 + cos(pi 3/10)) (1 - 0.99), param_m = param_m m + param_b (1-m)
    m = 1.0 - 0.5 * (1.0 + math.cos(math.pi * 3 / 10)) * (1.0 - 0.99)
    student = nn.Sequential(method.backbone, method.projector)
    before = [p.clone() for p in teacher.parameters()]
    method.on_step_end(3, 10, gate=torch.tensor(0.0, dtype=F64))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    method.on_step_end(3, 10)
    for b, pm, pb in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(pm, b * m + pb.detach() * (1.0 - m), rtol=1e-14, atol=1e-15)


OVERRIDES = {"method.name": "mocov3", "method.projector": "[32,16]", "method.mocov3.predictor": "[32,16]"}


def test_trains_through_the_loop_and_resumes_exactly(shard_dir: Path, tmp_path: Path) -> None:
    whole = train(tiny_config(tmp_path / "a", str(shard_dir), steps=3, **OVERRIDES))
    records = read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and "accuracy" in r for r in records), records
    cfg = tiny_config(tmp_path / "b", str(shard_dir), steps=3, **OVERRIDES)
    train(cfg, stop_after_steps=2)
    resumed = train(cfg)
    a, b = final_params(whole), final_params(resumed)
    assert_same_params(a, b)
    assert any(k.startswith("teacher_backbone.") for k in a), "the momentum encoder is in the checkpoint"
    # the momentum encoder moved (EMA) but is not the base encoder
    assert not torch.equal(a["teacher_backbone.conv1.weight"], a["backbone.conv1.weight"])
