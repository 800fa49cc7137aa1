"""Tests for the method losses added to the eager reference (ssltrain.losses): NT-Xent row subsets, Barlow Twins,
CISSL, the information-theoretic VICReg variants, VCReg, DIET, DISSL, BYOL, DINO, Sinkhorn-Knopp and SwAV.

Every function is checked against hand-computed values and an independent loop / dense-matrix float64 reference,
for the invariances it should have, for finite (gradchecked) gradients, and for clear errors on bad input."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ssltrain.losses import (
    barlow_twins_loss,
    byol_loss,
    cissl_loss,
    diet_loss,
    dino_loss,
    dissl_loss,
    logdet_entropy,
    nt_xent_loss,
    orthonormality_penalty,
    pairwise_entropy,
    sinkhorn_knopp,
    swav_loss,
    vcreg_loss,
    vicreg_logdet_loss,
    vicreg_pairwise_loss,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=_gen(seed))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(u, v))


def _lse(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _log_softmax(row: list[float]) -> list[float]:
    lse = _lse(row)
    return [x - lse for x in row]


def _partitions(total: int, parts: int, seed: int) -> list[torch.Tensor]:
    return list(_perm(total, seed).chunk(parts))


# ==============================================================================================================
# NT-Xent: rows=
# ==============================================================================================================


def _ref_nt_xent_rows(a: list[list[float]], b: list[list[float]], t: float, rows: list[int]) -> dict[str, float]:
    n = len(a)
    u = [_unit(r) for r in a + b]
    total, correct = 0.0, 0
    for i in rows:
        p = (i + n) % (2 * n)
        logits = {k: _dot(u[i], u[k]) / t for k in range(2 * n) if k != i}
        total += _lse(list(logits.values())) - logits[p]
        correct += all(logits[p] > v for k, v in logits.items() if k != p)
    return {"loss": total / len(rows), "accuracy": correct / len(rows)}


def test_nt_xent_rows_none_equals_all_rows() -> None:
    z_a, z_b = _randn(6, 4, seed=1), _randn(6, 4, seed=2)
    full = nt_xent_loss(z_a, z_b, temperature=0.2)
    _assert_same(full, nt_xent_loss(z_a, z_b, temperature=0.2, rows=torch.arange(12)), tol=1e-14)
    # Row order inside `rows` does not matter.
    _assert_same(full, nt_xent_loss(z_a, z_b, temperature=0.2, rows=_perm(12, 3)), tol=1e-14)


@pytest.mark.parametrize("parts", [2, 4])
def test_nt_xent_rows_partition_mean_equals_full(parts: int) -> None:
    # What a distributed run does: each of `parts` ranks scores its own rows against the gathered batch.
    z_a = _randn(6, 5, seed=4)
    z_b = z_a + 0.8 * _randn(6, 5, seed=5)
    full = nt_xent_loss(z_a, z_b, temperature=0.3)
    pieces = [nt_xent_loss(z_a, z_b, temperature=0.3, rows=r) for r in _partitions(12, parts, seed=6)]
    for key in full:
        torch.testing.assert_close(torch.stack([p[key] for p in pieces]).mean(), full[key], rtol=1e-12, atol=1e-12)
    # The natural "own samples" split: rank r holds samples [r*N/R, (r+1)*N/R) in both views.
    own = [torch.cat([torch.arange(3), torch.arange(3) + 6]), torch.cat([torch.arange(3, 6), torch.arange(9, 12)])]
    mean = torch.stack([nt_xent_loss(z_a, z_b, temperature=0.3, rows=r)["loss"] for r in own]).mean()
    torch.testing.assert_close(mean, full["loss"], rtol=1e-12, atol=1e-12)


def test_nt_xent_rows_matches_loop_reference() -> None:
    z_a = _randn(5, 3, seed=7)
    z_b = z_a + 0.6 * _randn(5, 3, seed=8)
    rows = [9, 0, 4, 7]
    out = nt_xent_loss(z_a, z_b, temperature=0.25, rows=torch.tensor(rows))
    ref = _ref_nt_xent_rows(z_a.tolist(), z_b.tolist(), 0.25, rows)
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-12)
    assert out["accuracy"].item() == pytest.approx(ref["accuracy"], abs=1e-12)
    assert not out["accuracy"].requires_grad


def test_nt_xent_rows_gradcheck() -> None:
    z_a = _randn(4, 3, seed=9).requires_grad_()
    z_b = _randn(4, 3, seed=10).requires_grad_()
    rows = torch.tensor([1, 6, 3])
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3, rows=rows)["loss"], (z_a, z_b))


@pytest.mark.parametrize("fn", ["nt_xent", "cissl"])
def test_rows_validation(fn: str) -> None:
    z = torch.randn(4, 3)

    def call(rows):
        if fn == "nt_xent":
            return nt_xent_loss(z, z, rows=rows)
        return cissl_loss(z, z, z, z, rows=rows)

    with pytest.raises(ValueError, match="rows must lie in"):
        call(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="rows must lie in"):
        call(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="integer"):
        call(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        call(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="empty"):
        call(torch.tensor([], dtype=torch.long))


# ==============================================================================================================
# Barlow Twins
# ==============================================================================================================


def _ref_barlow(a: list[list[float]], b: list[list[float]], lambd: float, eps: float) -> dict[str, float]:
    n, d = len(a), len(a[0])

    def standardise(z: list[list[float]]) -> list[list[float]]:
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            mean = sum(z[i][j] for i in range(n)) / n
            var = sum((z[i][j] - mean) ** 2 for i in range(n)) / n  # biased, as BatchNorm normalises
            for i in range(n):
                out[i][j] = (z[i][j] - mean) / math.sqrt(var + eps)
        return out

    x, y = standardise(a), standardise(b)
    on, off = 0.0, 0.0
    for j in range(d):
        for k in range(d):
            c = sum(x[i][j] * y[i][k] for i in range(n)) / n
            if j == k:
                on += (1 - c) ** 2
            else:
                off += c * c
    return {"loss": on + lambd * off, "on_diag": on, "off_diag": off}


def test_barlow_hand_computed() -> None:
    # Columns of z_a are +-1 patterns, mean 0 and biased variance 1, mutually orthogonal; z_b repeats column 0.
    # With eps = 0: C = z_a^T z_b / 4 = [[1, 1], [0, 0]] -> on_diag = (1-1)^2 + (1-0)^2 = 1, off_diag = 1^2 = 1.
    z_a = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]], dtype=F64)
    z_b = torch.stack([z_a[:, 0], z_a[:, 0]], dim=1)
    out = barlow_twins_loss(z_a, z_b, lambd=0.25, eps=0.0)
    assert out["on_diag"].item() == pytest.approx(1.0, rel=1e-14)
    assert out["off_diag"].item() == pytest.approx(1.0, rel=1e-14)
    assert out["loss"].item() == pytest.approx(1.25, rel=1e-14)
    # eps sits inside the sqrt of each branch: every C entry shrinks by 1 / (1 + eps).
    eps = 0.1
    out = barlow_twins_loss(z_a, z_b, lambd=0.25, eps=eps)
    c = 1 / (1 + eps)
    assert out["on_diag"].item() == pytest.approx((1 - c) ** 2 + 1, rel=1e-14)
    assert out["off_diag"].item() == pytest.approx(c**2, rel=1e-14)


@pytest.mark.parametrize("n,d", [(7, 5), (2, 3), (16, 4)])
def test_barlow_matches_loop_reference(n: int, d: int) -> None:
    z_a = 2 * _randn(n, d, seed=11) + 0.5
    z_b = z_a + _randn(n, d, seed=12)
    out = barlow_twins_loss(z_a, z_b, lambd=0.02, eps=1e-5)
    ref = _ref_barlow(z_a.tolist(), z_b.tolist(), 0.02, 1e-5)
    for key, value in ref.items():
        assert out[key].dtype == F64
        assert out[key].item() == pytest.approx(value, rel=1e-10), key


def test_barlow_official_formulation() -> None:
    # Transcription of facebookresearch/barlowtwins main.py BarlowTwins.forward (single process).
    z1, z2 = _randn(12, 6, seed=13), _randn(12, 6, seed=14)
    bn = torch.nn.BatchNorm1d(6, affine=False, dtype=F64)
    bn.train()
    c = bn(z1).T @ bn(z2)
    c.div_(12)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = c.flatten()[:-1].view(5, 7)[:, 1:].flatten().pow_(2).sum()
    out = barlow_twins_loss(z1, z2)
    torch.testing.assert_close(out["on_diag"], on_diag, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["off_diag"], off_diag, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["loss"], on_diag + 0.0051 * off_diag, rtol=1e-12, atol=1e-12)


def test_barlow_invariances() -> None:
    z_a, z_b = _randn(9, 4, seed=15), _randn(9, 4, seed=16)
    base = barlow_twins_loss(z_a, z_b, eps=0.0)
    perm = _perm(9, 17)
    _assert_same(base, barlow_twins_loss(z_a[perm], z_b[perm], eps=0.0))
    # Independent per-dimension affine maps on each branch (positive scales) leave the standardised data unchanged.
    scale_a = torch.tensor([0.1, 3.0, 7.0, 0.5], dtype=F64)
    scale_b = torch.tensor([2.0, 0.3, 1.0, 9.0], dtype=F64)
    shift_a = torch.tensor([5.0, -2.0, 0.0, 100.0], dtype=F64)
    _assert_same(base, barlow_twins_loss(scale_a * z_a + shift_a, scale_b * z_b - 3.0, eps=0.0), tol=1e-10)
    # Flipping the same dimension in both branches only flips signs of off-diagonal entries.
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    _assert_same(base, barlow_twins_loss(flip * z_a, flip * z_b, eps=0.0), tol=1e-10)


def test_barlow_gradcheck() -> None:
    z_a = _randn(6, 3, seed=18).requires_grad_()
    z_b = _randn(6, 3, seed=19).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b, lambd=0.1)["loss"], (z_a, z_b))


def test_barlow_bad_input() -> None:
    with pytest.raises(ValueError, match="same .*shape"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="N=1"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="lambd"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 3), lambd=-1.0)


# ==============================================================================================================
# CISSL
# ==============================================================================================================


def _ref_cissl(sa, sb, ta, tb, t: float, rows: list[int] | None = None) -> dict[str, float]:
    n = len(sa)
    s = [_unit(r) for r in sa + sb]
    tt = [_unit(r) for r in ta + tb]
    rows = list(range(2 * n)) if rows is None else rows
    total, correct = 0.0, 0
    for i in rows:
        p = (i + n) % (2 * n)
        logits = [_dot(s[i], tt[k]) / t for k in range(2 * n)]
        total += _lse(logits) - 0.5 * (logits[i] + logits[p])
        best = max(logits[i], logits[p])
        correct += all(best > logits[k] for k in range(2 * n) if k not in (i, p))
    return {"loss": total / len(rows), "accuracy": correct / len(rows)}


def test_cissl_hand_computed() -> None:
    # All four heads give [e1, e2]: S = T = [e1, e2, e1, e2]. Row 0's logits are [1, 0, 1, 0] / t with the two
    # positives at columns 0 (self) and 2 -> loss = log(2 e^{1/t} + 2) - 1/t = log(2 + 2 e^{-1/t}).
    t = 0.5
    e = torch.eye(2, dtype=F64)
    out = cissl_loss(e, e, e, e, temperature=t)
    assert out["loss"].item() == pytest.approx(math.log(2 + 2 * math.exp(-1 / t)), rel=1e-14)
    assert out["accuracy"].item() == 1.0
    # The self pair is scored, not masked: a teacher orthogonal to the student on the same view changes the loss.
    # t_a = [e2, e1] (swapped), t_b = e: row 0 logits [0, 1, 1, 0]/t, positives at 0 and 2 -> lse - 1/(2t).
    out_swap = cissl_loss(e, e, e.flip(0), e, temperature=t)
    assert out_swap["loss"].item() == pytest.approx(math.log(2 + 2 * math.exp(1 / t)) - 0.5 / t, rel=1e-14)
    # Column 1 ties the positive at column 2: ties count as wrong.
    assert out_swap["accuracy"].item() == 0.0


@pytest.mark.parametrize("n,d,t", [(5, 3, 0.07), (2, 4, 0.5), (8, 6, 0.2)])
def test_cissl_matches_loop_reference(n: int, d: int, t: float) -> None:
    s_a = _randn(n, d, seed=20)
    s_b = s_a + 0.5 * _randn(n, d, seed=21)
    t_a = s_a + 0.3 * _randn(n, d, seed=22)
    t_b = s_b + 0.3 * _randn(n, d, seed=23)
    args = [x.tolist() for x in (s_a, s_b, t_a, t_b)]
    out = cissl_loss(s_a, s_b, t_a, t_b, temperature=t)
    ref = _ref_cissl(*args, t)
    assert out["loss"].dtype == F64
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-10)
    assert out["accuracy"].item() == pytest.approx(ref["accuracy"], abs=1e-12)
    assert not out["accuracy"].requires_grad
    rows = [3, 0, 2 * n - 1]
    out_rows = cissl_loss(s_a, s_b, t_a, t_b, temperature=t, rows=torch.tensor(rows))
    ref_rows = _ref_cissl(*args, t, rows)
    assert out_rows["loss"].item() == pytest.approx(ref_rows["loss"], rel=1e-10)
    assert out_rows["accuracy"].item() == pytest.approx(ref_rows["accuracy"], abs=1e-12)


def test_cissl_invariances() -> None:
    s_a, s_b, t_a, t_b = (_randn(6, 4, seed=24 + i) for i in range(4))
    base = cissl_loss(s_a, s_b, t_a, t_b)
    perm = _perm(6, 28)
    _assert_same(base, cissl_loss(s_a[perm], s_b[perm], t_a[perm], t_b[perm]))
    # Swapping the two views (each with its own student and teacher) is a row permutation of the 2N rows.
    _assert_same(base, cissl_loss(s_b, s_a, t_b, t_a))
    # Per-row positive scales on every input: only directions matter.
    scales = [torch.rand(6, 1, generator=_gen(29 + i), dtype=F64) * 10 + 0.1 for i in range(4)]
    _assert_same(base, cissl_loss(*(c * x for c, x in zip(scales, (s_a, s_b, t_a, t_b)))))


@pytest.mark.parametrize("parts", [2, 4])
def test_cissl_rows_partition_mean_equals_full(parts: int) -> None:
    s_a, s_b, t_a, t_b = (_randn(4, 3, seed=33 + i) for i in range(4))
    full = cissl_loss(s_a, s_b, t_a, t_b, temperature=0.2)
    _assert_same(full, cissl_loss(s_a, s_b, t_a, t_b, temperature=0.2, rows=torch.arange(8)), tol=1e-14)
    pieces = [cissl_loss(s_a, s_b, t_a, t_b, 0.2, rows=r) for r in _partitions(8, parts, seed=37)]
    for key in full:
        torch.testing.assert_close(torch.stack([p[key] for p in pieces]).mean(), full[key], rtol=1e-12, atol=1e-12)


def test_cissl_gradcheck() -> None:
    inputs = tuple(_randn(3, 3, seed=38 + i).requires_grad_() for i in range(4))
    assert torch.autograd.gradcheck(lambda *x: cissl_loss(*x, temperature=0.3)["loss"], inputs)
    rows = torch.tensor([0, 4])
    assert torch.autograd.gradcheck(lambda *x: cissl_loss(*x, temperature=0.3, rows=rows)["loss"], inputs)


def test_cissl_bad_input() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same .*shape"):
        cissl_loss(z, z, z, torch.randn(4, 2))
    with pytest.raises(ValueError, match="N=1"):
        cissl_loss(*(torch.randn(1, 3) for _ in range(4)))
    with pytest.raises(ValueError, match="temperature"):
        cissl_loss(z, z, z, z, temperature=-0.1)


def _released_cissl_loss(predictor, projector, x1, x2, temperature: float) -> torch.Tensor:
    """YannDubs/Invariant-Self-Supervised-Learning, issl/issl.py + losses/contrastive.py (is_self_contrastive),
    transcribed; the ``logits.float()`` cast left out so that float64 stays float64."""
    z = torch.cat([x1, x2])  # issl.py: z = self(torch.cat([x, x_tilde])); z_tgt = z
    z_src = F.normalize(predictor(z), dim=1, p=2)
    z_tgt = F.normalize(projector(z), dim=1, p=2)
    logits = z_src @ z_tgt.T / temperature
    new_batch_size = logits.size(0)
    batch_size = new_batch_size // 2
    log_q = logits.log_softmax(-1)[:, :new_batch_size]
    mask = torch.eye(batch_size).bool().repeat(2, 2)
    log_q = log_q[mask].view(new_batch_size, 2)
    return (-log_q.sum(1) / 2).mean()


def _cissl_method(**cfg: object):
    from torch import nn

    from ssltrain.config import CISSLConfig
    from ssltrain.methods.cissl import CISSL

    torch.manual_seed(5)
    return CISSL(nn.Identity(), 6, [8, 5], CISSLConfig(temperature=0.3, **cfg)).double()  # type: ignore[arg-type]


def test_cissl_heads_end_in_batchnorm_as_released() -> None:
    """By default both heads end in an affine BatchNorm1d, as the released code's ``add_batchnorms``; the loss and
    every gradient equal the released model's on the same weights (batch statistics over both views at once)."""
    from torch import nn

    from ssltrain.config import CISSLConfig
    from ssltrain.data.loaders import Views

    assert CISSLConfig().head_batchnorm
    method = _cissl_method()
    assert isinstance(method.student_norm, nn.BatchNorm1d) and method.student_norm.affine
    assert isinstance(method.teacher_norm, nn.BatchNorm1d) and method.teacher_norm.affine
    with torch.no_grad():  # not the init values, so that the affine parameters are exercised
        for bn in (method.student_norm, method.teacher_norm):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    # the released heads: Predictor = Sequential(Linear, BN), Projector = Sequential(MLP, BN), MLP = Linear(no bias)
    # -BN-ReLU-Linear; loaded with the method's weights
    predictor = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).double()
    projector = nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), nn.BatchNorm1d(5)
    ).double()
    predictor.load_state_dict(
        {f"0.{k}": v for k, v in method.student_head.state_dict().items()}
        | {f"1.{k}": v for k, v in method.student_norm.state_dict().items()}
    )
    projector.load_state_dict(
        method.teacher_head.state_dict() | {f"4.{k}": v for k, v in method.teacher_norm.state_dict().items()}
    )
    g = _gen(61)
    x = [torch.randn(7, 6, generator=g, dtype=F64, requires_grad=True) for _ in range(2)]
    out = method(Views(x, [], None, None))
    out["loss"].backward()
    x_ref = [v.detach().clone().requires_grad_(True) for v in x]
    ref = _released_cissl_loss(predictor, projector, *x_ref, 0.3)
    ref.backward()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(x, x_ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    pairs = [(method.student_head, predictor[0]), (method.student_norm, predictor[1])]
    pairs += [(method.teacher_head[0], projector[0]), (method.teacher_head[3], projector[3])]
    pairs += [(method.teacher_norm, projector[4])]
    for mine, theirs in pairs:
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for mine, theirs in ((method.student_norm, predictor[1]), (method.teacher_norm, projector[4])):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)


