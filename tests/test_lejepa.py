"""LeJEPA and SIGReg (ssltrain.losses.lejepa, ssltrain.methods.lejepa) against transcriptions of the official code
(rbalestr-lab/lejepa: ``EppsPulley``, ``SlicingUnivariateTest``, MINIMAL.md; the paper's Algorithm 1) in float64,
values and input gradients; SIGReg against the Epps-Pulley integral computed independently (scipy quad); its
preference for a Gaussian sample; the directions' (seed, step) determinism; training and exact resume through the
real loop. The 2- and 4-process equality is in test_distributed_losses (dist_cases "lejepa")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_same_params, final_params, tiny_config

from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.losses import lejepa_loss, sigreg, sigreg_directions
from ssltrain.losses.lejepa import epps_pulley_grid

F64 = torch.float64


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- Transcriptions of the official code (single process; the random directions A are passed in) ---------------


class _OfficialEppsPulley(torch.nn.Module):
    """lejepa/univariate/epps_pulley.py ``EppsPulley`` (trapezoid on [0, t_max], doubled weights), float64."""

    def __init__(self, t_max: float = 3, n_points: int = 17) -> None:
        super().__init__()
        assert n_points % 2 == 1
        t = torch.linspace(0, t_max, n_points, dtype=F64)
        self.t = t
        dt = t_max / (n_points - 1)
        weights = torch.full((n_points,), 2 * dt, dtype=F64)
        weights[[0, -1]] = dt
        self.phi = self.t.square().mul_(0.5).neg_().exp_()
        self.weights = weights * self.phi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.size(-2)
        x_t = x.unsqueeze(-1) * self.t
        cos_mean = torch.cos(x_t).mean(-3)
        sin_mean = torch.sin(x_t).mean(-3)
        err = (cos_mean - self.phi).square() + sin_mean.square()
        return (err @ self.weights) * N * 1  # world_size 1


def _official_slicing(x: torch.Tensor, A: torch.Tensor, univariate_test: torch.nn.Module) -> torch.Tensor:
    """lejepa/multivariate/slicing.py ``SlicingUnivariateTest.forward`` (reduction mean), directions given."""
    stats = univariate_test(x @ A)
    return stats.mean()


def _paper_sigreg(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The paper's Algorithm 1 SIGReg (complex ECF, torch.trapz on 17 points of [-5, 5]), directions given."""
    t = torch.linspace(-5, 5, 17, dtype=F64)
    exp_f = torch.exp(-0.5 * t**2)
    x_t = (x @ A).unsqueeze(2) * t
    ecf = (1j * x_t).exp().mean(0)
    err = (ecf - exp_f).abs().square().mul(exp_f)
    N = x.size(0)
    T = torch.trapz(err, t, dim=1) * N
    return T.mean()


def _minimal_lejepa(proj: torch.Tensor, A: torch.Tensor, lamb: float) -> torch.Tensor:
    """MINIMAL.md's training step: proj is (V, N, D), every view global; SIGReg(knots=17) on [0, 3]."""
    inv_loss = (proj.mean(0) - proj).square().mean()
    sigreg_loss = _official_slicing(proj, A, _OfficialEppsPulley(3, 17))
    return sigreg_loss * lamb + inv_loss * (1 - lamb)


def _paper_lejepa(g_emb: torch.Tensor, a_emb: torch.Tensor, A: torch.Tensor, lambd: float, bs: int) -> torch.Tensor:
    """The paper's Algorithm 1 LeJEPA: centres of the global views, prediction over all views, SIGReg per view."""
    K = a_emb.shape[-1]
    centers = g_emb.view(-1, bs, K).mean(0)
    a_emb = a_emb.view(-1, bs, K)
    sim = (centers - a_emb).square().mean()
    sig = torch.stack([_paper_sigreg(emb, A) for emb in a_emb]).mean()
    return (1 - lambd) * sim + lambd * sig


# --- Values and input gradients against the transcriptions -------------------------------------------------------


def _value_and_grad(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), list(grads)


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("n,d,s", [(16, 5, 7), (33, 12, 3)])
def test_sigreg_equals_official_epps_pulley_slicing(n: int, d: int, s: int) -> None:
    z = 1.3 * _randn(n, d, seed=n) + 0.2
    A = sigreg_directions(d, s, seed=3, step=11, dtype=F64)
    # official [0, 3] with 17 knots = the trapezoid on 33 points of [-3, 3]
    got, got_grad = _value_and_grad(lambda x: sigreg(x, A, num_points=33, t_max=3.0), z)
    ref, ref_grad = _value_and_grad(lambda x: _official_slicing(x, A, _OfficialEppsPulley(3, 17)), z)
    _assert_close(got, ref)
    _assert_close(got_grad[0], ref_grad[0])
    # the paper's Algorithm 1 grid: 17 points on [-5, 5]
    got, got_grad = _value_and_grad(lambda x: sigreg(x, A, num_points=17, t_max=5.0), z)
    ref, ref_grad = _value_and_grad(lambda x: _paper_sigreg(x, A), z)
    _assert_close(got, ref)
    _assert_close(got_grad[0], ref_grad[0])


