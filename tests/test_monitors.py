"""Collapse monitors: RankMe, per-dimension std (raw and SimSiam's normalised), LogDet entropy per dimension,
alignment / uniformity of two views, the singular-value spectrum, and the collapse warnings."""

from __future__ import annotations

import math

import pytest
import torch

from ssltrain.losses import logdet_entropy
from ssltrain.eval.representation import (
    alignment, collapse_warnings, embedding_monitors, rankme, singular_values, spectrum, uniformity,
)

KEYS = {"emb_std", "emb_std_min", "emb_std_normalized", "emb_rankme", "emb_logdet_entropy"}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_singular_values(n: int, d: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """An (n, d) float64 matrix U diag(s) V^T with random orthonormal U, V."""
    u, _ = torch.linalg.qr(torch.randn(n, len(s), generator=_gen(seed), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=_gen(seed + 1), dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("r", [1, 3, 8])
def test_rankme_of_rank_r_with_equal_singular_values_is_r(r: int) -> None:
    z = _with_singular_values(40, 8, [2.5] * r)
    s = singular_values(z)
    assert s.shape == (8,) and s.dtype == torch.float64 and bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close(s[:r], torch.full((r,), 2.5, dtype=torch.float64))
    # p_k = 1/r + eps for the r nonzero values, ~eps for the others: the entropy moves by O(D eps log eps).
    assert rankme(z) == pytest.approx(r, rel=1e-4)
    assert embedding_monitors(z)["emb_rankme"] == pytest.approx(r, rel=1e-4)


def test_rankme_of_a_rank_one_matrix_is_about_one() -> None:
    a = torch.randn(64, 1, generator=_gen(1))
    b = torch.randn(1, 12, generator=_gen(2))
    assert rankme(a @ b) == pytest.approx(1.0, abs=1e-3)  # float32: the zero singular values are ~1e-7 s_1
    assert rankme(torch.zeros(5, 4)) == pytest.approx(1.0, abs=1e-4)  # all-zero batch: finite, "collapsed"


def test_collapsed_batch() -> None:
    z = torch.randn(1, 16, generator=_gen(3)).expand(128, 16).clone()
    m = embedding_monitors(z)
    assert set(m) == KEYS and all(isinstance(v, float) for v in m.values())
    assert m["emb_std"] == pytest.approx(0.0, abs=1e-6) and m["emb_std_min"] == pytest.approx(0.0, abs=1e-6)
    assert m["emb_std_normalized"] == pytest.approx(0.0, abs=1e-5)
    assert m["emb_rankme"] == pytest.approx(1.0, abs=1e-3)
    assert m["emb_logdet_entropy"] == pytest.approx(0.0, abs=1e-5)


def test_isotropic_gaussian_batch() -> None:
    z = torch.randn(512, 16, generator=_gen(4)) * 3.0
    m = embedding_monitors(z, prefix="feat")
    assert set(m) == {k.replace("emb", "feat") for k in KEYS}
    assert m["feat_std"] == pytest.approx(3.0, rel=0.1) and 2.5 < m["feat_std_min"] <= m["feat_std"]
    assert m["feat_std_normalized"] == pytest.approx(1.0, abs=0.1)
    assert 14.0 < m["feat_rankme"] <= 16.0
    # 1/2 log(1 + 9) per dimension for a covariance near 9 I.
    assert m["feat_logdet_entropy"] == pytest.approx(0.5 * math.log(10.0), rel=0.05)


@pytest.mark.parametrize(("n", "d"), [(64, 16), (8, 32)])  # both branches of logdet_entropy (N >= D, N < D)
def test_logdet_entropy_is_the_loss_per_dimension(n: int, d: int) -> None:
    z = torch.randn(n, d, generator=_gen(5)) + torch.linspace(0, 1, d)
    got = embedding_monitors(z)["emb_logdet_entropy"]
    assert got == pytest.approx(float(logdet_entropy(z, alpha=1.0)) / d, rel=1e-6)


def test_dtypes_and_grad_input() -> None:
    z = torch.randn(32, 8, generator=_gen(6), requires_grad=True)
    m32 = embedding_monitors(z)
    m16 = embedding_monitors(z.detach().to(torch.bfloat16))  # upcast, so it still works and is close
    m64 = embedding_monitors(z.detach().double())
    assert z.grad is None
    for key in KEYS:
        assert m64[key] == pytest.approx(m32[key], rel=1e-4)
        assert m16[key] == pytest.approx(m32[key], rel=0.05)


def test_single_row_and_non_finite() -> None:
    m = embedding_monitors(torch.randn(1, 8, generator=_gen(7)))
    assert set(m) == KEYS and m["emb_rankme"] == pytest.approx(1.0, abs=1e-5)
    assert all(math.isnan(m[k]) for k in KEYS - {"emb_rankme"})
    z = torch.randn(16, 8, generator=_gen(8))
    z[3, 2] = float("nan")
    assert all(math.isnan(v) for v in embedding_monitors(z).values())
    with pytest.raises(ValueError, match="2-D"):
        embedding_monitors(torch.randn(4))


# ---------------------------------------------------------------- alignment and uniformity (Wang & Isola 2020)


def test_alignment_by_hand() -> None:
    z = torch.randn(32, 8, generator=_gen(10))
    assert alignment(z, 3.0 * z) == pytest.approx(0.0, abs=1e-6)  # same directions: perfectly aligned
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-6)  # antipodal: ||f - (-f)||^2 = 4, the worst
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])  # orthogonal: ||e1 - e2||^2 = 2
    assert alignment(a, b) == pytest.approx(2.0)


