"""A scheduler's signals with DataLoader workers: only the main process acts; it checkpoints at the signal's step.

Slurm signals every process of a job step (SIGUSR2 before the time limit, SIGTERM on ``scontrol requeue`` or
preemption), the loader's workers included. Real processes and a real one-node Slurm (tests/slurm/start_cluster.sh),
never a mock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_shards, tiny_config

from ssltrain.config import Config, to_yaml
from ssltrain.core.checkpoint_layout import MARKER, read_meta
from ssltrain.core.checkpoints import load_checkpoint

STEPS = 1000  # more than a test waits for: every run here ends at a signal


def config(tmp_path: Path, name: str, **overrides: object) -> Config:
    """Two loader workers, a log line per step, and no periodic checkpoint: the only ones are the signals'."""
    settings: dict[str, object] = {
        "name": name,
        "steps": STEPS,
        "threads": 1,
        "data.workers": 2,
        "checkpoint.every": 10_000,
    }
    settings.update(overrides)
    return tiny_config(tmp_path, f"{tmp_path}/train-*.tar", **settings)


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def checkpoint_steps(run_dir: Path) -> list[int]:
    found = (run_dir / "checkpoints").glob(f"step-*/{MARKER}")
    return sorted(int(p.parent.name.split("-")[1]) for p in found)


def poll(what: str, done: Callable[[], bool], timeout_s: float, context: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{context()}")
        time.sleep(0.05)


# --- one process, no scheduler -------------------------------------------------------------------------------------


def clip_shards(out: Path) -> Path:
    """Clip shards for the video loader: two 2 s videos from ffmpeg's test sources, cut into 1 s clips."""
    from ssltrain.data.ingest.video import write_video_shards

    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        pytest.skip("ffmpeg/ffprobe not on PATH: run tests/video_setup.sh")
    videos = out / "videos"
    videos.mkdir()
    for i, source in enumerate(("testsrc=size=64x48:rate=10", "mandelbrot=size=48x64:rate=10")):
        command = ["ffmpeg", "-v", "error", "-nostdin", "-f", "lavfi", "-i", source, "-t", "2"]
        subprocess.run([*command, "-pix_fmt", "yuv420p", str(videos / f"v{i}.mp4")], check=True)
    write_video_shards([videos], out, fps=8, short_side=32, clip_seconds=1.0)
    return out


LOADERS: dict[str, dict[str, object]] = {
    "torch": {},
    "dali": {"data.loader": "dali"},  # DALI in CPU mode; its host side runs in the DataLoader workers
    "video": {"data.modality": "video", "data.video.mode": "frames", "data.batch_size": 4},  # ffmpeg in the workers
}


@pytest.mark.parametrize(
    ("loader", "sig"),
    [
        ("torch", signal.SIGTERM),
        ("torch", signal.SIGUSR2),
        ("dali", signal.SIGTERM),
        ("video", signal.SIGUSR2),  # the signal whose default action kills an ffmpeg decoder
    ],
    ids=["torch-SIGTERM", "torch-SIGUSR2", "dali-SIGTERM", "video-SIGUSR2"],
)
def test_signal_to_the_process_group_checkpoints_at_that_step(tmp_path: Path, loader: str, sig: signal.Signals) -> None:
    """The signal goes to the whole process group, as Slurm's does to the whole step: the workers (and their ffmpeg
    decoders) neither die of it (the run would fail on the lost worker, or skip the clip) nor act on it; the main
    process checkpoints at the next step boundary, then dies of the signal as its sender meant, leaving no worker
    behind."""
    if loader == "video":
        clip_shards(tmp_path)
    else:
        make_shards(tmp_path, [24, 24])
    cfg = config(tmp_path, "signalled", **LOADERS[loader])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ssltrain.cli", "train", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the main process, its workers (and theirs)
        )
    try:
        poll("step 3", lambda: last_logged_step(cfg.run_dir) >= 3 or proc.poll() is not None, 120, log.read_text)
        signalled_at = last_logged_step(cfg.run_dir)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == -sig, text
    assert "DataLoader worker" not in text and "Traceback" not in text, text
    assert text.count(f"received {sig.name}") == 1, text  # the main process only, not each worker
    (stopped,) = checkpoint_steps(cfg.run_dir)
    assert signalled_at <= stopped <= signalled_at + 2 < STEPS, text
    assert f"stopped at step {stopped} on {sig.name}" in text, text
    assert read_meta(cfg.run_dir / "checkpoints" / f"step-{stopped}")["data_skipped"] == 0, text
    poll("the workers to exit", lambda: not _group_alive(proc.pid), 10, lambda: text)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_decoder_outlives_the_schedulers_signals() -> None:
    """Slurm signals the ffmpeg a worker (or a run without workers) decodes with, too: it must finish its clip
    rather than turn it into a skipped sample. Here the command signals itself."""
    from ssltrain.data.video_io import run

    assert run(["sh", "-c", "kill -USR2 $$; kill -TERM $$; echo decoded"], timeout=30) == b"decoded\n"


