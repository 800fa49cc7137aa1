"""The real loop under torchrun with several gloo processes: equal to one process, elastic resume, faults.

ViT-Tiny (no BatchNorm) makes the loss a function of the global batch alone, so a run on W ranks follows the same
trajectory as one process up to floating-point reduction order; ResNets, and projectors with hidden layers,
would differ by per-rank BatchNorm statistics (SyncBatchNorm is CUDA-only in PyTorch).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_shards, tiny_config
from faults import nonfinite_at

from ssltrain.config import Config, to_yaml
from ssltrain.core.checkpoint_layout import read_meta
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.data.record import read_global_batches
from ssltrain.engine.checkpoint import Checkpointer
from ssltrain.engine.loop import train
from ssltrain.eval.metrics_log import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VIT = {
    "model.backbone": "vit_tiny",
    "model.patch_size": 8,
    "data.batch_size": 12,
    "steps": 6,
    "threads": 1,
    "method.projector": "[64]",
    "method.byol.predictor": "[64]",  # one Linear each: no BatchNorm
    # LARS, not AdamW: Adam turns reduction-order noise in a zero gradient (VICReg's projector bias) into
    # +-lr steps, so its runs agree only to ~lr; LARS agrees to ~1e-7.
    "optim.name": "lars",
    "optim.lr": 0.5,
    "checkpoint.every": 3,
    "data.record_samples": True,
    "data.streams": 12,  # a multiple of every world size below (4, 3, 2): each shard is read on one rank
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, name: str, data: str, **overrides: object) -> tuple[Path, Config]:
    cfg = tiny_config(tmp_path / name, data, **{**VIT, **overrides})
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(cfg))
    return path, cfg


def torchrun(
    config: Path,
    nproc: int,
    *extra: str,
    nnodes: int = 1,
    node_rank: int | None = None,
    endpoint: str | None = None,
    wait: bool = True,
    nonfinite_steps: str = "",
) -> subprocess.Popen:
    """``ssltrain train CONFIG`` under torchrun; ``nonfinite_steps`` ("2,4") makes the loss NaN at those steps."""
    rdzv = (
        ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "t"]
        if endpoint
        else ["--standalone"]
    )
    entry = (
        [str(Path(__file__).parent / "nonfinite_train.py"), nonfinite_steps]
        if nonfinite_steps
        else ["-m", "ssltrain.cli"]
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *rdzv,
        *entry,
        "train",
        str(config),
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    return proc


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints")["model"]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < atol, f"largest parameter difference {worst:.3g}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("data")
    make_shards(out, [30, 30])
    return str(out)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory: pytest.TempPathFactory, data: str) -> dict[str, Path]:
    """The single-process reference runs every multi-process run is compared with."""
    tmp = tmp_path_factory.mktemp("single")
    return {
        method: train(tiny_config(tmp / method, data, **{**VIT, "method.name": method}))
        for method in ("vicreg", "diet", "byol")
    }


@pytest.fixture(scope="module")
def single(single_runs: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {method: params(run_dir) for method, run_dir in single_runs.items()}


@pytest.mark.parametrize("method,async_save", [("vicreg", True), ("diet", False)])
def test_resume_on_other_world_sizes_equals_one_uninterrupted_process(
    tmp_path: Path, data: str, single: dict, single_runs: dict, method: str, async_save: bool
) -> None:
    """4 ranks for 2 steps, 2 ranks for 2 more, 3 ranks to the end: the same global batches, sample for sample,
    and the same parameters as one process.

    DIET's N-way head is sharded by rows over the ranks, so this reshards it 4 -> 2 -> 3 through DCP.
    """
    config, cfg = write_config(
        tmp_path, method, data, **{"method.name": method, "checkpoint.every": 2, "checkpoint.async_save": async_save}
    )
    torchrun(config, 4, "--stop-after-steps", "2")
    assert read_meta(cfg.run_dir / "checkpoints/step-2")["world_size"] == 4
    torchrun(config, 2, "--stop-after-steps", "2")
    torchrun(config, 3)
    meta = read_meta(cfg.run_dir / "checkpoints/step-6")
    assert meta["world_size"] == 3 and meta["data_position"] == 6 * 12
    resumed, uninterrupted = read_global_batches(cfg.run_dir), read_global_batches(single_runs[method])
    assert sorted(resumed) == [(step, 0) for step in range(6)] and resumed == uninterrupted
    assert len({k for keys in resumed.values() for k in keys}) == 60  # 6 x 12 positions: all 60, then 12 again
    assert_close(params(cfg.run_dir), single[method])
    assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl")] == list(range(1, 7))


@pytest.mark.parametrize("method", ["byol", "diet"])
def test_fsdp_equals_one_process(tmp_path: Path, data: str, single: dict, method: str) -> None:
    """FSDP2 with BYOL's EMA teacher (sharded like the student), and with DIET's own row-sharded head beside it."""
    config, cfg = write_config(
        tmp_path, method, data, **{"method.name": method, "dist.strategy": "fsdp", "dist.fsdp_bf16_params": False}
    )
    torchrun(config, 2)
    assert_close(params(cfg.run_dir), single[method])


def test_fsdp_runs_a_masked_method_as_one_process(tmp_path: Path, data: str) -> None:
    """MAE under FSDP2: the encoder sees only the kept patches (ViT.tokens inside the method's forward, the backbone's
    own parameters unsharded with the root), the masks drawn per position on each rank."""
    mae = {
        "method.name": "mae",
        "augment.global_crops.count": 1,
        "method.mae.decoder_dim": 32,
        "method.mae.decoder_depth": 1,
        "method.mae.decoder_heads": 2,
        "model.patch_size": 4,
    }
    single = params(train(tiny_config(tmp_path / "single", data, **{**VIT, **mae})))
    config, cfg = write_config(
        tmp_path, "mae", data, **mae, **{"dist.strategy": "fsdp", "dist.fsdp_bf16_params": False}
    )
    torchrun(config, 2)
    assert_close(params(cfg.run_dir), single)


@pytest.mark.parametrize("optimizer,lr", [("adamw", 0.01), ("lars", 0.5), ("lamb", 0.01)])
def test_deferred_finite_check_equals_host_check_under_fsdp(
    tmp_path: Path, data: str, optimizer: str, lr: float
) -> None:
    """The device-side skip (fused AdamW's found_inf, LARS's and LAMB's masked updates, on DTensor shards; the
    gated EMA of a sharded teacher; the flag all-reduced without a host read) makes the host-side check's updates, a
    NaN step included."""
    runs = {}
    for mode in ("step", "deferred"):
        config, runs[mode] = write_config(
            tmp_path,
            mode,
            data,
            **{
                "method.name": "byol",
                "dist.strategy": "fsdp",
                "dist.fsdp_bf16_params": False,
                "optim.name": optimizer,
                "optim.lr": lr,
                "train.finite_check": mode,
            },
        )
        torchrun(config, 2, nonfinite_steps="2")
    records = read_metrics(runs["deferred"].run_dir / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert_close(params(runs["deferred"].run_dir), params(runs["step"].run_dir), atol=1e-6)


def test_two_torchrun_nodes_on_loopback_equal_one_node_of_four(tmp_path: Path, data: str, single: dict) -> None:
    config, cfg = write_config(tmp_path, "nodes", data)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [torchrun(config, 2, nnodes=2, endpoint=endpoint, wait=False) for _ in range(2)]
    for node in nodes:
        out, _ = node.communicate(timeout=600)
        assert node.returncode == 0, out[-4000:]
    one_node, ref = write_config(tmp_path, "one_node", data)
    torchrun(one_node, 4)
    assert_close(params(cfg.run_dir), params(ref.run_dir), atol=1e-6)
    assert_close(params(cfg.run_dir), single["vicreg"])


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_rank_ends_the_job_with_an_error_and_the_rerun_resumes(tmp_path: Path, data: str) -> None:
    config, cfg = write_config(tmp_path, "killed", data, **{"steps": 40, "checkpoint.every": 2, "dist.timeout_s": 60})
    proc = torchrun(config, 2, wait=False)
    ckpts = cfg.run_dir / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (ckpts / "step-4" / "COMPLETE").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=120)  # no hang: torchrun stops the survivor and fails
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert "SIGKILL" in out or "Signal 9" in out or "exitcode  : -9" in out, out[-3000:]
    survived = Checkpointer(ckpts).latest()
    assert survived is not None and int(survived.name.split("-")[1]) >= 4
    torchrun(config, 2, "--stop-after-steps", "2")  # the requeued job: resumes, not restarts
    resumed = read_meta(Checkpointer(ckpts).latest())["step"]
    assert resumed == int(survived.name.split("-")[1]) + 2


def test_sigterm_checkpoints_at_the_step_boundary_then_exits(tmp_path: Path, data: str) -> None:
    """What a preempted job gets: the signal on every rank, a checkpoint at the current step, a non-zero exit."""
    config, cfg = write_config(tmp_path, "term", data, **{"steps": 60, "checkpoint.every": 1000})
    proc = torchrun(config, 2, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (cfg.run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    for worker in _children(proc.pid):
        os.kill(worker, signal.SIGTERM)  # as Slurm signals every task of a preempted job
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checkpointing at the end of this step" in out
    latest = Checkpointer(cfg.run_dir / "checkpoints").latest()
    assert latest is not None and 0 < read_meta(latest)["step"] < 60  # saved mid-run although every=1000


def test_nonfinite_steps_are_skipped_counted_and_reloaded(
    tmp_path: Path, data: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, data, **{"steps": 8, "checkpoint.every": 2, "faults.nonfinite_patience": 2})
    with caplog.at_level("WARNING", logger="ssltrain"), nonfinite_at([2, 4, 5]):
        run = train(cfg)
    assert "step 5: 2 non-finite steps in a row; reloading the weights of" in caplog.text
    assert caplog.text.count("update skipped") == 3
    records = read_metrics(run / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 2, 3, 3, 3]
    state = load_checkpoint(run / "checkpoints/step-8")
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    assert read_meta(run / "checkpoints/step-8")["nonfinite_steps"] == 3