def test_lejepa_loss_equals_official_minimal_and_paper() -> None:
    v, n, d, s = 4, 10, 6, 5
    proj = _randn(v, n, d, seed=1) * 0.7
    A = sigreg_directions(d, s, seed=0, step=2, dtype=F64)
    got, got_grad = _value_and_grad(
        lambda p: lejepa_loss(list(p.unbind(0)), v, A, lambd=0.02, num_points=33, t_max=3.0)["loss"], proj
    )
    ref, ref_grad = _value_and_grad(lambda p: _minimal_lejepa(p, A, 0.02), proj)
    _assert_close(got, ref)
    _assert_close(got_grad[0], ref_grad[0])

    # multi-crop: 2 global views, 3 local ones (same N, already projected)
    num_global = 2

    def ours(p: torch.Tensor) -> torch.Tensor:
        return lejepa_loss(list(p.unbind(0)), num_global, A, lambd=0.1)["loss"]

    def paper(p: torch.Tensor) -> torch.Tensor:
        flat = p.reshape(-1, d)
        return _paper_lejepa(flat[: num_global * n], flat, A, 0.1, n)

    views = _randn(5, n, d, seed=2)
    got, got_grad = _value_and_grad(ours, views)
    ref, ref_grad = _value_and_grad(paper, views)
    _assert_close(got, ref)
    _assert_close(got_grad[0], ref_grad[0])


def test_lejepa_terms_by_hand() -> None:
    """Two identical views: no prediction loss; lambd 0 and 1 select each term."""
    z = _randn(8, 4, seed=5)
    A = sigreg_directions(4, 3, seed=1, step=0, dtype=F64)
    out = lejepa_loss([z, z], 2, A, lambd=0.0)
    assert out["prediction"] == 0 and out["loss"] == 0
    out = lejepa_loss([z, z + 1.0], 2, A, lambd=1.0)
    torch.testing.assert_close(out["prediction"], torch.tensor(0.25, dtype=F64))  # (0.5)^2 for every entry
    _assert_close(out["loss"], out["sigreg"])
    _assert_close(out["sigreg"], sigreg(torch.stack([z, z + 1.0]), A))


# --- SIGReg against the Epps-Pulley integral, computed independently ---------------------------------------------


def _epps_pulley_quad(x: list[float]) -> float:
    """N * integral over R of |phi_emp(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt, by adaptive quadrature."""
    from scipy.integrate import quad

    n = len(x)

    def integrand(t: float) -> float:
        re = sum(math.cos(t * v) for v in x) / n - math.exp(-t * t / 2)
        im = sum(math.sin(t * v) for v in x) / n
        return (re * re + im * im) * math.exp(-t * t / 2)

    value, _ = quad(integrand, -math.inf, math.inf, epsabs=1e-13, epsrel=1e-12, limit=400)
    return n * value


def test_sigreg_of_one_projection_is_the_epps_pulley_integral() -> None:
    x = _randn(40, 1, seed=7) * 1.4 + 0.3
    one = torch.ones(1, 1, dtype=F64)
    exact = _epps_pulley_quad(x[:, 0].tolist())
    fine = sigreg(x, one, num_points=1201, t_max=12.0)
    assert math.isclose(float(fine), exact, rel_tol=1e-9), (float(fine), exact)
    coarse = sigreg(x, one, num_points=17, t_max=5.0)  # the default grid: a quadrature error of a few percent
    assert math.isclose(float(coarse), exact, rel_tol=0.05), (float(coarse), exact)


def test_epps_pulley_grid_is_the_folded_trapezoid() -> None:
    for n in (2, 16, 17):
        t, w = epps_pulley_grid(n, 5.0)
        full = torch.linspace(-5, 5, n, dtype=F64)
        f = torch.exp(-full.square() / 2) * (1 + full.square())  # an even test function times the window
        ref = torch.trapz(f * torch.exp(full.square() / 2) * torch.exp(-full.square() / 2), full)
        torch.testing.assert_close((w * (1 + t.square())).sum(), ref, rtol=1e-13, atol=1e-15)


