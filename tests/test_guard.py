"""The non-finite guard (ssltrain/engine/guard.py): deferred (device-side) skips make the same updates as host-side
ones; an update that leaves non-finite weights is caught."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_shards, tiny_config
from faults import nonfinite_at
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ssltrain.config import Config, ConfigError
from ssltrain.core.checkpoint_layout import CheckpointError
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.engine.guard import FiniteGuard, nonfinite_flag
from ssltrain.engine.loop import train
from ssltrain.engine.optim import LAMB, LARS, optimizer_step
from ssltrain.engine.run import build_run
from ssltrain.methods import METHODS, Method
from ssltrain.models.ema import ema_update, frozen_copy


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("guard_shards")
    make_shards(out, [24, 24])
    return str(out / "train-*.tar")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def _backward(model: nn.Module, poison: bool) -> torch.Tensor:
    x = torch.randn(6, 4)
    loss = model(x).square().mean()
    if poison:
        loss = loss * float("nan")
    loss.backward()
    return loss


def apply(
    guard: FiniteGuard,
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Callable[[torch.Tensor | None], None] | None = None,
) -> None:
    """The update as the engine's step makes it: the guard's verdict, the optimizer, then the gated EMA teacher and
    the guard's note of whether the parameters are still finite."""
    verdict = guard.judge(loss, model)
    if verdict.apply:
        optimizer_step(optimizer, verdict.found_inf)
        if ema is not None:
            ema(verdict.keep)
        guard.after_update(model)


@pytest.mark.parametrize("mode", ["step", "deferred"])
def test_skipped_step_leaves_weights_optimizer_and_teacher_alone(mode: str) -> None:
    model = _model()
    teacher = frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = FiniteGuard(mode, optimizer, torch.device("cpu"))

    for poison in (False, True, True, False):
        # The student's BN running statistics move in every forward; its parameters and the teacher must not.
        before = [t.detach().clone() for t in (*model.parameters(), *teacher.state_dict().values())]
        optimizer_before = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
        optimizer.zero_grad(set_to_none=True)
        apply(guard, _backward(model, poison), model, optimizer, lambda gate: ema_update(teacher, model, 0.9, gate))
        after = [*model.parameters(), *teacher.state_dict().values()]
        if poison:
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            assert all(torch.equal(v, optimizer.state[model[0].weight][k]) for k, v in optimizer_before.items())
        else:
            assert not torch.equal(before[0], after[0])
    report = guard.check()
    assert (report.total, report.new) == (2, 2) and guard.total == 2
    assert float(optimizer.state[model[0].weight]["step"]) == 2  # the skipped steps did not count


@pytest.mark.parametrize("mode", ["step", "deferred"])
def test_skipped_step_restores_the_running_statistics_its_forward_moved(mode: str) -> None:
    """A NaN sample makes the batch statistics NaN; without the restore, BatchNorm's running mean and variance (the
    student's and an EMA teacher's, which runs its own forward) would stay NaN in every later checkpoint."""
    model = _model()
    method = nn.ModuleDict({"student": model, "teacher": frozen_copy(model)})  # as Method holds its teacher
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = FiniteGuard(mode, optimizer, torch.device("cpu"))
    statistics = [n for n, _ in method.named_buffers()]
    assert len(statistics) == 6  # running mean, variance and count of both BatchNorms
    for step, poison in enumerate((False, True, False, True)):
        before = {k: v.clone() for k, v in method.state_dict().items() if k in statistics or "running" in k}
        guard.begin_step(method)
        optimizer.zero_grad(set_to_none=True)
        x = torch.randn(6, 4)
        if poison:
            x[2, 1] = float("nan")
        loss = model(x).square().mean() + method["teacher"](x).sum() * 0
        loss.backward()
        apply(guard, loss, method, optimizer, lambda gate: ema_update(method["teacher"], model, 0.9, gate))
        after = dict(method.named_buffers())
        if poison:
            assert all(torch.equal(before[k], after[k]) for k in statistics), step
        else:
            assert not torch.equal(before["student.1.running_mean"], after["student.1.running_mean"])
        assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert int(dict(method.named_buffers())["student.1.num_batches_tracked"]) == 2


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)


def _lars(model: nn.Module) -> torch.optim.Optimizer:
    """ssltrain's LARS with a decayed group and an excluded one (biases and norms), as build_optimizer makes."""
    decayed = [p for p in model.parameters() if p.dim() > 1]
    excluded = [p for p in model.parameters() if p.dim() <= 1]
    return LARS(
        [{"params": decayed}, {"params": excluded, "exclude": True, "weight_decay": 0.0}],
        lr=0.5,
        weight_decay=0.01,
        eta=0.02,
    )


def _lamb(model: nn.Module) -> torch.optim.Optimizer:
    """ssltrain's LAMB with a decayed group (trust ratio) and one without weight decay (plain Adam step)."""
    decayed = [p for p in model.parameters() if p.dim() > 1]
    excluded = [p for p in model.parameters() if p.dim() <= 1]
    return LAMB([{"params": decayed}, {"params": excluded, "weight_decay": 0.0}], lr=0.05, weight_decay=0.01)


