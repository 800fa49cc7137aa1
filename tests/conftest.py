"""Shared fixtures: small real shards made on the fly (PNG images with labels), tiny training configs."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Without a GPU, Triton kernels run under the interpreter. It is read when a kernel is defined, so it must be set
# before any test imports ssltrain.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ssltrain.config import Config, load_config  # noqa: E402
from ssltrain.data.shards import write_shards  # noqa: E402


def png_bytes(i: int, size: int = 16) -> bytes:
    """A deterministic, distinct image for sample i: a random-noise field seeded by i."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(
    out: Path, counts: list[int], size: int = 16, prefix: str = "train", labeled: bool = True
) -> list[Path]:
    """Write len(counts) shards holding counts[i] samples each; sample keys are s<global index>."""
    paths, start = [], 0
    for shard, n in enumerate(counts):
        samples = []
        for i in range(start, start + n):
            sample = {"__key__": f"s{i:06d}", "png": png_bytes(i, size)}
            if labeled:
                sample["cls"] = i % 5
            samples.append(sample)
        written = write_shards(samples, out / f"part{shard}", prefix, max_count=max(n, 1))
        paths += written
        start += n
    # gather into one directory for a simple glob
    for p in paths:
        p.rename(out / f"{prefix}-{p.parent.name}.tar")
        p.with_suffix(".idx").rename(out / f"{prefix}-{p.parent.name}.idx")
    return sorted(out.glob(f"{prefix}-*.tar"))


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    make_shards(tmp_path, [20, 20, 13])
    return tmp_path


def tiny_config(tmp_path: Path, train: str, **overrides: object) -> Config:
    """A config that trains in a second or two on CPU: ResNet-18 at 16 px, batch 8, small projector."""
    base = {
        "name": "tiny",
        "out_dir": str(tmp_path / "runs"),
        "steps": 6,
        "log_every": 1,
        "progress": False,
        "threads": 2,
        "data.train": train,
        "data.batch_size": 8,
        "data.workers": 0,
        "augment.global_crops.size": 16,
        "augment.global_crops.blur_p": "[0.5]",
        "method.projector": "[64,64]",
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "optim.warmup_steps": 2,
        "checkpoint.every": 2,
        "checkpoint.keep": 5,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def start_training(cfg: Config, config_file: Path) -> subprocess.Popen:
    """``ssltrain train`` on ``cfg`` in a process of its own (to be killed), its config written to ``config_file``,
    its output to ``config_file`` with the suffix ``.log``."""
    import sys

    from ssltrain.config import to_yaml

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(to_yaml(cfg))
    cmd = [sys.executable, "-m", "ssltrain.cli", "train", str(config_file)]
    with config_file.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread beats two on a busy 2-core machine (10x on the CPU renderer here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Kernel outputs start as NaN: anything a kernel fails to write shows up in the comparisons."""
    import ssltrain.kernels as K

    if K.triton_available():
        from ssltrain.kernels import _runtime

        def nan_empty(shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        monkeypatch.setattr(_runtime, "empty", nan_empty)
    yield


@pytest.fixture
def seed() -> int:
    """A fresh random seed for torch, returned so a failure can say which."""
    import random

    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


START_CLUSTER = Path(__file__).parent / "slurm" / "start_cluster.sh"


@pytest.fixture(scope="session")
def cluster() -> None:
    """Start (or find) the one-node test Slurm. Skips where that is impossible, unless CI asks for it with
    SSLTRAIN_REQUIRE_SLURM=1: there a missing Slurm must fail, not pass silently."""

    def unavailable(reason: str) -> None:
        if os.environ.get("SSLTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (and SSLTRAIN_REQUIRE_SLURM=1)")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("the test Slurm needs root (tests/slurm/start_cluster.sh installs and starts it)")
    proc = subprocess.run(["bash", str(START_CLUSTER)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        unavailable(f"tests/slurm/start_cluster.sh exited {proc.returncode}: {proc.stderr[-3000:]}")


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's latest complete checkpoint."""
    from ssltrain.core.checkpoint_layout import latest_checkpoint
    from ssltrain.core.checkpoints import load_checkpoint

    latest = latest_checkpoint(run_dir)
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    return load_checkpoint(latest)["model"]


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit for bit: the test of exact resume."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
