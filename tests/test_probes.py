"""Probes on frozen features: kNN vote worked by hand, chunking/scale invariances, and the linear probe + sweep."""

from __future__ import annotations

import math

import pytest
import torch

import ssltrain.eval.linear as linear_mod
from ssltrain.eval.knn import knn_accuracy, knn_predict, knn_sweep, topk_accuracy
from ssltrain.eval.linear import linear_probe, linear_probe_grid, linear_probe_sweep


def polar(degrees: float, radius: float = 1.0) -> list[float]:
    return [radius * math.cos(math.radians(degrees)), radius * math.sin(math.radians(degrees))]


# Bank in 2-D: class 0 at 0 deg, class 1 at 90 and 45 deg, class 2 at 180 deg (radii differ: only angles matter).
BANK = torch.tensor([polar(0, 1.0), polar(90, 2.0), polar(45, 0.5), polar(180, 3.0)])
BANK_Y = torch.tensor([0, 1, 1, 2])
T = 0.5


def gaussian_clusters(
    n: int, num_classes: int, dim: int, spread: float, seed: int, centers: torch.Tensor | None = None
):
    g = torch.Generator().manual_seed(seed)
    if centers is None:
        centers = torch.randn(num_classes, dim, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, dim, generator=g), y, centers


# ---------------------------------------------------------------- kNN


def test_knn_hand_case_query_on_class0_axis() -> None:
    q = torch.tensor([polar(0, 2.0)])  # cosines: bank0 1, bank2 cos45, bank1 0, bank3 -1
    s1 = knn_predict(BANK, BANK_Y, q, num_classes=3, k=1, temperature=T)
    torch.testing.assert_close(s1, torch.tensor([[math.exp(1 / T), 0.0, 0.0]]))
    s3 = knn_predict(BANK, BANK_Y, q, num_classes=3, k=3, temperature=T)
    expected = [math.exp(1 / T), math.exp(math.cos(math.radians(45)) / T) + math.exp(0 / T), 0.0]
    torch.testing.assert_close(s3, torch.tensor([expected]))  # [7.389, 4.113 + 1, 0]


def test_knn_hand_case_k1_and_k3_disagree() -> None:
    q = torch.tensor([polar(20, 3.0)])  # nearest: bank0 (20 deg), bank2 (25 deg), bank1 (70 deg)
    s1 = knn_predict(BANK, BANK_Y, q, num_classes=3, k=1, temperature=T)
    torch.testing.assert_close(s1, torch.tensor([[math.exp(math.cos(math.radians(20)) / T), 0.0, 0.0]]))
    s3 = knn_predict(BANK, BANK_Y, q, num_classes=3, k=3, temperature=T)
    w0 = math.exp(math.cos(math.radians(20)) / T)  # 6.550
    w1 = math.exp(math.cos(math.radians(25)) / T) + math.exp(math.cos(math.radians(70)) / T)  # 6.126 + 1.982
    torch.testing.assert_close(s3, torch.tensor([[w0, w1, 0.0]]))
    assert s1.argmax().item() == 0 and s3.argmax().item() == 1  # two close class-1 votes outweigh one closer class-0


@pytest.mark.parametrize("chunk_size,bank_chunk_size", [(1, 1), (7, 13), (5, 64), (1000, 3)])
def test_knn_chunking_matches_single_chunk(chunk_size: int, bank_chunk_size: int) -> None:
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(101, 16, generator=g), torch.randn(37, 16, generator=g)
    labels = torch.randint(0, 6, (101,), generator=g)
    ref = knn_predict(bank, labels, queries, 6, k=5, temperature=0.1, chunk_size=10_000, bank_chunk_size=10_000)
    got = knn_predict(
        bank, labels, queries, 6, k=5, temperature=0.1, chunk_size=chunk_size, bank_chunk_size=bank_chunk_size
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0.0)  # exp(sim/T) turns 1 ulp of sim into ~1e-6
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert torch.equal(got > 0, ref > 0)  # exactly the same neighbours' classes voted


def test_knn_invariant_to_positive_rescaling() -> None:
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(80, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 4, (80,), generator=g)
    ref = knn_predict(bank, labels, queries, 4, k=7, temperature=0.1)
    bank_scaled = bank * (torch.rand(80, 1, generator=g) * 100 + 0.01)
    queries_scaled = queries * 1e-3
    torch.testing.assert_close(
        knn_predict(bank_scaled, labels, queries_scaled, 4, k=7, temperature=0.1), ref, rtol=1e-5, atol=0.0
    )