OPTIMIZERS = pytest.mark.parametrize("make_optimizer", [_adamw, _lars, _lamb], ids=["fused_adamw", "lars", "lamb"])


@OPTIMIZERS
def test_deferred_updates_equal_host_decided_updates(make_optimizer) -> None:
    """Same weights, optimizer state, teacher and BN buffers after a mix of finite and non-finite steps (the first
    one skipped too: LARS then creates its momentum buffers at 0)."""
    results = []
    for mode in ("step", "deferred"):
        model = _model()
        teacher = frozen_copy(model)
        optimizer = make_optimizer(model)
        guard = FiniteGuard(mode, optimizer, torch.device("cpu"))
        torch.manual_seed(1)
        for poison in (True, False, True, False, True, True, False):
            optimizer.zero_grad(set_to_none=True)
            guard.begin_step(model)
            ema = lambda gate, t=teacher, s=model: ema_update(t, s, 0.8, gate)  # noqa: E731
            apply(guard, _backward(model, poison), model, optimizer, ema)
        results.append(
            [*model.state_dict().values(), *teacher.state_dict().values(), *optimizer.state[model[2].weight].values()]
        )
        assert guard.check().longest_run == 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _HostReads(TorchDispatchMode):
    """Records the ops that copy a device value to the host: ``.item()``, ``bool(t)``, a tensor passed where a
    Scalar is expected (``_foreach_lerp_``'s weight). On CUDA each is a sync; here on CPU they are seen the same."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@OPTIMIZERS
def test_deferred_step_reads_nothing_back_to_the_host(make_optimizer) -> None:
    """The claim behind train.finite_check=deferred, checked without a GPU: snapshot of the norm statistics, flag,
    optimizer and EMA teacher dispatch no device-to-host read (the CUDA test below checks the same on a GPU)."""
    model = _model()
    teacher = frozen_copy(model)
    optimizer = make_optimizer(model)
    guard = FiniteGuard("deferred", optimizer, torch.device("cpu"))
    for poison in (True, False, True, False):  # a skipped first step, then both kinds
        optimizer.zero_grad(set_to_none=True)
        guard.begin_step(model)
        loss = _backward(model, poison)
        with _HostReads() as recorder:
            guard.begin_step(model)
            apply(guard, loss, model, optimizer, lambda gate: ema_update(teacher, model, 0.9, gate))
        assert recorder.reads == [], (poison, recorder.reads)
    assert guard.check().total == 2


def test_nonfinite_flag_sees_loss_and_gradients() -> None:
    model = _model()
    loss = _backward(model, poison=False)
    assert float(nonfinite_flag(loss, model)) == 0.0
    model[0].weight.grad[0, 0] = float("inf")
    assert float(nonfinite_flag(loss, model)) == 1.0
    model.zero_grad()
    assert float(nonfinite_flag(torch.tensor(float("nan")), model)) == 1.0


def test_deferred_needs_an_optimizer_that_skips_on_the_device() -> None:
    model = _model()
    with pytest.raises(ConfigError, match="RMSprop cannot.*optim.impl=native"):
        FiniteGuard("deferred", torch.optim.RMSprop(model.parameters(), lr=0.1), torch.device("cpu"))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_with_deferred_check_equals_host_check(
    tmp_path: Path, data: str, caplog: pytest.LogCaptureFixture
) -> None:
    """BYOL (an EMA teacher) with NaN steps 2, 4, 5 and patience 2: the same skips, reload and final weights."""
    runs = {}
    for mode in ("step", "deferred"):
        cfg = tiny_config(
            tmp_path / mode,
            data,
            **{
                "steps": 8,
                "method.name": "byol",
                "method.byol.predictor": "[64,64]",
                "faults.nonfinite_patience": 2,
                "train.finite_check": mode,
            },
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="ssltrain"), nonfinite_at([2, 4, 5]):
            runs[mode] = train(cfg)
        assert caplog.text.count("update skipped") == 3
        assert "step 5: 2 non-finite steps in a row; reloading the weights of" in caplog.text
        assert [r["nonfinite_steps"] for r in _read(runs[mode] / "metrics.jsonl")] == [0, 0, 1, 1, 2, 3, 3, 3]
    step_state = load_checkpoint(runs["step"] / "checkpoints/step-8")["model"]
    deferred_state = load_checkpoint(runs["deferred"] / "checkpoints/step-8")["model"]
    assert step_state.keys() == deferred_state.keys()
    for key in step_state:
        torch.testing.assert_close(deferred_state[key], step_state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_deferred_check_reports_at_log_steps_and_keeps_patience(
    tmp_path: Path, data: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With log_every 3 the host learns of steps 3 and 4 at step 6; their run of 2 still triggers the reload."""
    cfg = tiny_config(
        tmp_path, data, **{"steps": 9, "log_every": 3, "faults.nonfinite_patience": 2, "train.finite_check": "deferred"}
    )
    with caplog.at_level("WARNING", logger="ssltrain"), nonfinite_at([3, 4]):
        run = train(cfg)
    assert "update skipped (2 in all; 2 of the steps since the last log step)" in caplog.text
    assert "step 5: 2 non-finite steps in a row; reloading the weights of" in caplog.text
    assert [r["nonfinite_steps"] for r in _read(run / "metrics.jsonl")] == [0, 2, 2]


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        guard = FiniteGuard("deferred", optimizer, torch.device("cpu"))
        before = model[0].weight.detach().clone()
        apply(guard, _backward(model, poison=rank == 1), model, optimizer)  # NaN on rank 1 only
        moved = not torch.equal(before, model[0].weight)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"moved": moved, "total": guard.total}))
    finally:
        dist.destroy_process_group()