def test_cissl_head_batchnorm_false_is_the_plain_model() -> None:
    """``head_batchnorm: false``: the heads end in their Linear, the parameters (same seed) and state-dict keys are
    those of the heads without norms, and the loss is the eager CISSL loss of the plain heads' outputs."""
    from ssltrain.data.loaders import Views

    plain, normed = _cissl_method(head_batchnorm=False), _cissl_method()
    state = plain.state_dict()
    assert sorted(state) == sorted(k for k in normed.state_dict() if "_norm." not in k)
    assert all(k.startswith(("teacher_head.", "student_head.")) for k in state)
    for k, v in state.items():
        assert torch.equal(v, normed.state_dict()[k]), k
    g = _gen(62)
    x = [torch.randn(7, 6, generator=g, dtype=F64) for _ in range(2)]
    out = plain(Views(x, [], None, None))
    t = plain.teacher_head(torch.cat(x)).chunk(2)
    expected = cissl_loss(plain.student_head(x[0]), plain.student_head(x[1]), t[0], t[1], temperature=0.3)
    for key in expected:
        assert torch.equal(out[key], expected[key]), key


# ==============================================================================================================
# VICReg, information-theoretic variants: LogDet and pairwise-distance entropies
# ==============================================================================================================


@pytest.mark.parametrize("n,d", [(10, 4), (3, 6), (5, 5)])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_logdet_entropy_matches_dense_logdet(n: int, d: int, alpha: float) -> None:
    # Covers both the D x D path (n >= d) and the Sylvester N x N path (n < d).
    z = _randn(n, d, seed=42) + 1.5
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)
    dense = 0.5 * torch.logdet(torch.eye(d, dtype=F64) + alpha * cov)
    torch.testing.assert_close(logdet_entropy(z, alpha), dense, rtol=1e-12, atol=1e-12)


