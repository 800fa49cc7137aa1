"""Collapse monitors: RankMe, per-dimension std (raw and SimSiam's normalised), LogDet entropy per dimension, the
singular-value spectrum, and the collapse warnings; and the training loop's monitor callbacks (monitors/), each
driven with hand-made step outputs: collapse, online kNN, the online linear probe, and their registry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_shards, tiny_config
from torch import nn

from ssltrain.config import Config, ConfigError
from ssltrain.data.stream import ShardCatalog
from ssltrain.eval.features import eval_transform, extract_features
from ssltrain.eval.knn import knn_accuracy, num_classes_of
from ssltrain.eval.representation import collapse_warnings, embedding_monitors, rankme, singular_values, spectrum
from ssltrain.losses import logdet_entropy
from ssltrain.methods import build_method
from ssltrain.monitors import MONITORS, MonitorContext, StepOutputs, build_monitors
from ssltrain.monitors.collapse import Collapse
from ssltrain.monitors.online_knn import OnlineKNN
from ssltrain.monitors.online_linear import OnlineLinear

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


# ---------------------------------------------------------------- spectrum and warnings


def test_spectrum_is_the_principal_axis_stds() -> None:
    # Independent coordinates with stds 5, 2, 0.5 around a large offset: centring removes the offset.
    g = _gen(17)
    z = (
        torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
        + 100.0
    )
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
    limits = dict(rankme_min=10.0, std_min=0.1)  # eval.collapse_rankme / eval.collapse_std defaults
    healthy = {"emb_rankme": 150.0, "emb_std_normalized": 0.9}
    assert collapse_warnings(healthy, "emb", **limits) == []
    low_rank = collapse_warnings({"emb_rankme": 3.2, "emb_std_normalized": 0.9}, "emb", **limits)
    assert len(low_rank) == 1 and "emb_rankme = 3.2 < 10" in low_rank[0]
    both = collapse_warnings({"feat_rankme": 1.0, "feat_std_normalized": 0.01}, "feat", **limits)
    assert len(both) == 2 and "feat_std_normalized" in both[1]
    # A batch of 8 cannot have RankMe above 8: 7 is healthy there; the threshold is capped at max_rank / 2.
    assert collapse_warnings({"emb_rankme": 7.0}, "emb", **limits, max_rank=8) == []
    assert len(collapse_warnings({"emb_rankme": 3.0}, "emb", **limits, max_rank=8)) == 1
    # Values as metrics.jsonl stores them: "nan" strings and missing keys warn about nothing.
    assert collapse_warnings({"emb_rankme": "nan", "emb_std_normalized": None}, "emb", **limits) == []
    assert collapse_warnings({}, "emb", rankme_min=100.0, std_min=0.1) == []
    # The monitors of a collapsed batch trip both warnings.
    collapsed = torch.randn(1, 32, generator=_gen(18)).expand(256, 32) + 1e-4 * torch.randn(256, 32, generator=_gen(19))
    assert len(collapse_warnings(embedding_monitors(collapsed), "emb", **limits)) == 2
    assert collapse_warnings(embedding_monitors(torch.randn(256, 32, generator=_gen(20))), "emb", **limits) == []


# ---------------------------------------------------------------- the loop's monitors, driven by hand


def _config(tmp_path: Path, **overrides: object) -> Config:
    return tiny_config(tmp_path, str(tmp_path / "unused"), **overrides)


class _Encoder(nn.Module):
    """Stands in for a Method: what MonitorContext.model offers the monitors (feature_dim, features, backbone)."""

    def __init__(self, feature_dim: int = 6) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.backbone = nn.Sequential(nn.Flatten(), nn.LazyLinear(feature_dim))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


def _context(cfg: Config, model: nn.Module | None = None, num_classes: int = 0, is_main: bool = True) -> MonitorContext:
    model = model if model is not None else _Encoder()
    return MonitorContext(cfg, torch.device("cpu"), model, model, is_main, num_classes)


def _outputs(
    step: int,
    *,
    embeddings: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    log_due: bool = True,
    lr_factor: float = 1.0,
) -> StepOutputs:
    return StepOutputs(
        step, {"loss": torch.tensor(1.0)}, embeddings, features, labels, log_due, 0.1 * lr_factor, lr_factor
    )


def test_build_monitors_follows_the_config_and_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [m.name for m in build_monitors(_context(_config(tmp_path)))] == ["collapse"]  # on by default
    probe = _context(_config(tmp_path, **{"eval.online_linear": True}), num_classes=5)
    (collapse, linear) = build_monitors(probe)
    assert isinstance(collapse, Collapse) and isinstance(linear, OnlineLinear) and linear.num_classes == 5
    assert linear.linear.weight.shape == (5, 6)
    stated = _context(_config(tmp_path, **{"eval.online_linear": True, "eval.online_linear_classes": 7}), num_classes=5)
    assert build_monitors(stated)[1].linear.weight.shape == (7, 6)  # the config's count wins over the data's
    with pytest.raises(ConfigError, match="online_linear_classes"):
        build_monitors(_context(_config(tmp_path, **{"eval.online_linear": True})))
    monkeypatch.setitem(MONITORS, "mine", lambda ctx: Collapse.build(ctx))  # a name that is not its monitor's
    with pytest.raises(ValueError, match="registered as 'mine'"):
        build_monitors(_context(_config(tmp_path)))


def test_collapse_monitor_measures_rank_0_at_log_steps_and_warns_once_per_crossing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"eval.collapse_std": 0.5})
    monitor = Collapse.build(_context(cfg))
    z = torch.randn(64, 16, generator=_gen(21))
    assert monitor.on_step(_outputs(1, embeddings=z, log_due=False)) == {}  # an SVD only where it is logged
    assert monitor.on_step(_outputs(1, embeddings=z[:1])) == {}  # one row: no batch statistics
    assert monitor.on_step(_outputs(1, embeddings=None)) == {}
    assert monitor.on_step(_outputs(2, embeddings=z)) == embedding_monitors(z, prefix="emb")
    assert Collapse.build(_context(cfg, is_main=False)).on_step(_outputs(2, embeddings=z)) == {}
    collapsed = z[:1].expand(64, 16) + 1e-4 * torch.randn(64, 16, generator=_gen(22))
    record = monitor.on_step(_outputs(3, embeddings=collapsed))
    assert [w.split(" =")[0] for w in monitor.warnings(record)] == ["emb_rankme", "emb_std_normalized"]
    assert monitor.warnings(monitor.on_step(_outputs(4, embeddings=collapsed))) == []  # still under: quiet
    assert monitor.warnings(monitor.on_step(_outputs(5, embeddings=z))) == []  # recovered
    assert len(monitor.warnings(monitor.on_step(_outputs(6, embeddings=collapsed)))) == 2  # a new crossing
    # RankMe is capped by min(N, D) of the batch: 4 rows with RankMe 3 are not collapsed.
    small = Collapse.build(_context(cfg))
    record = small.on_step(_outputs(1, embeddings=torch.randn(4, 16, generator=_gen(23))))
    assert not any(w.startswith("emb_rankme") for w in small.warnings({**record, "emb_rankme": 3.0}))
    assert monitor.state_dict() == {}


def _clusters(n: int, seed: int, dim: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    centres = 3.0 * torch.randn(classes, dim, generator=_gen(100))
    g = _gen(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def _probe(kind: str, **kw: object) -> OnlineLinear:
    return OnlineLinear(6, 5, 0.1 if kind == "sgd" else 1e-2, kind, torch.device("cpu"), **kw)  # type: ignore[arg-type]


def _probe_state(probe: OnlineLinear) -> list[torch.Tensor]:
    state = probe.state_dict()
    tensors = list(state["linear"].values())
    for per_param in state["optimizer"]["state"].values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_online_linear_learns_and_logs_at_log_steps(kind: str) -> None:
    probe = _probe(kind)
    x, y = _clusters(64, seed=1)
    first = probe.on_step(_outputs(1, features=x, labels=y))
    assert set(first) == {"online_linear_loss", "online_linear_top1"}
    for step in range(2, 60):
        assert probe.on_step(_outputs(step, features=x, labels=y, log_due=False)) == {}
    last = probe.on_step(_outputs(60, features=x, labels=y))
    assert last["online_linear_loss"] < 0.5 * first["online_linear_loss"] and last["online_linear_top1"] > 0.9


def test_online_linear_is_momentum_sgd_or_adamw_on_the_schedule() -> None:
    """The updates of torch's reference optimizers at lr = peak * lr_factor, no weight decay (LARS's excluded
    group is this momentum SGD; the AdamW default takes optim.betas)."""
    x, y = _clusters(32, seed=2)
    for kind, reference in (
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.9), weight_decay=0.0)),
    ):
        probe = _probe(kind, momentum=0.8, betas=(0.8, 0.9))
        ref = nn.Linear(6, 5)
        ref.load_state_dict(probe.linear.state_dict())
        opt = reference(list(ref.parameters()))
        for step, factor in enumerate([0.5, 1.0, 0.25], start=1):
            probe.on_step(_outputs(step, features=x, labels=y, lr_factor=factor, log_due=False))
            for group in opt.param_groups:
                group["lr"] = group.setdefault("peak", group["lr"]) * factor
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
        torch.testing.assert_close(probe.linear.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probe.linear.bias, ref.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("bad_step", [0, 2])  # the very first step too: no optimizer state exists before it
def test_online_linear_skips_a_non_finite_step_exactly(kind: str, bad_step: int) -> None:
    batches = [_clusters(16, seed=10 + i) for i in range(4)]
    clean, skipping = _probe(kind), _probe(kind)
    for i, (x, y) in enumerate(batches):
        if i == bad_step:
            before = _probe_state(skipping)
            bad = x.clone()
            bad[3, 1] = float("nan")
            out = skipping.on_step(_outputs(i + 1, features=bad, labels=y))
            assert math.isnan(out["online_linear_loss"])
            after = _probe_state(skipping)
            assert all(torch.equal(a, b) for a, b in zip(after, before))  # weights, then any optimizer state
            assert all(not t.any() for t in after[len(before) :])  # state made by a skipped first step is blank
        else:
            clean.on_step(_outputs(i + 1, features=x, labels=y, log_due=False))
            skipping.on_step(_outputs(i + 1, features=x, labels=y, log_due=False))
    assert torch.equal(clean.linear.weight, skipping.linear.weight)  # as if the bad batch had never come
    assert torch.equal(clean.linear.bias, skipping.linear.bias)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_online_linear_state_dict_resumes_exactly(kind: str, tmp_path: Path) -> None:
    batches = [_clusters(16, seed=20 + i) for i in range(5)]
    straight = _probe(kind)
    for i, (x, y) in enumerate(batches):
        straight.on_step(_outputs(i + 1, features=x, labels=y, log_due=False))
    first = _probe(kind)
    for i, (x, y) in enumerate(batches[:3]):
        first.on_step(_outputs(i + 1, features=x, labels=y, log_due=False))
    torch.save({"online_linear": first.state_dict()}, tmp_path / "monitors.pt")
    resumed = _probe(kind, seed=99)  # another init: everything must come from the checkpoint
    resumed.load_state_dict(torch.load(tmp_path / "monitors.pt", weights_only=True)["online_linear"])
    for i, (x, y) in enumerate(batches[3:], start=3):
        resumed.on_step(_outputs(i + 1, features=x, labels=y, log_due=False))
    assert torch.equal(resumed.linear.weight, straight.linear.weight)
    assert torch.equal(resumed.linear.bias, straight.linear.bias)


def test_online_linear_sends_nothing_into_the_backbone_and_leaves_the_global_rng() -> None:
    backbone = nn.Linear(10, 6)
    images, y = torch.randn(16, 10, generator=_gen(30)), torch.arange(16) % 5
    features = backbone(images)  # not detached: the probe must cut the graph itself
    state = torch.random.get_rng_state()
    probe = _probe("sgd")
    assert torch.equal(torch.random.get_rng_state(), state)  # its init draws from a generator of its own
    probe.on_step(_outputs(1, features=features, labels=y))
    assert all(p.grad is None for p in backbone.parameters())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_online_linear_rejects_labels_outside_its_classes_at_the_log_step() -> None:
    probe = _probe("sgd")
    x, _ = _clusters(8, seed=40)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])  # 5 is outside 5 classes
    probe.on_step(_outputs(1, features=x, labels=y, log_due=False))  # no host read between log steps
    with pytest.raises(ValueError, match="outside the online probe's 5 classes"):
        probe.on_step(_outputs(2, features=x, labels=y))


def test_online_linear_without_labels_this_step_does_not_move() -> None:
    probe = _probe("adamw")
    before = _probe_state(probe)
    assert probe.on_step(_outputs(1, features=None, labels=None)) == {}
    assert all(torch.equal(a, b) for a, b in zip(_probe_state(probe), before))


def _linear_dist_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probe = _probe("adamw")
        records = []
        for step in range(1, 4):
            x, y = _clusters(16, seed=50 + step)
            rows = slice(8 * rank, 8 * (rank + 1))
            records.append(probe.on_step(_outputs(step, features=x[rows], labels=y[rows])))
        torch.save({"weight": probe.linear.weight, "records": records}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_online_linear_on_two_ranks_follows_the_whole_batch(tmp_path: Path) -> None:
    """Each rank sees half of every batch; the averaged gradient is the whole batch's, as under DDP."""
    mp.spawn(_linear_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = _probe("adamw")
    for step in range(1, 4):
        x, y = _clusters(16, seed=50 + step)
        expected = single.on_step(_outputs(step, features=x, labels=y))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["weight"], single.linear.weight, rtol=1e-5, atol=1e-6)
    top1 = [r["records"][-1]["online_linear_top1"] for r in ranks]
    assert top1[0] == top1[1] == pytest.approx(expected["online_linear_top1"])  # averaged over the ranks


