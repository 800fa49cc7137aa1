"""Collapse monitors: RankMe, per-dimension std (raw and SimSiam's normalised), LogDet entropy per dimension."""

from __future__ import annotations

import math

import pytest
import torch

from ssltrain.losses import logdet_entropy
from ssltrain.monitors import embedding_monitors, rankme, singular_values

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