def test_logdet_entropy_hand_computed() -> None:
    # Columns [1, -1, 1, -1] * s_j: unbiased variance 4/3 s_j^2, covariance rank 1 along s.
    # logdet(I + C) = log(1 + 4/3 |s|^2) by the matrix determinant lemma.
    s = torch.tensor([1.0, 2.0], dtype=F64)
    z = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64).unsqueeze(1) * s
    assert logdet_entropy(z).item() == pytest.approx(0.5 * math.log(1 + 4 / 3 * 5), rel=1e-13)


def test_vicreg_logdet_composition_and_invariances() -> None:
    z_a = _randn(8, 5, seed=43)
    z_b = z_a + 0.5 * _randn(8, 5, seed=44)
    out = vicreg_logdet_loss(z_a, z_b, sim_weight=3.0, entropy_weight=2.0, alpha=0.5)
    inv = ((z_a - z_b) ** 2).mean()
    ent = (logdet_entropy(z_a, 0.5) + logdet_entropy(z_b, 0.5)) / (2 * 5)
    torch.testing.assert_close(out["invariance"], inv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["entropy"], ent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["loss"], 3.0 * inv - 2.0 * ent, rtol=1e-12, atol=1e-12)
    perm = _perm(8, 45)
    _assert_same(out, vicreg_logdet_loss(z_a[perm], z_b[perm], 3.0, 2.0, 0.5))
    # A common shift moves neither the residual nor the (centred) covariance.
    _assert_same(out, vicreg_logdet_loss(z_a + 4.0, z_b + 4.0, 3.0, 2.0, 0.5), tol=1e-10)