def test_deferred_skip_is_agreed_by_every_rank(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [{"moved": False, "total": 1}] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deferred_step_does_not_synchronise_the_host() -> None:
    """The claim behind train.finite_check=deferred: flag, all of AdamW's update and the EMA teacher without a sync."""
    device = torch.device("cuda")
    model = _model().to(device)
    teacher = frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = FiniteGuard("deferred", optimizer, device)
    x = torch.randn(6, 4, device=device)
    for poison in (False, True, False):
        optimizer.zero_grad(set_to_none=True)
        guard.begin_step(model)  # the first call allocates the copies (a sync-free clone); later ones copy into them
        loss = model(x).square().mean() * (float("nan") if poison else 1.0)
        loss.backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard.begin_step(model)
            apply(guard, loss, model, optimizer, lambda gate: ema_update(teacher, model, 0.9, gate))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert guard.check().total == 1


def poison_optimizer_state(cfg: Config) -> Path:
    """Rewrite the run's latest checkpoint through the production save with every Adam second moment negative, as a
    flipped sign bit would make it in memory: finite values, so the save writes them and the checksums certify them,
    and the next update takes their square root and turns the weights into NaN."""
    run = build_run(cfg)  # resumes the latest checkpoint
    latest = run.checkpointer.latest()
    assert latest is not None
    shutil.rmtree(latest)
    for state in run.optimizer.state.values():
        state["exp_avg_sq"].neg_().sub_(1.0)
    run.save()
    run.checkpointer.wait()
    run.close()
    return latest


@pytest.mark.parametrize("mode", ["step", "deferred"])
def test_weights_made_nonfinite_by_the_optimizer_state_stop_the_run_naming_the_checkpoint(
    tmp_path: Path, data: str, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """Finite losses and gradients, yet NaN weights after the update: the guard sees it (at the step, or at the next
    log step in deferred mode), reloads the last checkpoint at once, and when the reloaded state does it again the
    run stops with an error naming that checkpoint (before: NaN steps skipped to the end, no final checkpoint, and
    train() returned as if it had succeeded)."""
    cfg = tiny_config(tmp_path, data, steps=2, log_every=2, **{"train.finite_check": mode})
    train(cfg)
    poisoned = poison_optimizer_state(cfg)
    cfg.steps = 8
    with caplog.at_level("WARNING", logger="ssltrain"), pytest.raises(CheckpointError) as raised:
        train(cfg)
    assert f"not finite again after reloading '{poisoned}'" in str(raised.value)
    assert "an update left non-finite parameters (its loss and gradients were finite); reloading the weights" in (
        caplog.text
    )
    assert not (cfg.run_dir / "checkpoints/step-8").exists()


@contextlib.contextmanager
def nan_weights_after(step: int) -> Iterator[None]:
    """While active, every method's first parameter turns NaN at the end of optimizer step ``step``, as a faulty
    update (not a NaN loss or gradient) would leave it."""
    saved = dict(METHODS)

    def faulty(cls: type[Method]) -> type[Method]:
        class Faulty(cls):  # type: ignore[valid-type,misc]
            def on_step_end(self, at: int, total_steps: int, gate: torch.Tensor | None = None) -> None:
                super().on_step_end(at, total_steps, gate)
                if at == step:
                    with torch.no_grad():
                        next(self.parameters()).fill_(float("nan"))

        Faulty.__name__ = Faulty.__qualname__ = cls.__name__
        return Faulty

    METHODS.update({name: faulty(cls) for name, cls in saved.items()})
    try:
        yield
    finally:
        METHODS.clear()
        METHODS.update(saved)


@pytest.mark.parametrize("mode", ["step", "deferred"])
def test_weights_made_nonfinite_once_are_reloaded_at_once_and_the_run_finishes(
    tmp_path: Path, data: str, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """NaN weights after step 3's update: reloaded from step 2's checkpoint at the next check, without waiting out
    the patience; the run goes on and writes a finite final checkpoint (before: the final checkpoint was refused)."""
    cfg = tiny_config(tmp_path, data, steps=6, log_every=2, **{"train.finite_check": mode})
    with caplog.at_level("WARNING", logger="ssltrain"), nan_weights_after(3):
        train(cfg)
    assert "step 3: an update left non-finite parameters" in caplog.text
    assert caplog.text.count("reloading the weights of") == 1
    final = load_checkpoint(cfg.run_dir / "checkpoints/step-6")["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