def test_uniformity_by_hand() -> None:
    # Two antipodal points: one pair at squared distance 4, so log exp(-2 * 4) = -8.
    assert uniformity(torch.tensor([[1.0, 0.0], [-5.0, 0.0]])) == pytest.approx(-8.0, rel=1e-6)
    # Three points at 120 degrees on the circle: every pair at squared distance 3, so -6.
    pts = torch.tensor([[math.cos(a), math.sin(a)] for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)])
    assert uniformity(pts) == pytest.approx(-6.0, rel=1e-5)
    collapsed = torch.randn(1, 16, generator=_gen(11)).expand(64, 16) * torch.rand(64, 1, generator=_gen(12))
    assert uniformity(collapsed + 1e-3 * collapsed.abs().max()) == pytest.approx(0.0, abs=1e-3)  # one direction
    spread = uniformity(torch.randn(512, 16, generator=_gen(13)))
    assert -4.0 < spread < -3.0  # isotropic on S^15: E exp(-2||f - f'||^2) = E exp(-4 + 4 cos) ~ e^-4 (1 + ...)
    # logsumexp keeps a hugely spread batch finite where log(mean(exp)) would give log(0)
    assert math.isfinite(uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), t=1000.0))


def test_pair_keys_with_two_views() -> None:
    z1 = torch.randn(64, 16, generator=_gen(14))
    z2 = z1 + 0.1 * torch.randn(64, 16, generator=_gen(15))
    m = embedding_monitors(z1, other=z2)
    assert set(m) == KEYS | {"emb_align", "emb_uniform"}
    assert m["emb_align"] == pytest.approx(alignment(z1, z2)) and 0.0 < m["emb_align"] < 0.1
    assert m["emb_uniform"] == pytest.approx(0.5 * (uniformity(z1) + uniformity(z2)))
    far = embedding_monitors(z1, other=torch.randn(64, 16, generator=_gen(16)))
    assert far["emb_align"] > 1.5  # independent views: ~2 (orthogonal on average)
    assert "emb_align" not in embedding_monitors(z1)  # one view: the key set is as before
    bad = z2.clone()
    bad[0, 0] = float("nan")
    assert math.isnan(embedding_monitors(z1, other=bad)["emb_align"])
    with pytest.raises(ValueError, match="shape"):
        embedding_monitors(z1, other=z2[:10])


# ---------------------------------------------------------------- spectrum and warnings


def test_spectrum_is_the_principal_axis_stds() -> None:
    # Independent coordinates with stds 5, 2, 0.5 around a large offset: centring removes the offset.
    g = _gen(17)
    z = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64) + 100.0
    s = spectrum(z)
    torch.testing.assert_close(s, torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64), rtol=0.03, atol=0.0)
    assert spectrum(z, center=False)[0] > 100.0  # uncentred, the mean dominates
    wide = torch.randn(10, 40, generator=g)
    assert spectrum(wide).shape == (9,)  # N <= D: centring leaves rank N - 1, the structural zero is dropped
    low_rank = _with_singular_values(50, 30, [3.0, 1.0])
    s = spectrum(low_rank)
    assert s.shape == (30,) and float(s[2:].max()) < 1e-6 * float(s[0])  # rank 2: the rest is ~0
    with pytest.raises(ValueError, match="2 rows"):
        spectrum(torch.randn(1, 4))


def test_collapse_warnings() -> None:
    healthy = {"emb_rankme": 150.0, "emb_std_normalized": 0.9}
    assert collapse_warnings(healthy) == []
    low_rank = collapse_warnings({"emb_rankme": 3.2, "emb_std_normalized": 0.9})
    assert len(low_rank) == 1 and "emb_rankme = 3.2 < 10" in low_rank[0]
    both = collapse_warnings({"feat_rankme": 1.0, "feat_std_normalized": 0.01}, prefix="feat")
    assert len(both) == 2 and "feat_std_normalized" in both[1]
    # A batch of 8 cannot have RankMe above 8: 7 is healthy there; the threshold is capped at max_rank / 2.
    assert collapse_warnings({"emb_rankme": 7.0}, max_rank=8) == []
    assert len(collapse_warnings({"emb_rankme": 3.0}, max_rank=8)) == 1
    # Values as metrics.jsonl stores them: "nan" strings and missing keys warn about nothing.
    assert collapse_warnings({"emb_rankme": "nan", "emb_std_normalized": None}) == []
    assert collapse_warnings({}, rankme_min=100.0) == []
    # The monitors of a collapsed batch trip both warnings.
    collapsed = torch.randn(1, 32, generator=_gen(18)).expand(256, 32) + 1e-4 * torch.randn(256, 32, generator=_gen(19))
    assert len(collapse_warnings(embedding_monitors(collapsed))) == 2
    assert collapse_warnings(embedding_monitors(torch.randn(256, 32, generator=_gen(20)))) == []