def test_logdet_gradcheck() -> None:
    for n, d in [(5, 3), (3, 5)]:
        z = _randn(n, d, seed=46).requires_grad_()
        assert torch.autograd.gradcheck(lambda x: logdet_entropy(x, 0.7), (z,))
    z_a, z_b = _randn(4, 3, seed=47).requires_grad_(), _randn(4, 3, seed=48).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_logdet_loss(a, b)["loss"], (z_a, z_b))


def _ref_pairwise_entropy(z: list[list[float]], sigma: float, divisor: float) -> float:
    n, d = len(z), len(z[0])
    total = 0.0
    for i in range(n):
        terms = [-sum((x - y) ** 2 for x, y in zip(z[i], z[j])) / (divisor * sigma**2) for j in range(n)]
        total += _lse(terms) - math.log(n)
    return -total / n + d / 2 * math.log(2 * math.pi * math.e * sigma**2)


def test_pairwise_entropy_hand_computed() -> None:
    sigma = 0.7
    gauss = 3 / 2 * math.log(2 * math.pi * math.e * sigma**2)
    # One component: the entropy of a single isotropic Gaussian in d = 3.
    assert pairwise_entropy(torch.ones(1, 3, dtype=F64), sigma).item() == pytest.approx(gauss, rel=1e-14)
    # N identical components: the same Gaussian (all distances 0).
    assert pairwise_entropy(torch.ones(5, 3, dtype=F64), sigma).item() == pytest.approx(gauss, rel=1e-14)
    # Two components at distance r: H = -log((1 + e^{-D}) / 2) + gauss, D = r^2 / (2 sigma^2) or r^2 / (8 sigma^2).
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -2.0]], dtype=F64)  # r^2 = 9
    for distance, div in [("kl", 2.0), ("bhattacharyya", 8.0)]:
        expected = -math.log((1 + math.exp(-9 / (div * sigma**2))) / 2) + gauss
        assert pairwise_entropy(z, sigma, distance).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("n,d,sigma", [(6, 3, 1.0), (9, 2, 0.4), (2, 5, 2.0)])
def test_pairwise_entropy_matches_loop_reference(n: int, d: int, sigma: float) -> None:
    z = _randn(n, d, seed=49) + 3.0
    for distance, div in [("kl", 2.0), ("bhattacharyya", 8.0)]:
        out = pairwise_entropy(z, sigma, distance)
        assert out.dtype == F64
        assert out.item() == pytest.approx(_ref_pairwise_entropy(z.tolist(), sigma, div), rel=1e-12)


def test_pairwise_entropy_brackets_true_mixture_entropy() -> None:
    # Kolchinsky & Tracey: Bhattacharyya estimate <= H(mixture) <= KL estimate. In d = 1 the true entropy of the
    # mixture is a 1-D integral, done here on a fine grid.
    centres = torch.tensor([-2.0, -1.5, 0.0, 0.3, 2.5], dtype=F64)
    sigma = 0.6
    x = torch.linspace(-8, 9, 200001, dtype=F64)
    comp = torch.exp(-((x[:, None] - centres) ** 2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
    p = comp.mean(dim=1)
    h_true = torch.trapezoid(-p * torch.log(p), x).item()
    lower = pairwise_entropy(centres[:, None], sigma, "bhattacharyya").item()
    upper = pairwise_entropy(centres[:, None], sigma, "kl").item()
    assert lower < h_true < upper


def test_pairwise_entropy_invariances_and_stability() -> None:
    z = _randn(7, 4, seed=50)
    base = pairwise_entropy(z, 0.8)
    torch.testing.assert_close(pairwise_entropy(z[_perm(7, 51)], 0.8), base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairwise_entropy(z + 5.0, 0.8), base, rtol=1e-12, atol=1e-12)
    # A huge common offset in float32 must not wreck the distances (the batch is centred before the expanded
    # |x|^2 + |y|^2 - 2 x.y form, which would otherwise cancel ~1e8-sized terms). Compare with the same float32
    # values computed in float64.
    z32 = z.float() + 1e4
    torch.testing.assert_close(
        pairwise_entropy(z32, 0.8).double(), pairwise_entropy(z32.double(), 0.8), rtol=1e-5, atol=1e-5
    )


def test_pairwise_entropy_gradients() -> None:
    z = _randn(5, 3, seed=52).requires_grad_()
    for distance in ("kl", "bhattacharyya"):
        assert torch.autograd.gradcheck(functools.partial(pairwise_entropy, sigma=0.9, distance=distance), (z,))
    # Duplicated points (zero distances off the diagonal) still give finite gradients.
    dup = torch.cat([z.detach()[:2], z.detach()[:2]]).requires_grad_()
    (g,) = torch.autograd.grad(pairwise_entropy(dup), dup)
    assert torch.isfinite(g).all()
    z_a, z_b = _randn(4, 3, seed=53).requires_grad_(), _randn(4, 3, seed=54).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_pairwise_loss(a, b, sigma=0.5)["loss"], (z_a, z_b))


def test_vicreg_pairwise_composition() -> None:
    z_a = _randn(8, 3, seed=55)
    z_b = z_a + 0.4 * _randn(8, 3, seed=56)
    for distance in ("kl", "bhattacharyya"):
        out = vicreg_pairwise_loss(z_a, z_b, sim_weight=2.0, entropy_weight=0.5, sigma=0.3, distance=distance)
        inv = ((z_a - z_b) ** 2).mean()
        ent = (pairwise_entropy(z_a, 0.3, distance) + pairwise_entropy(z_b, 0.3, distance)) / 2 / 3
        torch.testing.assert_close(out["invariance"], inv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["entropy"], ent, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["loss"], 2.0 * inv - 0.5 * ent, rtol=1e-12, atol=1e-12)
        perm = _perm(8, 57)
        _assert_same(out, vicreg_pairwise_loss(z_a[perm], z_b[perm], 2.0, 0.5, 0.3, distance))


def test_entropy_bad_input() -> None:
    with pytest.raises(ValueError, match="distance"):
        pairwise_entropy(torch.randn(4, 3), distance="euclid")
    with pytest.raises(ValueError, match="sigma"):
        pairwise_entropy(torch.randn(4, 3), sigma=0.0)
    with pytest.raises(ValueError, match="2-D"):
        pairwise_entropy(torch.randn(4))
    with pytest.raises(ValueError, match="alpha"):
        vicreg_logdet_loss(torch.randn(4, 3), torch.randn(4, 3), alpha=0.0)
    with pytest.raises(ValueError, match="same .*shape"):
        vicreg_pairwise_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="same .*shape"):
        vicreg_logdet_loss(torch.randn(4, 3), torch.randn(5, 3))


# ==============================================================================================================
# VCReg orthonormality
# ==============================================================================================================


def _dense_penalty(z: torch.Tensor) -> torch.Tensor:
    """tr((M1 - I)(M2 - I)) / D from the explicit D x D matrices."""
    h, d = z.shape[0] // 2, z.shape[1]
    eye = torch.eye(d, dtype=z.dtype)
    m1 = z[:h].T @ z[:h] / h
    m2 = z[h : 2 * h].T @ z[h : 2 * h] / h
    return torch.trace((m1 - eye) @ (m2 - eye)) / d


