"""Tests for the eager reference losses: hand-computed values, a loop-based float64 reference,
invariances, gradients, dtypes and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssltrain.losses import covariance_offdiag, nt_xent_loss, variance_hinge, vicreg_loss


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Slow, loop-based float64 references written straight from the papers' formulas.
# --------------------------------------------------------------------------------------------------------------


def _ref_vicreg(
    a: list[list[float]], b: list[list[float]], sim_w: float, var_w: float, cov_w: float, gamma: float, eps: float
) -> dict[str, float]:
    n, d = len(a), len(a[0])

    inv = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def centred(z: list[list[float]]) -> list[list[float]]:
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        return [[z[i][j] - means[j] for j in range(d)] for i in range(n)]

    def var_term(z: list[list[float]]) -> float:
        zc = centred(z)
        total = 0.0
        for j in range(d):
            var = sum(zc[i][j] ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, gamma - math.sqrt(var + eps))
        return total / d

    def cov_term(z: list[list[float]]) -> float:
        zc = centred(z)
        total = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    c = sum(zc[i][j] * zc[i][k] for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    var = (var_term(a) + var_term(b)) / 2
    cov = cov_term(a) + cov_term(b)
    return {"loss": sim_w * inv + var_w * var + cov_w * cov, "invariance": inv, "variance": var, "covariance": cov}


def _ref_nt_xent(a: list[list[float]], b: list[list[float]], t: float) -> dict[str, float]:
    n = len(a)
    rows = a + b

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    u = [unit(r) for r in rows]
    total, correct = 0.0, 0
    for i in range(2 * n):
        p = i + n if i < n else i - n
        logits = {k: sum(x * y for x, y in zip(u[i], u[k])) / t for k in range(2 * n) if k != i}
        m = max(logits.values())
        lse = m + math.log(sum(math.exp(v - m) for v in logits.values()))
        total += lse - logits[p]
        correct += all(logits[p] > v for k, v in logits.items() if k != p)
    return {"loss": total / (2 * n), "accuracy": correct / (2 * n)}


# --------------------------------------------------------------------------------------------------------------
# Hand-checked values
# --------------------------------------------------------------------------------------------------------------


def test_vicreg_hand_computed_3x3() -> None:
    # z_a = I_3: column j centred is e_j - 1/3, so Var = ((2/3)^2 + 2*(1/3)^2) / 2 = 1/3, std = 1/sqrt(3)
    #   -> hinge per dim 1 - 1/sqrt(3), variance term v_a = 1 - 1/sqrt(3).
    #   off-diagonal C[j,k] = ((2/3)(-1/3)*2 + (1/3)^2) / 2 = -1/6, six entries -> 6/36 = 1/6, / D=3 -> c_a = 1/18.
    # z_b = 2 * I_3: Var = 4/3, std = 2/sqrt(3) > 1 -> v_b = 0; C[j,k] = -2/3 -> 6 * 4/9 / 3 -> c_b = 8/9.
    # invariance: (I - 2I)^2 has three ones among nine entries -> 1/3.
    z_a = torch.eye(3, dtype=torch.float64)
    z_b = 2 * torch.eye(3, dtype=torch.float64)
    out = vicreg_loss(z_a, z_b, eps=0.0)

    inv = 1 / 3
    var = (1 - 1 / math.sqrt(3)) / 2
    cov = 1 / 18 + 8 / 9
    assert out["invariance"].item() == pytest.approx(inv, rel=1e-12)
    assert out["variance"].item() == pytest.approx(var, rel=1e-12)
    assert out["covariance"].item() == pytest.approx(cov, rel=1e-12)
    assert out["loss"].item() == pytest.approx(25 * inv + 25 * var + 1 * cov, rel=1e-12)

    assert variance_hinge(z_a, gamma=1.0, eps=0.0).item() == pytest.approx(1 - 1 / math.sqrt(3), rel=1e-12)
    assert variance_hinge(z_b, gamma=1.0, eps=0.0).item() == 0.0
    assert covariance_offdiag(z_a).item() == pytest.approx(1 / 18, rel=1e-12)
    assert covariance_offdiag(z_b).item() == pytest.approx(8 / 9, rel=1e-12)


def test_vicreg_hand_computed_4x2_eps_and_weights() -> None:
    # Both columns are [1, -1, 1, -1] (mean 0): Var = 4/3 (divisor N-1 = 3, not N = 4), Cov(0,1) = 4/3.
    #   std = sqrt(4/3 + eps); with gamma = 2 the hinge is 2 - sqrt(4/3 + eps) on both dims.
    #   covariance: two off-diagonal entries (4/3)^2 each -> 32/9, / D=2 -> 16/9 per branch.
    # z_b = -z_a has the same statistics; invariance = mean((2 z_a)^2) = 4.
    z_a = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    z_b = -z_a
    eps = 1e-4
    out = vicreg_loss(z_a, z_b, sim_weight=2.0, var_weight=3.0, cov_weight=0.5, gamma=2.0, eps=eps)

    var = 2 - math.sqrt(4 / 3 + eps)
    cov = 2 * 16 / 9
    assert out["invariance"].item() == pytest.approx(4.0, rel=1e-12)
    assert out["variance"].item() == pytest.approx(var, rel=1e-12)
    assert out["covariance"].item() == pytest.approx(cov, rel=1e-12)
    assert out["loss"].item() == pytest.approx(2.0 * 4.0 + 3.0 * var + 0.5 * cov, rel=1e-12)


def test_nt_xent_hand_computed_n2() -> None:
    # u = [e1, e2, e1, e2] (z_b identical to z_a). Row 0's candidates: u1 (cos 0), u2 (cos 1, positive), u3 (cos 0)
    # -> loss_i = -log(e^{1/t} / (e^{1/t} + 2)) = log(1 + 2 e^{-1/t}); every row is alike.
    t = 0.5
    z = torch.eye(2, dtype=torch.float64)
    out = nt_xent_loss(z, z.clone(), temperature=t)
    assert out["loss"].item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-12)
    assert out["accuracy"].item() == 1.0

    # Norms must not matter (cosine similarity): scale rows arbitrarily.
    out_scaled = nt_xent_loss(torch.diag(torch.tensor([3.0, 0.2], dtype=torch.float64)), 7 * z, temperature=t)
    assert out_scaled["loss"].item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-12)

    # Opposite views: the positive has cos -1 -> loss_i = log(1 + 2 e^{1/t}); it is the lowest logit.
    out_neg = nt_xent_loss(z, -z, temperature=t)
    assert out_neg["loss"].item() == pytest.approx(math.log(1 + 2 * math.exp(1 / t)), rel=1e-12)
    assert out_neg["accuracy"].item() == 0.0


def test_nt_xent_collapsed_embedding() -> None:
    # All 2N unit vectors equal: every logit is 1/t, so loss = log(2N - 1) and the positive never wins strictly.
    n = 3
    z = torch.ones(n, 4, dtype=torch.float64)
    out = nt_xent_loss(z, z, temperature=0.1)
    assert out["loss"].item() == pytest.approx(math.log(2 * n - 1), rel=1e-12)
    assert out["accuracy"].item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# Vectorised vs loop reference
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(7, 5), (2, 3), (16, 8), (5, 1)])
def test_vicreg_matches_loop_reference(n: int, d: int) -> None:
    # Scale 0.9 puts dims on both sides of the gamma=1 hinge; the offset checks centring.
    z_a = 0.9 * _randn(n, d, seed=1) + 0.3
    z_b = z_a + 0.5 * _randn(n, d, seed=2)
    kw = dict(sim_weight=25.0, var_weight=25.0, cov_weight=1.0, gamma=1.0, eps=1e-4)
    out = vicreg_loss(z_a, z_b, **kw)
    ref = _ref_vicreg(z_a.tolist(), z_b.tolist(), 25.0, 25.0, 1.0, 1.0, 1e-4)
    for key, value in ref.items():
        assert out[key].dtype == torch.float64
        assert out[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert ref["variance"] > 0  # the hinge is exercised


@pytest.mark.parametrize("n,d,t", [(7, 5, 0.1), (2, 3, 0.5), (16, 8, 0.07)])
def test_nt_xent_matches_loop_reference(n: int, d: int, t: float) -> None:
    z_a = _randn(n, d, seed=3)
    z_b = z_a + 0.7 * _randn(n, d, seed=4)
    out = nt_xent_loss(z_a, z_b, temperature=t)
    ref = _ref_nt_xent(z_a.tolist(), z_b.tolist(), t)
    assert out["loss"].dtype == torch.float64
    assert out["loss"].item() == pytest.approx(ref["loss"], rel=1e-10)
    assert out["accuracy"].item() == pytest.approx(ref["accuracy"], abs=1e-12)
    assert not out["accuracy"].requires_grad


# --------------------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------------------


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


def test_joint_row_permutation_invariance() -> None:
    z_a, z_b = _randn(9, 6, seed=5), _randn(9, 6, seed=6)
    perm = torch.randperm(9, generator=_gen(7))
    _assert_same(vicreg_loss(z_a, z_b), vicreg_loss(z_a[perm], z_b[perm]))
    _assert_same(nt_xent_loss(z_a, z_b), nt_xent_loss(z_a[perm], z_b[perm]))


def test_vicreg_feature_permutation_invariance() -> None:
    z_a, z_b = _randn(9, 6, seed=8), _randn(9, 6, seed=9)
    perm = torch.randperm(6, generator=_gen(10))
    _assert_same(vicreg_loss(z_a, z_b), vicreg_loss(z_a[:, perm], z_b[:, perm]))


def test_nt_xent_positive_rescaling_invariance() -> None:
    z_a, z_b = _randn(6, 4, seed=11), _randn(6, 4, seed=12)
    # Per-row positive scales, different for each view: only directions matter.
    s_a = torch.rand(6, 1, generator=_gen(13), dtype=torch.float64) * 10 + 0.1
    s_b = torch.rand(6, 1, generator=_gen(14), dtype=torch.float64) * 10 + 0.1
    _assert_same(nt_xent_loss(z_a, z_b), nt_xent_loss(s_a * z_a, s_b * z_b))


def test_view_swap_invariance() -> None:
    z_a, z_b = _randn(7, 5, seed=15), _randn(7, 5, seed=16)
    _assert_same(vicreg_loss(z_a, z_b), vicreg_loss(z_b, z_a))
    _assert_same(nt_xent_loss(z_a, z_b), nt_xent_loss(z_b, z_a))


def test_variance_zero_when_std_above_gamma() -> None:
    z = _randn(32, 6, seed=17)
    z = z / z.std(dim=0) * torch.linspace(1.0, 3.0, 6, dtype=torch.float64)  # std exactly 1..3 per dim
    assert variance_hinge(z, gamma=1.0).item() == 0.0
    assert vicreg_loss(z, 2 * z, gamma=1.0)["variance"].item() == 0.0
    # ... and positive once gamma exceeds some dims' std.
    assert variance_hinge(z, gamma=2.0).item() > 0.0


def test_covariance_zero_for_decorrelated_inputs() -> None:
    # QR of [1 | random]: columns 1.. are orthonormal and orthogonal to the all-ones vector, i.e. centred.
    basis = torch.cat([torch.ones(10, 1, dtype=torch.float64), _randn(10, 4, seed=18)], dim=1)
    q, _ = torch.linalg.qr(basis)
    z = q[:, 1:] * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64) + 5.0  # scaled, shifted
    assert covariance_offdiag(z).item() == pytest.approx(0.0, abs=1e-25)
    assert vicreg_loss(z, z)["covariance"].item() == pytest.approx(0.0, abs=1e-25)
    # Sanity: the same data with correlated columns is penalised.
    assert covariance_offdiag(z + z[:, :1]).item() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------


def test_vicreg_gradcheck() -> None:
    z_a = (0.9 * _randn(6, 4, seed=19)).requires_grad_()
    z_b = (0.9 * _randn(6, 4, seed=20)).requires_grad_()
    # gradcheck's finite differences must not straddle the relu kink.
    for z in (z_a, z_b):
        assert (1.0 - torch.sqrt(z.detach().var(dim=0) + 1e-4)).abs().min() > 1e-3
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b)["loss"], (z_a, z_b))
    assert torch.autograd.gradcheck(lambda a: covariance_offdiag(a), (z_a,))
    assert torch.autograd.gradcheck(lambda a: variance_hinge(a, 1.0, 1e-4), (z_a,))


def test_nt_xent_gradcheck() -> None:
    z_a = _randn(5, 3, seed=21).requires_grad_()
    z_b = _randn(5, 3, seed=22).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, temperature=0.3)["loss"], (z_a, z_b))


# --------------------------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [vicreg_loss, nt_xent_loss])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(loss_fn, low: torch.dtype) -> None:
    z_a = _randn(64, 16, seed=23, dtype=torch.float32)
    z_b = z_a + 0.5 * _randn(64, 16, seed=24, dtype=torch.float32)
    out_low = loss_fn(z_a.to(low), z_b.to(low))
    out_f32 = loss_fn(z_a, z_b)
    # Same values rounded to half, then computed in float32: must equal the float32 path on those values exactly
    # (proves the arithmetic is not done in half precision) and be close to the unrounded float32 result.
    out_rounded = loss_fn(z_a.to(low).float(), z_b.to(low).float())
    for key in out_f32:
        assert out_low[key].dtype == torch.float32, key
        torch.testing.assert_close(out_low[key], out_rounded[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(out_low[key], out_f32[key], rtol=1e-2, atol=1e-3, msg=key)


@pytest.mark.parametrize("loss_fn", [vicreg_loss, nt_xent_loss])
def test_float64_is_kept(loss_fn) -> None:
    out = loss_fn(_randn(4, 3, seed=25), _randn(4, 3, seed=26))
    assert all(v.dtype == torch.float64 for v in out.values())
    assert variance_hinge(_randn(4, 3)).dtype == torch.float64
    assert covariance_offdiag(_randn(4, 3)).dtype == torch.float64


@pytest.mark.parametrize("block", [variance_hinge, covariance_offdiag])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_building_blocks_upcast_half_inputs(block, low: torch.dtype) -> None:
    # The blocks are public and reused by later variants, so they must upcast on their own too.
    z = (0.9 * _randn(64, 16, seed=27, dtype=torch.float32)).to(low)
    out = block(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, block(z.float()), rtol=0, atol=0)


def test_covariance_large_offset_bf16_input_is_accurate() -> None:
    # A large common offset makes centring in bf16 lose the signal; the float32 path keeps it.
    z = (_randn(256, 8, seed=28, dtype=torch.float32) + 100.0).to(torch.bfloat16)
    exact = covariance_offdiag(z.double())
    assert covariance_offdiag(z).item() == pytest.approx(exact.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [vicreg_loss, nt_xent_loss])
def test_bad_shapes_raise(loss_fn) -> None:
    with pytest.raises(ValueError, match="same .*shape"):
        loss_fn(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="same .*shape"):
        loss_fn(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="N=1"):
        loss_fn(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(4, 3, 2), torch.randn(4, 3, 2))


def test_building_blocks_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="N=1"):
        variance_hinge(torch.randn(1, 3))
    with pytest.raises(ValueError, match="N=1"):
        covariance_offdiag(torch.randn(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        covariance_offdiag(torch.randn(5))


def test_nt_xent_rejects_nonpositive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


def test_official_vicreg_formulation() -> None:
    # Transcription of facebookresearch/vicreg main_vicreg.py VICReg.forward (single process).
    x, y = _randn(12, 6, seed=29), _randn(12, 6, seed=30)
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    xc, yc = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(xc.var(dim=0) + 0.0001), torch.sqrt(yc.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2

    def off_diagonal(m: torch.Tensor) -> torch.Tensor:
        k = m.shape[0]
        return m.flatten()[:-1].view(k - 1, k + 1)[:, 1:].flatten()

    cov_x, cov_y = (xc.T @ xc) / (n - 1), (yc.T @ yc) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum() / d + off_diagonal(cov_y).pow(2).sum() / d
    official = 25.0 * repr_loss + 25.0 * std_loss + 1.0 * cov_loss
    torch.testing.assert_close(vicreg_loss(x, y)["loss"], official, rtol=1e-12, atol=1e-12)