def test_knn_top5_by_hand() -> None:
    # One bank point per class at 0, 10, ..., 60 degrees; queries at 0 degrees rank class c at position c.
    bank = torch.tensor([polar(10 * c) for c in range(7)])
    queries = torch.tensor([polar(0, 2.0)] * 7)
    result = knn_accuracy(bank, torch.arange(7), queries, torch.arange(7), num_classes=7, k=7, temperature=0.1)
    assert result["top1"] == pytest.approx(1 / 7)
    assert result["top5"] == pytest.approx(5 / 7)


def test_topk_accuracy_few_classes_and_ties() -> None:
    scores = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    # 3 classes: top5 covers all of them; the tie in row 2 goes to the lower index (class 0).
    assert topk_accuracy(scores, torch.tensor([2, 1])) == {"top1": 0.0, "top5": 1.0}
    assert topk_accuracy(scores, torch.tensor([1, 0]))["top1"] == 1.0


def test_knn_separated_clusters_near_perfect() -> None:
    bank, bank_y, centers = gaussian_clusters(500, 10, 32, spread=0.3, seed=3)
    queries, query_y, _ = gaussian_clusters(200, 10, 32, spread=0.3, seed=4, centers=centers)
    result = knn_accuracy(bank, bank_y, queries, query_y, 10)
    assert result["top1"] >= 0.99 and result["top5"] == 1.0


def test_knn_random_labels_near_chance() -> None:
    g = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    result = knn_accuracy(
        bank, torch.randint(0, 10, (2000,), generator=g), queries, torch.randint(0, 10, (1000,), generator=g), 10
    )
    assert 0.05 < result["top1"] < 0.16
    assert 0.4 < result["top5"] < 0.6


def test_knn_sweep_separable_is_perfect_for_every_k() -> None:
    bank, bank_y, centers = gaussian_clusters(600, 10, 32, spread=0.3, seed=30)
    queries, query_y, _ = gaussian_clusters(200, 10, 32, spread=0.3, seed=31, centers=centers)
    result = knn_sweep(bank, bank_y, queries, query_y, 10, ks=(10, 20, 100))
    assert set(result) == {10, 20, 100}
    assert all(r == {"top1": 1.0, "top5": 1.0} for r in result.values())


def test_knn_sweep_equals_knn_accuracy_per_k() -> None:
    """One neighbour search for the largest k serves every smaller k exactly (its top-k list is sorted)."""
    g = torch.Generator().manual_seed(32)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(120, 16, generator=g)
    bank_y, query_y = torch.randint(0, 8, (300,), generator=g), torch.randint(0, 8, (120,), generator=g)
    ks = (1, 5, 20, 100)
    swept = knn_sweep(bank, bank_y, queries, query_y, 8, ks=ks, temperature=0.1, chunk_size=50, bank_chunk_size=70)
    for k in ks:
        assert swept[k] == knn_accuracy(bank, bank_y, queries, query_y, 8, k=k, temperature=0.1)
        assert swept[k]["top1"] <= swept[k]["top5"]
    assert len({swept[k]["top1"] for k in ks}) > 1  # the ks really differ on noisy data
    with pytest.raises(ValueError, match="exceeds the bank size"):
        knn_sweep(bank, bank_y, queries, query_y, 8, ks=(10, 301))
    with pytest.raises(ValueError, match="at least one k"):
        knn_sweep(bank, bank_y, queries, query_y, 8, ks=())


# ---------------------------------------------------------------- linear probe


def separable(seed: int = 0, n_train: int = 1500, n_val: int = 500, dim: int = 32, num_classes: int = 10):
    x, y, centers = gaussian_clusters(n_train, num_classes, dim, spread=0.5, seed=seed)
    xv, yv, _ = gaussian_clusters(n_val, num_classes, dim, spread=0.5, seed=seed + 100, centers=centers)
    return x, y, xv, yv


def test_linear_probe_separable() -> None:
    x, y, xv, yv = separable()
    result = linear_probe(x, y, xv, yv, 10, epochs=20)
    assert result["top1"] > 0.95 and result["train_top1"] > 0.95 and result["top5"] == 1.0


def test_linear_probe_invariant_to_per_dim_affine_scale() -> None:
    """Train-statistics standardisation: per-dim scales from 1e-3 to 1e3 plus offsets change nothing."""
    x, y, xv, yv = separable(seed=20, n_train=1000, n_val=500)
    g = torch.Generator().manual_seed(1)
    x, xv = x + torch.randn(x.shape, generator=g), xv + torch.randn(xv.shape, generator=g)  # overlap: top1 < 1
    scale, offset = torch.logspace(-3, 3, x.shape[1]), torch.linspace(-50, 50, x.shape[1])
    ref = linear_probe(x, y, xv, yv, 10, epochs=10)
    got = linear_probe(x * scale + offset, y, xv * scale + offset, yv, 10, epochs=10)
    assert ref["top1"] > 0.9
    assert got == pytest.approx(ref, abs=0.005)  # float rounding may move a sample or two, not more