def test_orthonormality_hand_computed() -> None:
    r2 = math.sqrt(2)
    # First half sqrt(2) * I_2 -> M1 = I, so the product vanishes whatever the second half is.
    z = torch.cat([r2 * torch.eye(2, dtype=F64), _randn(2, 2, seed=58)])
    assert orthonormality_penalty(z).item() == pytest.approx(0.0, abs=1e-14)
    # Both halves 2 * I_2 -> M = 2I, tr(I * I) / 2 = 1  (h = D: the D x D path).
    z = torch.cat([2 * torch.eye(2, dtype=F64)] * 2)
    assert orthonormality_penalty(z).item() == pytest.approx(1.0, rel=1e-14)
    # D = 3, h = 2 (Gram path): halves sqrt(2) [e1; e2] -> M = diag(1, 1, 0), (M - I)^2 = diag(0, 0, 1) -> 1/3.
    half = r2 * torch.eye(3, dtype=F64)[:2]
    assert orthonormality_penalty(torch.cat([half, half])).item() == pytest.approx(1 / 3, rel=1e-14)
    # Halves with opposite deviations give a negative single-batch value: M1 = 2I, M2 = 0 -> tr(I * -I) / 2 = -1.
    z = torch.cat([2 * torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64)])
    assert orthonormality_penalty(z).item() == pytest.approx(-1.0, rel=1e-14)


@pytest.mark.parametrize("n,d", [(6, 10), (8, 4), (9, 4), (4, 2), (5, 7), (40, 3)])
def test_orthonormality_gram_and_dense_paths_agree(n: int, d: int) -> None:
    # h < d takes the h x h cross-Gram path, h >= d the D x D path; both must equal the explicit trace.
    z = 1.3 * _randn(n, d, seed=59) + 0.2
    torch.testing.assert_close(orthonormality_penalty(z), _dense_penalty(z), rtol=1e-12, atol=1e-12)
    if n % 2:  # the last odd row is unused
        z2 = z.clone()
        z2[-1] = 100.0
        torch.testing.assert_close(orthonormality_penalty(z2), orthonormality_penalty(z), rtol=0, atol=0)


@pytest.mark.parametrize(
    "n,points",
    [(4, [[1.0, 0.5], [-1.0, 2.0], [0.3, -0.7]]), (5, [[1.0, 0.5, 0.0], [0.0, 2.0, -1.0], [0.3, -0.7, 1.5]])],
)
def test_orthonormality_exactly_unbiased_on_finite_distribution(n: int, points: list[list[float]]) -> None:
    # z uniform over a few points: enumerate every ordered batch, so the expectation is computed exactly.
    # (n=4, d=2: D x D path; n=5, d=3: Gram path with the odd last row dropped.)
    pts = torch.tensor(points, dtype=F64)
    d = pts.shape[1]
    second_moment = pts.T @ pts / len(points)
    truth = ((second_moment - torch.eye(d, dtype=F64)) ** 2).sum() / d
    batches = torch.stack([pts[list(idx)] for idx in itertools.product(range(len(points)), repeat=n)])
    values = torch.stack([orthonormality_penalty(b) for b in batches])
    torch.testing.assert_close(values.mean(), truth, rtol=1e-12, atol=1e-12)


def test_orthonormality_unbiased_monte_carlo() -> None:
    # z ~ N(0, diag(s^2)): E[z z^T] = diag(s^2), truth = sum (s^2 - 1)^2 / D. The plug-in |M - I|^2 / D on the
    # full batch is biased upwards by sum Var(M_jk) / D; the half-batch product is not.
    s2 = torch.tensor([0.25, 1.0, 2.25, 4.0], dtype=F64)
    truth = ((s2 - 1) ** 2).sum().item() / 4
    z = torch.randn(20000, 8, 4, generator=_gen(60), dtype=F64) * s2.sqrt()
    values = torch.stack([orthonormality_penalty(b) for b in z])
    se = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - truth) < 4 * se
    plug_in = (((z.transpose(1, 2) @ z) / 8 - torch.eye(4, dtype=F64)) ** 2).sum(dim=(1, 2)) / 4
    assert plug_in.mean().item() - truth > 20 * se


def test_orthonormality_order_structure() -> None:
    # Not batch-permutation invariant (the halves matter), but invariant to reordering within each half and to
    # swapping the halves.
    z = _randn(8, 3, seed=61)
    base = orthonormality_penalty(z)
    within = torch.cat([_perm(4, 62), 4 + _perm(4, 63)])
    torch.testing.assert_close(orthonormality_penalty(z[within]), base, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(orthonormality_penalty(torch.cat([z[4:], z[:4]])), base, rtol=1e-12, atol=1e-12)


def test_vcreg_composition_and_gradcheck() -> None:
    z_a = _randn(6, 4, seed=64)
    z_b = z_a + 0.3 * _randn(6, 4, seed=65)
    out = vcreg_loss(z_a, z_b, sim_weight=2.0, ortho_weight=0.5)
    inv = ((z_a - z_b) ** 2).mean()
    ortho = (_dense_penalty(z_a) + _dense_penalty(z_b)) / 2
    torch.testing.assert_close(out["invariance"], inv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["orthonormality"], ortho, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["loss"], 2.0 * inv + 0.5 * ortho, rtol=1e-12, atol=1e-12)
    for n, d in [(4, 3), (6, 2)]:  # Gram path, D x D path
        z = _randn(n, d, seed=66).requires_grad_()
        assert torch.autograd.gradcheck(orthonormality_penalty, (z,))
    a, b = _randn(5, 3, seed=67).requires_grad_(), _randn(5, 3, seed=68).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: vcreg_loss(x, y)["loss"], (a, b))


def test_orthonormality_bad_input() -> None:
    with pytest.raises(ValueError, match="N=3"):
        orthonormality_penalty(torch.randn(3, 2))
    with pytest.raises(ValueError, match="N=3"):
        vcreg_loss(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="same .*shape"):
        vcreg_loss(torch.randn(4, 2), torch.randn(4, 3))


# ==============================================================================================================
# DIET
# ==============================================================================================================


def test_diet_hand_computed() -> None:
    # Zero logits: p uniform over N=4 -> both CE(target) and mean_j(-log p_j) are log 4, whatever the smoothing.
    out = diet_loss(torch.zeros(2, 4, dtype=F64), torch.tensor([1, 3]), smoothing=0.8)
    assert out["loss"].item() == pytest.approx(math.log(4), rel=1e-14)
    # One row, logits [log 2, 0, 0] (p = [1/2, 1/4, 1/4]), target 0, smoothing s:
    #   (1 - s) log 2 + s * (log 2 + 2 log 4) / 3 = (1 - s) log 2 + s * 5/3 log 2.
    s = 0.3
    out = diet_loss(torch.tensor([[math.log(2), 0.0, 0.0]], dtype=F64), torch.tensor([0]), smoothing=s)
    assert out["loss"].item() == pytest.approx((1 - s) * math.log(2) + s * 5 / 3 * math.log(2), rel=1e-14)
    assert out["accuracy"].item() == 1.0


def test_diet_matches_loop_reference_and_permutation() -> None:
    logits = 3 * _randn(6, 10, seed=69)
    targets = torch.tensor([0, 9, 4, 4, 7, 2])
    s = 0.8
    total, correct = 0.0, 0
    for row, t in zip(logits.tolist(), targets.tolist()):
        log_p = _log_softmax(row)
        total += (1 - s) * -log_p[t] + s * sum(-x for x in log_p) / len(row)
        correct += max(range(len(row)), key=lambda j: row[j]) == t
    out = diet_loss(logits, targets, smoothing=s)
    assert out["loss"].item() == pytest.approx(total / 6, rel=1e-12)
    assert out["accuracy"].item() == pytest.approx(correct / 6, abs=1e-12)
    assert not out["accuracy"].requires_grad
    perm = _perm(6, 70)
    _assert_same(out, diet_loss(logits[perm], targets[perm], smoothing=s))