def test_gaussian_sample_scores_lower_than_collapsed_and_uniform() -> None:
    n, d = 512, 16
    A = sigreg_directions(d, 64, seed=0, step=0, dtype=F64)
    gaussian = _randn(n, d, seed=11)
    collapsed = _randn(1, d, seed=12).expand(n, d)
    rank_one = _randn(n, 1, seed=13) * _randn(1, d, seed=14) / math.sqrt(d)
    uniform = (torch.rand(n, d, generator=torch.Generator().manual_seed(15), dtype=F64) - 0.5) * math.sqrt(12)
    scores = {
        name: float(sigreg(z, A))
        for name, z in [("gaussian", gaussian), ("collapsed", collapsed), ("rank_one", rank_one), ("uniform", uniform)]
    }
    for other in ("collapsed", "rank_one", "uniform"):
        assert scores["gaussian"] < scores[other], scores
    # One direction, unit variance both: only the shape differs (in 16-D, projections of the uniform cube are
    # already near Gaussian, hence the 1-D case by itself)
    one = torch.ones(1, 1, dtype=F64)
    assert 3 * float(sigreg(gaussian[:, :1], one)) < float(sigreg(uniform[:, :1], one))


# --- Directions ----------------------------------------------------------------------------------------------


def test_directions_depend_on_seed_and_step_only() -> None:
    a = sigreg_directions(9, 5, seed=4, step=100)
    torch.testing.assert_close(a.double().norm(dim=0), torch.ones(5, dtype=F64), rtol=1e-6, atol=1e-6)
    torch.manual_seed(999)  # the global generator plays no part
    assert torch.equal(a, sigreg_directions(9, 5, seed=4, step=100))
    assert not torch.allclose(a, sigreg_directions(9, 5, seed=4, step=101))
    assert not torch.allclose(a, sigreg_directions(9, 5, seed=5, step=100))
    with pytest.raises(ValueError):
        sigreg_directions(9, 5, seed=-1, step=0)


def test_bad_inputs_fail_clearly() -> None:
    z = _randn(8, 4)
    A = sigreg_directions(4, 3, seed=0, step=0, dtype=F64)
    with pytest.raises(ValueError, match="directions"):
        sigreg(z, A[:3])
    with pytest.raises(ValueError, match="num_global"):
        lejepa_loss([z, z], 3, A)
    with pytest.raises(ValueError, match="lambd"):
        lejepa_loss([z, z], 2, A, lambd=1.5)
    with pytest.raises(ValueError, match="shape"):
        lejepa_loss([z, z[:4]], 2, A)


# --- The method through the real loop ------------------------------------------------------------------------

OVERRIDES = {
    "method.name": "lejepa",
    "method.lejepa.num_slices": 16,
    "augment.local_crops.count": 2,
    "augment.local_crops.size": 8,
}


def test_lejepa_trains_and_logs_its_terms(shard_dir: Path, tmp_path: Path) -> None:
    run = train(tiny_config(tmp_path, str(shard_dir), steps=2, **OVERRIDES))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "prediction", "sigreg", "emb_std"} <= r.keys(), r
        assert math.isfinite(r["loss"]) and r["sigreg"] > 0, r


def test_lejepa_resumes_exactly(shard_dir: Path, tmp_path: Path) -> None:
    whole = train(tiny_config(tmp_path / "a", str(shard_dir), steps=4, **OVERRIDES))
    cfg = tiny_config(tmp_path / "b", str(shard_dir), steps=4, **OVERRIDES)
    train(cfg, stop_after_steps=2)
    resumed = train(cfg)
    a, b = final_params(whole), final_params(resumed)
    assert_same_params(a, b)


def test_method_draws_its_directions_from_the_loop_step() -> None:
    """The step comes from ``on_step_start`` only: the same step gives the same loss, another step another one."""
    import dist_cases

    from ssltrain.data.loaders import Views

    method = dist_cases.make_method("lejepa").double()
    views, index = dist_cases.full_batch("lejepa")

    def loss_at(step: int) -> torch.Tensor:
        method.on_step_start(step, 10)
        return method(Views(views, [], index, None))["loss"].detach()

    first = loss_at(3)
    assert torch.equal(first, loss_at(3))
    assert not torch.equal(first, loss_at(4))


def test_sigreg_projects_in_float32_under_bf16_autocast() -> None:
    z = _randn(64, 8, seed=21).float()
    A = sigreg_directions(8, 16, seed=0, step=1)
    ref = sigreg(z, A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sigreg(z, A)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