def test_linear_probe_random_labels_near_chance() -> None:
    g = torch.Generator().manual_seed(6)
    x, xv = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    y, yv = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    result = linear_probe(x, y, xv, yv, 10, epochs=20)
    assert result["top1"] < 0.16
    assert result["train_top1"] > result["top1"] + 0.03  # it did fit something: the noise in train


def test_linear_probe_deterministic_and_seeded() -> None:
    x, y, xv, yv = separable(seed=7, n_train=400, n_val=200)
    x = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # overlap: not all 1.0
    a = linear_probe(x, y, xv, yv, 10, epochs=5, seed=3)
    torch.randn(100)  # the global RNG must play no part
    b = linear_probe(x, y, xv, yv, 10, epochs=5, seed=3)
    assert a == b
    others = [linear_probe(x, y, xv, yv, 10, epochs=5, seed=s) for s in (4, 5)]
    assert any(o != a for o in others)  # the seed does reach the init / batch order


def test_linear_probe_constant_train_dim_ignored() -> None:
    """A dim that is constant on train but not on val must not swamp the logits (no division by ~0)."""
    x, y, xv, yv = separable(seed=8, n_train=600, n_val=300)
    x, xv = torch.cat([x, torch.zeros(len(x), 1)], 1), torch.cat([xv, torch.full((len(xv), 1), 1e3)], 1)
    assert linear_probe(x, y, xv, yv, 10, epochs=20)["top1"] > 0.95


def test_linear_probe_under_inference_mode() -> None:
    x, y, xv, yv = separable(seed=9, n_train=300, n_val=100)
    with torch.inference_mode():
        x, xv = x.clone(), xv.clone()  # inference tensors, as feature extraction under inference_mode makes
        result = linear_probe(x, y, xv, yv, 10, epochs=5)
    assert 0.0 <= result["top1"] <= 1.0


def test_linear_probe_leaves_thread_count() -> None:
    before = torch.get_num_threads()
    x, y, xv, yv = separable(seed=10, n_train=200, n_val=50)
    linear_probe(x, y, xv, yv, 10, epochs=2)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- sweep

SWEEP = dict(lrs=(1e-7, 0.1), weight_decays=(0.0, 1e-4), epochs=10, batch_size=64)


def test_sweep_picks_working_lr_and_reports_val() -> None:
    x, y, xv, yv = separable(seed=11, n_train=600, n_val=300)
    result = linear_probe_sweep(x, y, xv, yv, 10, **SWEEP)
    assert result["lr"] == 0.1  # lr=1e-7 barely moves the random init: chance on the held-out slice
    assert len(result["grid"]) == 4 and result["holdout_top1"] == max(g["holdout_top1"] for g in result["grid"])
    assert result["top1"] > 0.95
    # The reported val numbers are exactly a plain probe on all of train with the chosen setting.
    plain = linear_probe(
        x, y, xv, yv, 10, lr=result["lr"], weight_decay=result["weight_decay"], epochs=10, batch_size=64
    )
    assert {k: result[k] for k in plain} == plain


def test_sweep_selection_ignores_val_labels() -> None:
    x, y, xv, yv = separable(seed=12, n_train=600, n_val=300)
    kw = dict(lrs=(0.003, 0.03, 0.3), weight_decays=(0.0, 1e-2), epochs=5, batch_size=64)
    original = linear_probe_sweep(x, y, xv, yv, 10, **kw)
    permuted = linear_probe_sweep(
        x, y, xv, yv[torch.randperm(len(yv), generator=torch.Generator().manual_seed(0))], 10, **kw
    )
    assert (permuted["lr"], permuted["weight_decay"]) == (original["lr"], original["weight_decay"])
    assert permuted["grid"] == original["grid"]
    assert permuted["top1"] < 0.3 < original["top1"]  # val did change; only the selection must not