# --- the real one-node Slurm -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slurm_job_with_workers_checkpoints_at_usr2_and_requeue_and_ends_equal(cluster: None, tmp_path: Path) -> None:
    """One job with two loader workers, interrupted by the pre-deadline USR2 (submitit requeues it) and by
    ``scontrol requeue`` (SIGTERM to every process of the step; Slurm requeues it): each time it checkpoints at the
    signal's step (there are no periodic checkpoints), restarts from there, and it ends with the parameters of an
    uninterrupted run (bit for bit: the data order and every draw are functions of the seed and position)."""
    from ssltrain.engine.loop import train
    from ssltrain.launch import slurm

    make_shards(tmp_path, [24, 24])
    # The reference first: run while the job runs, a slow one held the signals back until the job had ended.
    reference = train(config(tmp_path, "reference", steps=40, **{"data.workers": 0}))
    cfg = slurm.resolve(config(tmp_path, "requeued", steps=40))
    run = cfg.run_dir
    job_id = str(slurm.submit(cfg, slurm.SlurmSpec(tasks_per_node=1, time_min=10)).job_id)

    def logs() -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted((run / "slurm").glob("*_log.*")))

    def interrupt(command: list[str], restarts: int) -> int:
        """Signal the job once it has run two steps more than it had; the step it stopped at, once it runs again."""
        before = checkpoint_steps(run)
        start = before[-1] if before else 0
        poll(f"step {start + 2}", lambda: last_logged_step(run) >= start + 2, 120, logs)
        signalled_at = last_logged_step(run)
        subprocess.run(command, check=True)
        poll(f"restart {restarts}", lambda: slurm.job_state(job_id) == ("RUNNING", restarts), 120, logs)
        new = sorted(set(checkpoint_steps(run)) - set(before))
        assert len(new) == 1, f"{command[0]}: checkpoints {new} written since step {start}, not one\n{logs()}"
        assert signalled_at <= new[0] <= signalled_at + 2 < cfg.steps, logs()
        return new[0]

    try:
        at_usr2 = interrupt(["scancel", "--signal=USR2", job_id], 1)
        at_term = interrupt(["scontrol", "requeue", job_id], 2)
        assert slurm.wait(job_id, poll_s=0.5, timeout_s=120) == "COMPLETED", logs()
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)

    text = next((run / "slurm").glob(f"{job_id}_0_log.err")).read_text()
    assert checkpoint_steps(run) == [at_usr2, at_term, cfg.steps], text
    assert f"stopped at step {at_usr2} on SIGUSR2" in text and f"stopped at step {at_term} on SIGTERM" in text, text
    assert text.count("received SIGUSR2") == text.count("received SIGTERM") == 1, text  # not the workers
    assert f"step-{at_usr2} (step" in text and f"step-{at_term} (step" in text, text  # "resumed from .../step-N"
    assert "DataLoader worker" not in text, text
    got, want = load_checkpoint(run, ("model",))["model"], load_checkpoint(reference, ("model",))["model"]
    assert got.keys() == want.keys()
    assert not [key for key in want if not torch.equal(got[key], want[key])], "parameters differ after the requeues"