def test_diet_bad_input() -> None:
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="targets must lie in"):
        diet_loss(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="integer"):
        diet_loss(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="B=3"):
        diet_loss(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2-D"):
        diet_loss(torch.randn(5), torch.tensor([0]))
    with pytest.raises(ValueError, match="smoothing"):
        diet_loss(logits, torch.tensor([0, 1, 2]), smoothing=1.5)


# ==============================================================================================================
# DISSL
# ==============================================================================================================


def _ref_dissl(sa, sb, ta, tb, tt, st, lambd, beta) -> dict[str, float]:
    n, c = len(sa), len(sa[0])
    p = {v: [_softmax([x / tt for x in row]) for row in t] for v, t in (("a", ta), ("b", tb))}
    log_p = {v: [_log_softmax([x / tt for x in row]) for row in t] for v, t in (("a", ta), ("b", tb))}
    log_q = {v: [_log_softmax([x / st for x in row]) for row in s] for v, s in (("a", sa), ("b", sb))}

    def ce(pp, lq) -> float:
        return sum(-sum(pp[i][k] * lq[i][k] for k in range(c)) for i in range(n)) / n

    distill = 0.5 * (ce(p["a"], log_q["b"]) + ce(p["b"], log_q["a"]))
    rows = p["a"] + p["b"]
    marginal = [sum(r[k] for r in rows) / (2 * n) for k in range(c)]
    h_marginal = -sum(m * math.log(m) for m in marginal)
    h_cond = sum(-sum(x * math.log(x) for x in r) for r in rows) / (2 * n)
    teacher_ce = 0.5 * (ce(p["a"], log_p["b"]) + ce(p["b"], log_p["a"]))
    return {
        "loss": distill - lambd * h_marginal + beta * teacher_ce,
        "distill": distill,
        "marginal_entropy": h_marginal,
        "conditional_entropy": h_cond,
        "teacher_ce": teacher_ce,
    }


def test_dissl_hand_computed_uniform() -> None:
    # All logits zero: every distribution is uniform over C, so every term is log C.
    c = 5
    z = torch.zeros(3, c, dtype=F64)
    out = dissl_loss(z, z, z, z, lambd=2.0, beta=0.5)
    for key in ("distill", "marginal_entropy", "conditional_entropy", "teacher_ce"):
        assert out[key].item() == pytest.approx(math.log(c), rel=1e-14), key
    assert out["loss"].item() == pytest.approx(math.log(c) * (1 - 2.0 + 0.5), rel=1e-14)
    # Confident teachers on distinct classes, student uniform: H[M|Z] -> 0, H[M] -> log 2 (two classes used).
    t = torch.tensor([[50.0, 0.0, 0.0], [0.0, 50.0, 0.0]], dtype=F64)
    out = dissl_loss(torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), t, t, teacher_temp=1.0)
    assert out["conditional_entropy"].item() == pytest.approx(0.0, abs=1e-18)
    assert out["marginal_entropy"].item() == pytest.approx(math.log(2), rel=1e-12)
    assert out["distill"].item() == pytest.approx(math.log(3), rel=1e-12)


@pytest.mark.parametrize("n,c", [(4, 6), (2, 3), (7, 10)])
def test_dissl_matches_loop_reference(n: int, c: int) -> None:
    sa, sb, ta, tb = (2 * _randn(n, c, seed=71 + i) for i in range(4))
    kw = dict(teacher_temp=0.5, student_temp=0.9, lambd=2.3, beta=0.8)
    out = dissl_loss(sa, sb, ta, tb, **kw)
    ref = _ref_dissl(sa.tolist(), sb.tolist(), ta.tolist(), tb.tolist(), 0.5, 0.9, 2.3, 0.8)
    for key, value in ref.items():
        assert out[key].dtype == F64
        assert out[key].item() == pytest.approx(value, rel=1e-10), key


def test_dissl_invariances() -> None:
    sa, sb, ta, tb = (_randn(5, 4, seed=75 + i) for i in range(4))
    base = dissl_loss(sa, sb, ta, tb)
    perm = _perm(5, 79)
    _assert_same(base, dissl_loss(sa[perm], sb[perm], ta[perm], tb[perm]))
    _assert_same(base, dissl_loss(sb, sa, tb, ta))  # the two views play symmetric roles
    # Softmax ignores a per-row additive constant, so every term (entropies included) is shift-invariant.
    shifts = [_randn(5, 1, seed=80 + i) * 10 for i in range(4)]
    _assert_same(base, dissl_loss(*(x + s for x, s in zip((sa, sb, ta, tb), shifts))), tol=1e-10)


def test_dissl_gradients() -> None:
    inputs = tuple(_randn(3, 4, seed=84 + i).requires_grad_() for i in range(4))
    assert torch.autograd.gradcheck(lambda *x: dissl_loss(*x)["loss"], inputs)
    assert torch.autograd.gradcheck(lambda *x: dissl_loss(*x)["conditional_entropy"], inputs)
    # No stop-gradient: the teacher logits receive gradient from the loss.
    grads = torch.autograd.grad(dissl_loss(*inputs)["loss"], inputs)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # A class whose teacher marginal underflows to exactly 0 (float32) gives a finite loss and gradient.
    t = torch.tensor([[0.0, -2000.0, 1.0], [1.0, -2000.0, 0.0]], requires_grad=True)
    s = torch.zeros(2, 3, requires_grad=True)
    out = dissl_loss(s, s, t, t)
    assert torch.isfinite(out["loss"])
    g_t, g_s = torch.autograd.grad(out["loss"], (t, s))
    assert torch.isfinite(g_t).all() and torch.isfinite(g_s).all()


def test_dissl_bad_input() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same .*shape"):
        dissl_loss(z, z, z, torch.randn(4, 5))
    with pytest.raises(ValueError, match="teacher_temp"):
        dissl_loss(z, z, z, z, teacher_temp=0.0)
    with pytest.raises(ValueError, match="student_temp"):
        dissl_loss(z, z, z, z, student_temp=-1.0)


# ==============================================================================================================
# BYOL
# ==============================================================================================================


def test_byol_hand_computed() -> None:
    e = torch.eye(3, dtype=F64)
    assert byol_loss(e, 5 * e).item() == pytest.approx(0.0, abs=1e-15)
    assert byol_loss(e, -e).item() == pytest.approx(4.0, rel=1e-15)
    assert byol_loss(e, e.roll(1, dims=0)).item() == pytest.approx(2.0, rel=1e-15)
    # cos = 1/sqrt(2) on one row, 1 on the other: mean(2 - sqrt(2), 0).
    p = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=F64)
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=F64)
    assert byol_loss(p, z).item() == pytest.approx((2 - math.sqrt(2)) / 2, rel=1e-14)
    assert byol_loss(p[:1], z[:1]).item() == pytest.approx(2 - math.sqrt(2), rel=1e-14)  # N = 1 is fine


def test_byol_reference_invariances_and_grad() -> None:
    p, z = _randn(6, 4, seed=88), _randn(6, 4, seed=89)
    ref = sum(2 - 2 * _dot(_unit(a), _unit(b)) for a, b in zip(p.tolist(), z.tolist())) / 6
    out = byol_loss(p, z)
    assert out.item() == pytest.approx(ref, rel=1e-12)
    perm = _perm(6, 90)
    torch.testing.assert_close(byol_loss(p[perm], z[perm]), out, rtol=1e-12, atol=1e-12)
    scales = torch.rand(6, 1, generator=_gen(91), dtype=F64) * 10 + 0.1
    torch.testing.assert_close(byol_loss(scales * p, z / scales), out, rtol=1e-12, atol=1e-12)
    pg, zg = p.clone().requires_grad_(), z.clone().requires_grad_()
    assert torch.autograd.gradcheck(byol_loss, (pg, zg))
    g_p, g_z = torch.autograd.grad(byol_loss(pg, zg), (pg, zg))  # nothing detached inside
    assert g_p.abs().sum() > 0 and g_z.abs().sum() > 0