def test_sweep_selection_never_passes_val(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, xv, yv = separable(seed=13, n_train=300, n_val=100)
    calls = []
    real_grid, real_probe = linear_mod.linear_probe_grid, linear_mod.linear_probe

    def spy_grid(train_x, train_y, val_x, val_y, *args, **kwargs):
        calls.append(("grid", val_x is xv, train_x.shape[0], val_x.shape[0]))
        return real_grid(train_x, train_y, val_x, val_y, *args, **kwargs)

    def spy_probe(train_x, train_y, val_x, val_y, *args, **kwargs):
        calls.append(("probe", val_x is xv, train_x.shape[0], val_x.shape[0]))
        return real_probe(train_x, train_y, val_x, val_y, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "linear_probe_grid", spy_grid)
    monkeypatch.setattr(linear_mod, "linear_probe", spy_probe)
    linear_probe_sweep(x, y, xv, yv, 10, **SWEEP)
    # The grid sees only train (80% fit, 20% per class held out); val is touched once, by the final probe.
    assert calls == [("grid", False, 240, 60), ("probe", True, 300, 100)]


def test_grid_equals_separate_probes() -> None:
    """The batched grid trains each setting exactly as linear_probe does (same init, batches, lr schedule)."""
    x, y, xv, yv = separable(seed=14, n_train=400, n_val=200)
    x = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # overlap: numbers below 1.0
    xv = xv + 1.5 * torch.randn(xv.shape, generator=torch.Generator().manual_seed(2))
    lrs, wds = [1e-7, 0.01, 0.1, 1.0, 0.1], [0.0, 1e-5, 1e-3, 1e-4, 0.5]
    grid = linear_probe_grid(x, y, xv, yv, 10, lrs, wds, epochs=6, batch_size=64, seed=3)
    for res, lr, wd in zip(grid, lrs, wds):
        ref = linear_probe(x, y, xv, yv, 10, lr=lr, weight_decay=wd, epochs=6, batch_size=64, seed=3)
        assert res == pytest.approx(ref, abs=2 / 200)  # float rounding may flip a sample, not more
    tops = [g["top1"] for g in grid]
    assert tops[0] < 0.5 < max(tops) < 1.0  # lr 1e-7 learns nothing; the others do, on data that is not trivial
    assert grid[4]["train_top1"] < grid[2]["train_top1"]  # weight decay 0.5 holds the fit back


# ---------------------------------------------------------------- bad inputs

X = torch.randn(10, 4)
Y = torch.randint(0, 3, (10,))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=11), "exceeds the bank size"),
        (dict(k=0), "k must be"),
        (dict(queries=torch.randn(5, 3)), "dim"),
        (dict(bank=torch.randn(0, 4), bank_labels=torch.zeros(0, dtype=torch.long)), "empty"),
        (dict(queries=torch.randn(0, 4)), "empty"),
        (dict(bank_labels=Y[:9]), "10 entries"),
        (dict(bank_labels=Y.float()), "integer"),
        (dict(bank_labels=torch.full((10,), 3)), r"\[0, 3\)"),
        (dict(num_classes=0), "num_classes"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=0.005), "overflows"),
        (dict(bank=torch.full((10, 4), float("nan"))), "NaN"),
        (dict(bank=torch.ones(10, 4, dtype=torch.long)), "floating"),
        (dict(queries=torch.randn(5, 4, device="meta")), "device"),
    ],
)
def test_knn_bad_inputs(kwargs: dict, match: str) -> None:
    args = dict(bank=X, bank_labels=Y, queries=torch.randn(5, 4), num_classes=3, k=3, temperature=0.07) | kwargs
    with pytest.raises(ValueError, match=match):
        knn_predict(**args)


def test_knn_small_temperature_fine_in_float64() -> None:
    scores = knn_predict(X.double(), Y, torch.randn(5, 4, dtype=torch.float64), 3, k=3, temperature=0.005)
    assert scores.dtype == torch.float64 and bool(torch.isfinite(scores).all())


def test_knn_accuracy_bad_query_labels() -> None:
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(X, Y, torch.randn(5, 4), torch.zeros(4, dtype=torch.long), 3, k=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(val_x=torch.randn(5, 3)), "dim"),
        (dict(train_x=torch.randn(0, 4), train_y=torch.zeros(0, dtype=torch.long)), "empty"),
        (dict(val_y=torch.full((5,), 7)), r"\[0, 3\)"),
        (dict(train_y=Y[:4]), "10 entries"),
        (dict(epochs=0), "epochs"),
        (dict(lr=-1.0), "lr"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_linear_probe_bad_inputs(kwargs: dict, match: str) -> None:
    args = (
        dict(train_x=X, train_y=Y, val_x=torch.randn(5, 4), val_y=torch.zeros(5, dtype=torch.long), num_classes=3)
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        linear_probe(**args)


def test_sweep_bad_inputs() -> None:
    args = (X, Y, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="holdout_fraction"):
        linear_probe_sweep(*args, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="lrs"):
        linear_probe_sweep(*args, lr=0.1)
    with pytest.raises(ValueError, match="holds none out"):  # one sample per class: nothing can be held out
        linear_probe_sweep(X[:3], torch.arange(3), *args[2:])