def test_online_knn_measures_when_due_and_equals_the_offline_knn(tmp_path: Path) -> None:
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    make_shards(train_dir, [20, 13])
    make_shards(val_dir, [9], prefix="val")
    cfg = tiny_config(
        tmp_path,
        str(train_dir),
        **{
            "eval.online_knn_every": 2,
            "eval.knn_k": 5,
            "steps": 5,
            "eval.train": str(train_dir),
            "eval.val": str(val_dir),
            "eval.online_knn_samples": "[30,7]",
            "eval.batch_size": 16,
        },
    )
    assert OnlineKNN.build(_context(_config(tmp_path))) is None  # off by default
    torch.manual_seed(0)
    model = build_method(cfg)
    model.train()
    monitor = OnlineKNN.build(_context(cfg, model))
    assert [monitor.due(s) for s in range(1, 6)] == [False, True, False, True, True]  # every 2, and the last
    assert monitor.on_step(_outputs(1, log_due=False)) == {}
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    got = monitor.on_step(_outputs(2))
    assert torch.equal(torch.random.get_rng_state(), rng) and model.training  # trajectory-neutral
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())  # BatchNorm statistics too
    kw = dict(batch_size=16, workers=0, device=torch.device("cpu"))
    bank = extract_features(model, ShardCatalog.from_spec(str(train_dir)), eval_transform(cfg), limit=30, **kw)
    queries = extract_features(model, ShardCatalog.from_spec(str(val_dir)), eval_transform(cfg), limit=7, **kw)
    offline = knn_accuracy(
        bank.x,
        bank.y,
        queries.x,
        queries.y,
        num_classes_of(bank.y, queries.y),
        k=5,
        temperature=cfg.eval.knn_temperature,
    )
    assert got == pytest.approx({"online_knn_top1": offline["top1"], "online_knn_top5": offline["top5"]}, abs=1e-6)
    assert OnlineKNN.build(_context(cfg, model, is_main=False)).on_step(_outputs(2)) == {}  # rank 0 scores