def test_byol_bad_input() -> None:
    with pytest.raises(ValueError, match="same .*shape"):
        byol_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="2-D"):
        byol_loss(torch.randn(4), torch.randn(4))


# ==============================================================================================================
# DINO
# ==============================================================================================================


def _ref_dino(student, teacher, center, st, tt) -> dict[str, float]:
    terms, entropies = [], []
    for g, t in enumerate(teacher):
        p = [_softmax([(x - c) / tt for x, c in zip(row, center)]) for row in t]
        entropies.append(sum(-sum(x * math.log(x) for x in r if x > 0) for r in p) / len(p))
        for v, s in enumerate(student):
            if v == g:
                continue
            log_s = [_log_softmax([x / st for x in row]) for row in s]
            terms.append(sum(-_dot(pr, lr) for pr, lr in zip(p, log_s)) / len(p))
    return {"loss": sum(terms) / len(terms), "teacher_entropy": sum(entropies) / len(entropies)}


@pytest.mark.parametrize("g,v", [(2, 2), (2, 5), (1, 3), (3, 3)])
def test_dino_matches_loop_reference(g: int, v: int) -> None:
    b, k = 4, 6
    student = [3 * _randn(b, k, seed=92 + i) for i in range(v)]
    teacher = [3 * _randn(b, k, seed=100 + i) for i in range(g)]
    center = _randn(k, seed=110)
    out = dino_loss(student, teacher, center, student_temp=0.2, teacher_temp=0.5)
    ref = _ref_dino([s.tolist() for s in student], [t.tolist() for t in teacher], center.tolist(), 0.2, 0.5)
    for key, value in ref.items():
        assert out[key].dtype == F64
        assert out[key].item() == pytest.approx(value, rel=1e-10), key
    assert not out["teacher_entropy"].requires_grad


def test_dino_official_formulation() -> None:
    # Transcription of facebookresearch/dino main_dino.py DINOLoss.forward (2 global + 4 local crops).
    b, k, ncrops = 3, 7, 6
    student_output = 2 * _randn(ncrops * b, k, seed=111)
    teacher_output = 2 * _randn(2 * b, k, seed=112)
    center = 0.3 * _randn(1, k, seed=113)
    student_out = (student_output / 0.1).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / 0.04, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_loss_terms += 1
    official = total_loss / n_loss_terms
    out = dino_loss(list(student_output.chunk(ncrops)), list(teacher_output.chunk(2)), center)
    torch.testing.assert_close(out["loss"], official, rtol=1e-12, atol=1e-12)
    # A (K,) centre and a (1, K) centre are the same thing.
    out_flat = dino_loss(list(student_output.chunk(ncrops)), list(teacher_output.chunk(2)), center.flatten())
    _assert_same(out, out_flat)


