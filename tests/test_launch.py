"""The launcher against a real one-node Slurm on localhost (tests/slurm/start_cluster.sh), never a mock.

The main test interrupts one 2-rank training job three ways (the pre-deadline USR2, ``scontrol requeue``, and a
hard kill followed by a requeue) and checks that the parameters it ends with equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_shards

from ssltrain.cli import main as ssltrain_main
from ssltrain.config import Config, load_config, to_yaml
from ssltrain.core.checkpoint_layout import MARKER
from ssltrain.core.checkpoints import load_checkpoint
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.launch import local, slurm

SSLTRAIN = Path(sys.executable).parent / "ssltrain"  # the installed command, as the README runs it


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    assert (
        ssltrain_main(
            [
                "shards",
                "shapes",
                "--out",
                str(out),
                "--train",
                "512",
                "--val",
                "64",
                "--shard-size",
                "256",
                "--size",
                "32",
            ]
        )
        == 0
    )
    return out


def tiny(tmp_path: Path, data: Path, name: str, **overrides: object) -> Config:
    """ResNet-18 at 32 px, batch 32 over 2 ranks, a checkpoint every 5 steps: about 0.5 s a step on 2 cores."""
    base = {
        "name": name,
        "out_dir": str(tmp_path / "runs"),
        "steps": 35,
        "device": "cpu",
        "threads": 1,
        "progress": False,
        "log_every": 5,
        "data.train": f"{data}/train-*.tar",
        "data.batch_size": 32,
        "data.workers": 0,
        "augment.global_crops.size": 32,
        "method.projector": "[64,64]",
        "optim.name": "adamw",
        "optim.lr": 0.004,
        "optim.warmup_steps": 3,
        "checkpoint.every": 5,
        "checkpoint.keep": 20,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(to_yaml(cfg))
    return path


# --- no cluster needed -------------------------------------------------------------------------------------------


def test_dry_run_prints_the_sbatch_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_shards(tmp_path, [4])
    config = write_config(tiny(tmp_path, tmp_path, "dry"), tmp_path / "c.yaml")
    code = ssltrain_main(
        [
            "launch",
            "slurm",
            str(config),
            "steps=7",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--time",
            "04:00:00",
            "--partition",
            "gpu",
            "--signal-delay-s",
            "300",
            "--dry-run",
        ]
    )
    assert code == 0
    script = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --requeue",
        "#SBATCH --time=240",
        "#SBATCH --partition=gpu",
        "#SBATCH --job-name=dry",
    ):
        assert line in script.splitlines(), f"{line!r} missing from:\n{script}"
    logs = tmp_path / "runs" / "dry" / "slurm"  # out_dir made absolute: the job may start in another directory
    assert f"--output={logs}/%j_0_log.out" in script and "submitit.core._submit" in script
    assert not logs.exists()  # nothing submitted, nothing written


def test_a_bad_config_fails_before_submitting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tiny(tmp_path, tmp_path, "bad"), tmp_path / "c.yaml")
    assert ssltrain_main(["launch", "slurm", str(config), "optim.lrr=0.1", "--dry-run"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_dry_run_checks_everything_knowable_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 nodes x 2 tasks: the batch must split over 4 ranks; the data, the eval sets the online kNN monitor needs,
    the backbone's options and the time limit against the signal delay are all checked in the login shell."""
    make_shards(tmp_path / "data", [4])
    config = write_config(tiny(tmp_path, tmp_path / "data", "dry"), tmp_path / "c.yaml")
    four_ranks = ["--nodes", "2", "--tasks-per-node", "2", "--time", "30", "--dry-run"]

    def error(*overrides: str, flags: tuple[str, ...] = ()) -> str:
        code: int | str | None
        try:
            code = ssltrain_main(["launch", "slurm", str(config), *four_ranks, *flags, *overrides])
        except SystemExit as exit_:  # the launcher's own checks exit, config errors return
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "30 samples per micro-batch is not divisible by the 4 ranks" in error("data.batch_size=30")
    assert "shard 'nowhere/x.tar' (data.train) does not exist" in error("data.train=nowhere/x.tar")
    assert "needs labeled shards in 'eval.train'" in error("eval.online_knn_every=5")
    assert "no shards match 'nowhere/val-*.tar' (eval.val)" in error("eval.val=nowhere/val-*.tar")
    assert "model.small_stem applies to ResNets only" in error("model.backbone=vit_tiny", "model.small_stem=true")
    assert "is not longer than --signal-delay-s 120" in error(flags=("--time", "00:01:30"))
    assert not (tmp_path / "runs").exists()  # nothing written by any of them

    monkeypatch.chdir(tmp_path)  # relative data paths, as users type them, become absolute for the compute nodes
    code = ssltrain_main(["launch", "slurm", str(config), *four_ranks, "data.train=data/train-*.tar"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"#   train: {tmp_path}/data/train-*.tar" in printed.out.splitlines(), printed.out


def test_warmup_longer_than_the_run_warns_at_submission(tmp_path: Path) -> None:
    make_shards(tmp_path, [4])
    config = write_config(tiny(tmp_path, tmp_path, "warm"), tmp_path / "c.yaml")
    proc = subprocess.run(
        [str(SSLTRAIN), "launch", "slurm", str(config), "steps=2", "--dry-run", "optim.warmup_steps=10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "WARNING optim.warmup_steps 10 is longer than steps 2" in line


def test_launch_local_checks_the_config_before_starting_workers(tmp_path: Path) -> None:
    """A batch the ranks cannot split: one line, exit 2, in about the time Python starts (no torchrun, no workers,
    no run directory)."""
    make_shards(tmp_path, [4])
    config = write_config(tiny(tmp_path, tmp_path, "local"), tmp_path / "c.yaml")
    start = time.monotonic()
    proc = subprocess.run(
        [str(SSLTRAIN), "launch", "local", str(config), "--nproc", "2", "data.batch_size=15"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ssltrain launch local: error: data.batch_size 15") and "2 ranks" in lines[0]
    assert not (tmp_path / "runs").exists() and elapsed < 15


@pytest.mark.distributed
def test_launch_local_takes_overrides_after_options_and_rank_0_prints(shapes: Path, tmp_path: Path) -> None:
    """Two real ranks under torchrun: the override typed after --nproc names the run, and each start-up line is
    printed once (by rank 0), not once per rank."""
    config = write_config(tiny(tmp_path, shapes, "x", steps=2), tmp_path / "c.yaml")
    proc = subprocess.run(
        [str(SSLTRAIN), "launch", "local", str(config), "--nproc", "2", "name=after-options"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert committed(tmp_path / "runs" / "after-options", 2)
    assert proc.stderr.count("samples in 2 shards") == 1, proc.stderr
    assert proc.stdout.count("run directory:") == 1, proc.stdout


def test_torchrun_commands() -> None:
    one = local.torchrun_command("c.yaml", ["steps=3"], nproc=4)
    assert one[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        "--max-restarts=0",
        "--standalone",
        "-m",
        "ssltrain.cli",
        "train",
        "c.yaml",
        "steps=3",
    ]
    elastic = local.torchrun_command("c.yaml", [], nproc=8, nnodes=2, rdzv_endpoint="head:29400", rdzv_id="r")
    assert "--rdzv-backend=c10d" in elastic and "--rdzv-endpoint=head:29400" in elastic and "--nnodes=2" in elastic
    static = local.torchrun_command("c.yaml", [], nproc=8, nnodes=2, node_rank=1, master_addr="head")
    assert "--node-rank=1" in static and "--master-addr=head" in static
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        local.torchrun_command("c.yaml", [], nproc=8, nnodes=2)


def test_time_limits_parse_like_sbatch() -> None:
    assert [slurm.parse_time(t) for t in ("90", "01:30:00", "30:30", "2-0", "1-02:30", "1-00:00:01")] == [
        90,
        90,
        31,
        2880,
        1590,
        1441,
    ]
    with pytest.raises(ValueError):
        slurm.parse_time("1h")


# --- the real cluster --------------------------------------------------------------------------------------------


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted((run_dir / "slurm").glob("*_log.*")))


def wait_until(
    what: str, done: Callable[[], bool], job_id: str, run_dir: Path, timeout_s: float = 240, may_end: bool = False
) -> None:
    """Poll ``done``; fail with the job's logs if time runs out, or if the job ends first (unless ``may_end``)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        state, _ = slurm.job_state(job_id)
        if state in slurm.TERMINAL_STATES and not may_end:
            pytest.fail(f"job {job_id} ended ({state}) while waiting for {what}\n{logs(run_dir)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} (job {job_id} {state})\n{logs(run_dir)}")
        time.sleep(0.1)


def committed(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step}" / MARKER).is_file()


def task_pids(job_id: str) -> list[int]:
    """The training processes of the job's srun step (step 0), from ``scontrol listpids``."""
    out = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    pids = [int(row[0]) for row in rows if len(row) == 5 and row[2] == "0" and row[3].isdigit()]
    assert len(pids) == 2, out
    return pids


def restarted(job_id: str, count: int) -> Callable[[], bool]:
    """True once the job runs again after its ``count``-th requeue (Slurm's restart counter)."""
    return lambda: slurm.job_state(job_id) == ("RUNNING", count)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the job must fail for want of a GPU")
def test_wait_reports_a_failed_job(cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI: the job id and run directory are printed, and --wait exits 1 when training fails in the job
    (here: device=cuda on a node without a GPU, which only the job can find out)."""
    make_shards(tmp_path, [4])
    config = write_config(tiny(tmp_path, tmp_path, "fails", device="cuda"), tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as exit_:
        ssltrain_main(["launch", "slurm", str(config), "--tasks-per-node", "1", "--time", "5", "--wait"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    job_id = out.split("submitted slurm job ")[1].split()[0]
    assert f"run directory: {tmp_path / 'runs' / 'fails'}" in out and f"slurm job {job_id}: FAILED" in out
    err = (tmp_path / "runs" / "fails" / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "no CUDA device is visible" in err  # the job's error, in the job's log


def test_a_job_reads_relative_data_paths_from_another_directory(
    cluster: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data named relative to the submitting shell's directory. A job starts there only where that directory exists
    on the compute node, so the config the job gets (and saves) must hold absolute paths."""
    make_shards(tmp_path / "data", [8])
    config = write_config(tiny(tmp_path, tmp_path / "data", "relative", steps=1), tmp_path / "c.yaml")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.train=data", "eval.val=data/train-part0.tar", "data.batch_size=4"]
    assert ssltrain_main(["launch", "slurm", str(config), "--time", "5", "--wait", *overrides]) == 0
    capsys.readouterr()
    saved = load_config(tmp_path / "runs" / "relative" / "config.yaml")
    assert saved.data.train == str(tmp_path / "data") and saved.eval.val == str(tmp_path / "data/train-part0.tar")
    assert committed(tmp_path / "runs" / "relative", 1)


@pytest.mark.slow
def test_job_requeued_three_ways_ends_equal_to_an_uninterrupted_run(
    cluster: None, shapes: Path, tmp_path: Path
) -> None:
    cfg = slurm.resolve(tiny(tmp_path, shapes, "requeued"))
    run = cfg.run_dir
    job = slurm.submit(cfg, slurm.SlurmSpec(nodes=1, tasks_per_node=2, time_min=30))
    job_id = str(job.job_id)
    # The reference: the same config, uninterrupted, on 2 ranks under torchrun (`ssltrain launch local`), alongside.
    ref_cfg = write_config(tiny(tmp_path, shapes, "reference"), tmp_path / "reference.yaml")
    reference = subprocess.Popen(
        [str(SSLTRAIN), "launch", "local", str(ref_cfg), "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # (a) the pre-deadline signal: every rank checkpoints at the next step boundary, rank 0 requeues the job
        wait_until("step 5", lambda: committed(run, 5), job_id, run)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_until("the restart after USR2", restarted(job_id, 1), job_id, run)
        # (b) scontrol requeue of the running job: Slurm sends SIGTERM (KillWait before SIGKILL); training
        # checkpoints on it at the next step boundary and the job starts again
        wait_until("step 15", lambda: committed(run, 15), job_id, run)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_until("the restart after scontrol requeue", restarted(job_id, 2), job_id, run)
        # (c) a hard kill, as when a node dies: SIGKILL to every rank (not through scancel, which treats KILL as a
        # cancel and sends SIGTERM first), then a requeue of the failed job. It resumes from the last periodic
        # checkpoint and replays the steps after it.
        wait_until("step 25", lambda: committed(run, 25), job_id, run)
        time.sleep(1.0)  # a step or two past the checkpoint
        for pid in task_pids(job_id):
            os.kill(pid, signal.SIGKILL)
        wait_until(
            "the killed job to end",
            lambda: slurm.job_state(job_id)[0] in slurm.TERMINAL_STATES,
            job_id,
            run,
            may_end=True,
        )
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        assert slurm.wait(job_id, poll_s=0.5, timeout_s=240) == "COMPLETED", logs(run)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
        try:
            out, _ = reference.communicate(timeout=240)
        finally:
            reference.kill()
    assert reference.returncode == 0, out

    state, restarts = slurm.job_state(job_id)
    assert (state, restarts) == ("COMPLETED", 3)
    rank0 = next((run / "slurm").glob(f"{job_id}_0_log.err")).read_text()
    assert "stopped at step" in rank0 and "on SIGUSR2" in rank0, logs(run)
    assert "on SIGTERM" in rank0, logs(run)
    resumed = [
        int(line.split("checkpoints/step-")[1].split()[0]) for line in rank0.splitlines() if "resumed from" in line
    ]
    assert len(resumed) == 3, logs(run)
    assert resumed[-1] % 5 == 0  # (c) came back from a periodic checkpoint...
    assert "stopped at step" not in rank0.split("restart 2:")[1].split("resumed from")[1]  # ...not a signal's
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(5, 36, 5))
    assert all(result["finished"] for result in job.results())  # submitit's view: every task returned, done

    parts = ("model", "optim")
    got, want = load_checkpoint(run, parts), load_checkpoint(tmp_path / "runs" / "reference", parts)
    assert got["step"] == want["step"] == 35
    assert got["model"].keys() == want["model"].keys()
    differ = [key for key in want["model"] if not torch.equal(got["model"][key], want["model"][key])]
    assert not differ, f"model state differs after the requeues: {differ}"
    for name in want["optim"]:
        for k in want["optim"][name]:
            assert torch.equal(torch.as_tensor(got["optim"][name][k]), torch.as_tensor(want["optim"][name][k]))


def _pids_with(environ: dict[str, str]) -> list[int]:
    """Processes whose environment holds every item of ``environ`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            except OSError:
                continue
            if all(env.get(k) == v for k, v in environ.items()):
                found.append(int(entry.name))
    return found


@pytest.mark.distributed
def test_a_stopped_rank_is_named_when_training_times_out(shapes: Path, tmp_path: Path) -> None:
    """Two ranks under torchrun; rank 1 is stopped (SIGSTOP) mid-run. Rank 0 gives up after dist.timeout_s and says
    which rank did not answer and which setting decides how long it waits, not only gloo's text."""
    config = write_config(tiny(tmp_path, shapes, "hung", steps=1000, log_every=1), tmp_path / "c.yaml")
    tag = {"SSLTRAIN_TEST_TAG": str(tmp_path)}
    proc = subprocess.Popen(
        [str(SSLTRAIN), "launch", "local", str(config), "--nproc", "2", "dist.timeout_s=5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **tag},
    )
    stopped: list[int] = []
    out = ""
    try:
        metrics = tmp_path / "runs" / "hung" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        stopped = _pids_with({**tag, "RANK": "1"})
        assert len(stopped) == 1
        os.kill(stopped[0], signal.SIGSTOP)
        for line in proc.stdout or []:
            out += line
            if "ssltrain train: error:" in line:
                break
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # torchrun may have ended the stopped rank already
                os.kill(pid, signal.SIGCONT)
        out += proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    error = next(line for line in out.splitlines() if "ssltrain train: error:" in line)
    assert "rank 0: a collective waited dist.timeout_s=5s" in error and "rank 1 did not answer" in error, out