def test_dino_collapsed_teacher() -> None:
    # A teacher equal to the centre (or constant) is uniform: teacher_entropy = log K, and against a uniform
    # student every cross-entropy is log K too.
    k = 8
    center = _randn(k, seed=114)
    teacher = [center.expand(3, k).clone(), torch.full((3, k), 2.5, dtype=F64) + center]
    student = [torch.zeros(3, k, dtype=F64)] * 3
    out = dino_loss(student, teacher, center)
    assert out["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-14)
    assert out["loss"].item() == pytest.approx(math.log(k), rel=1e-14)
    # A sharp teacher has (near-)zero entropy.
    sharp = [torch.eye(3, k, dtype=F64) * 10.0] * 2
    assert dino_loss(student, sharp, torch.zeros(k, dtype=F64))["teacher_entropy"].item() < 1e-50


def test_dino_invariances_and_gradients() -> None:
    student = [_randn(4, 5, seed=115 + i) for i in range(3)]
    teacher = [_randn(4, 5, seed=120 + i) for i in range(2)]
    center = _randn(5, seed=125)
    base = dino_loss(student, teacher, center, 0.3, 0.2)
    perm = _perm(4, 126)
    _assert_same(base, dino_loss([s[perm] for s in student], [t[perm] for t in teacher], center, 0.3, 0.2))
    # Adding a constant to the centre or to a row of logits changes no softmax.
    _assert_same(base, dino_loss([s + 3.0 for s in student], teacher, center - 1.5, 0.3, 0.2), tol=1e-10)
    s_req = [s.clone().requires_grad_() for s in student]
    t_req = [t.clone().requires_grad_() for t in teacher]
    assert torch.autograd.gradcheck(lambda *s: dino_loss(list(s), teacher, center, 0.3, 0.2)["loss"], tuple(s_req))
    # The teacher is detached: no gradient reaches it.
    out = dino_loss(s_req, t_req, center, 0.3, 0.2)
    grads = torch.autograd.grad(out["loss"], t_req + s_req, allow_unused=True)
    assert all(g is None for g in grads[:2]) and all(g is not None for g in grads[2:])


def test_dino_bad_input() -> None:
    s = [torch.randn(4, 5) for _ in range(3)]
    t = [torch.randn(4, 5) for _ in range(2)]
    c = torch.zeros(5)
    with pytest.raises(ValueError, match="G <= V"):
        dino_loss(s[:1], t, c)
    with pytest.raises(ValueError, match="V >= 2"):
        dino_loss(s[:1], t[:1], c)
    with pytest.raises(ValueError, match="shape"):
        dino_loss(s, [torch.randn(4, 6), torch.randn(4, 6)], c)
    with pytest.raises(ValueError, match="center"):
        dino_loss(s, t, torch.zeros(6))
    with pytest.raises(ValueError, match="non-empty list"):
        dino_loss(s, [], c)
    with pytest.raises(ValueError, match="2-D"):
        dino_loss([torch.randn(4, 5, 1)] * 2, t, c)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(s, t, c, teacher_temp=0.0)


# ==============================================================================================================
# Sinkhorn-Knopp and SwAV
# ==============================================================================================================


def _ref_sinkhorn(scores: list[list[float]], eps: float, iters: int) -> list[list[float]]:
    """The official distributed_sinkhorn on one process, as explicit loops (no max subtraction)."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        for j in range(k):
            s = sum(q[j])
            q[j] = [x / s / k for x in q[j]]
        for i in range(b):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / b
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


@pytest.mark.parametrize("b,k,iters", [(6, 4, 3), (3, 5, 1), (8, 8, 10)])
def test_sinkhorn_matches_loop_reference(b: int, k: int, iters: int) -> None:
    scores = F.normalize(_randn(b, k, seed=127), dim=1)  # cosine scores in [-1, 1] as in SwAV
    out = sinkhorn_knopp(scores, epsilon=0.1, iterations=iters)
    ref = torch.tensor(_ref_sinkhorn(scores.tolist(), 0.1, iters), dtype=F64)
    assert out.shape == (b, k) and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


def test_sinkhorn_marginals() -> None:
    # The last step normalises the samples, so every row sums to 1 exactly; the prototype (column) sums are
    # only equipartitioned, B/K each, in the limit of many iterations.
    b, k = 12, 4
    scores = F.normalize(_randn(b, k, seed=128) + torch.tensor([1.0, 0, 0, 0], dtype=F64), dim=1)
    q3 = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q3.sum(dim=1), torch.ones(b, dtype=F64), rtol=1e-12, atol=1e-12)
    assert (q3 >= 0).all()
    assert (q3.sum(dim=0) - b / k).abs().max() > 1e-6  # not yet exact after 3 iterations
    q_many = sinkhorn_knopp(scores, epsilon=0.1, iterations=500)
    torch.testing.assert_close(q_many.sum(dim=1), torch.ones(b, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q_many.sum(dim=0), torch.full((k,), b / k, dtype=F64), rtol=1e-8, atol=1e-8)
    # ... and 3 iterations already move the column sums markedly closer to B/K than the plain softmax does.
    soft = F.softmax(scores / 0.05, dim=1)
    assert (q3.sum(dim=0) - b / k).abs().max() < 0.5 * (soft.sum(dim=0) - b / k).abs().max()


def test_sinkhorn_overflow_safe_equivariant_and_no_grad() -> None:
    scores = F.normalize(_randn(6, 5, seed=129), dim=1)
    base = sinkhorn_knopp(scores)
    # exp(100 / 0.05) overflows without the max subtraction; the result must equal the unshifted one.
    shifted = sinkhorn_knopp(scores + 100.0)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(sinkhorn_knopp((scores + 100.0).float())).all()
    perm = _perm(6, 130)
    torch.testing.assert_close(sinkhorn_knopp(scores[perm]), base[perm], rtol=1e-12, atol=1e-14)
    req = scores.clone().requires_grad_()
    assert not sinkhorn_knopp(req).requires_grad
    assert sinkhorn_knopp(scores.to(torch.bfloat16)).dtype == torch.float32


def test_sinkhorn_bad_input() -> None:
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.randn(4, 3), iterations=0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.randn(4, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp(torch.randn(4))


def _ref_swav(scores, codes, t: float) -> float:
    terms = []
    for g, q in enumerate(codes):
        for v, s in enumerate(scores):
            if v == g:
                continue
            log_p = [_log_softmax([x / t for x in row]) for row in s]
            terms.append(sum(-_dot(qr, lr) for qr, lr in zip(q, log_p)) / len(q))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("g,v", [(2, 2), (2, 6), (1, 2)])
def test_swav_matches_loop_reference(g: int, v: int) -> None:
    scores = [F.normalize(_randn(5, 4, seed=131 + i), dim=1) for i in range(v)]
    codes = [sinkhorn_knopp(s) for s in scores[:g]]
    out = swav_loss(scores, codes, temperature=0.1)
    assert out.keys() == {"loss"}
    ref = _ref_swav([s.tolist() for s in scores], [q.tolist() for q in codes], 0.1)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-12)


def test_swav_official_formulation() -> None:
    # Transcription of facebookresearch/swav main_swav.py train() loss (crops_for_assign=[0, 1], 2 + 2 crops).
    bs, nmb_crops, crops_for_assign, t = 4, [2, 2], [0, 1], 0.1
    output = F.normalize(_randn(bs * sum(nmb_crops), 6, seed=140), dim=1)
    loss, codes = 0.0, []
    for crop_id in crops_for_assign:
        with torch.no_grad():
            out = output[bs * crop_id : bs * (crop_id + 1)].detach()
            q = sinkhorn_knopp(out, epsilon=0.05, iterations=3)[-bs:]
            codes.append(q)
        subloss = 0.0
        for v in [i for i in range(sum(nmb_crops)) if i != crop_id]:
            x = output[bs * v : bs * (v + 1)] / t
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (sum(nmb_crops) - 1)
    loss /= len(crops_for_assign)
    out = swav_loss(list(output.chunk(sum(nmb_crops))), codes, temperature=t)
    torch.testing.assert_close(out["loss"], loss, rtol=1e-12, atol=1e-12)


def test_swav_hand_invariance_and_grad() -> None:
    # Uniform scores: every log-softmax is -log K whatever the codes (rows summing to 1) -> loss = log K.
    k = 6
    codes = [sinkhorn_knopp(_randn(3, k, seed=141))]
    out = swav_loss([torch.zeros(3, k, dtype=F64)] * 2, codes)
    assert out["loss"].item() == pytest.approx(math.log(k), rel=1e-14)
    scores = [_randn(4, 3, seed=142 + i) for i in range(3)]
    codes = [sinkhorn_knopp(s) for s in scores[:2]]
    base = swav_loss(scores, codes, temperature=0.5)
    perm = _perm(4, 145)
    _assert_same(base, swav_loss([s[perm] for s in scores], [q[perm] for q in codes], temperature=0.5))
    s_req = tuple(s.clone().requires_grad_() for s in scores)
    assert torch.autograd.gradcheck(lambda *s: swav_loss(list(s), codes, temperature=0.5)["loss"], s_req)
    q_req = [q.clone().requires_grad_() for q in codes]
    (g,) = torch.autograd.grad(swav_loss(list(s_req), q_req)["loss"], q_req[:1], allow_unused=True)
    assert g is None  # codes are targets


def test_swav_bad_input() -> None:
    s = [torch.randn(4, 3) for _ in range(2)]
    with pytest.raises(ValueError, match="G <= V"):
        swav_loss(s, s + s)
    with pytest.raises(ValueError, match="V >= 2"):
        swav_loss(s[:1], s[:1])
    with pytest.raises(ValueError, match="shape"):
        swav_loss(s, [torch.randn(4, 5)])
    with pytest.raises(ValueError, match="temperature"):
        swav_loss(s, s[:1], temperature=0.0)


# ==============================================================================================================
# Dtypes
# ==============================================================================================================


def _pair_calls():
    return [
        ("barlow", lambda a, b: barlow_twins_loss(a, b)),
        ("cissl", lambda a, b: cissl_loss(a, b, b, a)),
        ("vicreg_logdet", lambda a, b: vicreg_logdet_loss(a, b)),
        ("vicreg_pairwise", lambda a, b: vicreg_pairwise_loss(a, b)),
        ("vcreg", lambda a, b: vcreg_loss(a, b)),
        ("dissl", lambda a, b: dissl_loss(a, b, b, a)),
        ("byol", lambda a, b: {"loss": byol_loss(a, b)}),
        ("dino", lambda a, b: dino_loss([a, b], [b], b[0].detach())),
        ("swav", lambda a, b: swav_loss([a, b], [sinkhorn_knopp(b)])),
        ("diet", lambda a, b: diet_loss(a, torch.arange(a.shape[0]) % a.shape[1])),
        ("nt_xent_rows", lambda a, b: nt_xent_loss(a, b, rows=torch.arange(5))),
    ]


@pytest.mark.parametrize("name,call", _pair_calls(), ids=[n for n, _ in _pair_calls()])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(name: str, call, low: torch.dtype) -> None:
    z_a = _randn(32, 8, seed=150, dtype=torch.float32)
    z_b = z_a + 0.5 * _randn(32, 8, seed=151, dtype=torch.float32)
    out_low = call(z_a.to(low), z_b.to(low))
    out_rounded = call(z_a.to(low).float(), z_b.to(low).float())
    for key in out_low:
        assert out_low[key].dtype == torch.float32, key
        torch.testing.assert_close(out_low[key], out_rounded[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name,call", _pair_calls(), ids=[n for n, _ in _pair_calls()])
def test_float64_is_kept(name: str, call) -> None:
    out = call(_randn(8, 4, seed=152), _randn(8, 4, seed=153))
    assert all(v.dtype == F64 for v in out.values())
    assert all(torch.isfinite(v) for v in out.values())
