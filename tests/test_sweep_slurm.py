"""A sweep as one Slurm job array, on the real one-node Slurm of tests/slurm/start_cluster.sh, never a mock.

The two points differ only in ``eval.knn_k``, which only the offline probe reads, so they train alike: one
uninterrupted local run of the point is the reference for both. One task is requeued with ``scontrol requeue``
(SIGTERM, as a preemption), the other gets the pre-deadline USR2 (submitit requeues it); both must end done, their
losses and final parameters equal to the uninterrupted run's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import submitit
from conftest import assert_same_params, final_params, tiny_config

from ssltrain.cli import main as ssltrain_main
from ssltrain.config import ConfigError, to_yaml
from ssltrain.core.checkpoint_layout import MARKER
from ssltrain.eval.metrics_log import read_metrics
from ssltrain.launch import slurm
from ssltrain.launch.sweep.layout import SweepDir
from ssltrain.launch.sweep.local import start_point
from ssltrain.launch.sweep.slurm import PointTask, log_folder, slurm_spec_from_args, submit_array, wait_array
from ssltrain.launch.sweep.space import Point, build_spec

SSLTRAIN = Path(sys.executable).parent / "ssltrain"  # the installed command, as the README runs it


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    args = ["shards", "shapes", "--out", str(out), "--train", "256", "--val", "64", "--shard-size", "128"]
    assert ssltrain_main([*args, "--size", "16"]) == 0
    return out


def write_base(tmp_path: Path, shapes: Path) -> Path:
    """ResNet-18 at 16 px, batch 8, 30 steps with a checkpoint every 5: about 15 s a point on one core."""
    cfg = tiny_config(
        tmp_path,
        f"{shapes}/train-*.tar",
        steps=30,
        threads=1,
        log_every=5,
        **{
            "data.workers": 1,
            "checkpoint.every": 5,
            "checkpoint.keep": 10,
            "eval.train": f"{shapes}/train-*.tar",
            "eval.val": f"{shapes}/val-*.tar",
            "eval.linear_epochs": 5,
            "log.tensorboard": False,
        },
    )
    path = tmp_path / "base.yaml"
    path.write_text(to_yaml(cfg))
    return path


def committed(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step}" / MARKER).is_file()


def logs(sweep: SweepDir) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_folder(sweep).glob("*_log.*")))


def wait_until(what: str, done: Callable[[], bool], job_id: str, sweep: SweepDir, timeout_s: float = 180) -> None:
    """Poll ``done``; fail with the tasks' logs if the task ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not done():
        state, _ = slurm.job_state(job_id)
        if state in slurm.TERMINAL_STATES:
            pytest.fail(f"task {job_id} ended ({state}) while waiting for {what}\n{logs(sweep)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} (task {job_id} {state})\n{logs(sweep)}")
        time.sleep(0.1)


def requeued_and_waiting(job_id: str) -> bool:
    state, restarts = slurm.job_state(job_id)
    if restarts == 1 and state in ("RUNNING", "COMPLETED"):
        pytest.fail(f"task {job_id} ran again before its requeued state could be read ({state})")
    return restarts == 1 and state not in ("COMPLETING",)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "eval" not in r]


def test_flags_a_point_cannot_use_fail_before_submitting() -> None:
    from ssltrain.cli import build_parser

    def spec(*flags: str) -> slurm.SlurmSpec:
        return slurm_spec_from_args(build_parser("sweep").parse_args(["sweep", "c.yaml", "lr=1,2", "--slurm", *flags]))

    got = spec("--time", "00:10:00", "--max-requeues", "3", "--constraint", "h100", "--gpus-per-node", "1")
    assert (got.world_size, got.time_min, got.max_requeues, got.constraint, got.gpus_per_node) == (1, 10, 3, "h100", 1)
    with pytest.raises(ConfigError, match="one process on one GPU"):
        spec("--gpus-per-node", "4")
    with pytest.raises(ConfigError, match="not longer than --signal-delay-s"):
        spec("--time", "00:01:00")
    with pytest.raises(ConfigError, match="--array-parallelism must be at least 1"):
        spec("--array-parallelism", "0")


@pytest.mark.slow
def test_a_sweep_runs_as_one_array_whose_tasks_resume_after_requeues(
    cluster: None, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_base(tmp_path, shapes)
    (tmp_path / "data").symlink_to(shapes)
    monkeypatch.chdir(tmp_path)  # the base config and the data named relative to the submitting shell's directory
    # The command as users type it, waiting for the array through the requeues and writing the report at the end.
    args = ["eval.knn_k=5,10", "data.train=data/train-*.tar", "--name", "arr", "--slurm", "--wait"]
    command = [str(SSLTRAIN), "sweep", "base.yaml", *args, "--array-parallelism", "2", "--time", "10"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sweeping = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert sweeping.stdout is not None
    out, ids = "", list[str]()
    while len(ids) < 2 and (line := sweeping.stdout.readline()):
        out += line
        if line.startswith("submitted slurm job "):
            ids.append(line.split()[-1])
    sweep = SweepDir(tmp_path / "runs" / "arr")
    try:
        assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1, out  # one array, a task a point
        jobs: list[submitit.Job] = [submitit.SlurmJob(folder=log_folder(sweep), job_id=i) for i in ids]
        preempted, timed = ids
        tasks = [job.submission().function for job in jobs]
        name = {i: task.name for i, task in zip(ids, tasks) if isinstance(task, PointTask)}
        assert sorted(name.values()) == sorted(s.name for s in sweep.states())

        # The reference: the same point, uninterrupted, run here as the local runner runs it, in a sweep of its own.
        ref = SweepDir(tmp_path / "ref")
        ref.create(sweep.spec())
        state = sweep.state(name[preempted])
        assert state is not None
        ref.add_point(Point(state.name, state.values, tuple(state.overrides)))
        reference = start_point(ref, state.name)

        # a preemption: scontrol requeue sends SIGTERM; training checkpoints at the next step, Slurm requeues
        wait_until("step 10", lambda: committed(sweep.point_dir(name[preempted]), 10), preempted, sweep)
        subprocess.run(["scontrol", "requeue", preempted], check=True)
        # the time limit's USR2: training checkpoints, then submitit requeues the task and exits
        wait_until("step 10", lambda: committed(sweep.point_dir(name[timed]), 10), timed, sweep)
        subprocess.run(["scancel", "--signal=USR2", timed], check=True)
        # between the requeue and the restart (AuthInfo=cred_expire=10 keeps it pending for ~10 s), the point is
        # recorded as running, to be resumed, not as failed by submitit's exit
        wait_until("the USR2 requeue", lambda: requeued_and_waiting(timed), timed, sweep)
        requeued = sweep.state(name[timed])
        assert requeued is not None and (requeued.status, requeued.error) == ("running", ""), requeued  # not failed
        out += sweeping.communicate(timeout=180)[0]
        assert reference.wait(timeout=120) == 0, ref.log_path(state.name).read_text()[-3000:]
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)
        sweeping.kill()
    assert sweeping.returncode == 0, f"{out}\n{logs(sweep)}"
    assert wait_array(jobs) == {preempted: "COMPLETED", timed: "COMPLETED"}
    assert f"report: {sweep.root / 'report.md'}" in out and "2 points (2 done)" in out, out

    for job_id, signal_name in ((preempted, "SIGTERM"), (timed, "SIGUSR2")):
        point = sweep.state(name[job_id])
        assert point is not None and point.status == "done" and point.attempts == 2, point
        assert slurm.job_state(job_id) == ("COMPLETED", 1)
        err = (log_folder(sweep) / f"{job_id}_0_log.err").read_text()
        assert f"on {signal_name}" in err and "resumed from" in err, logs(sweep)
        run_dir = sweep.point_dir(name[job_id])
        assert (run_dir / "eval.json").is_file()
        assert losses(run_dir) == losses(ref.point_dir(state.name)) and len(losses(run_dir)) == 6
        assert_same_params(final_params(run_dir), final_params(ref.point_dir(state.name)))
    assert all(job.result()["status"] == "done" for job in jobs)  # submitit's view of each task


def new_sweep(tmp_path: Path, shapes: Path, name: str) -> tuple[SweepDir, list[str]]:
    """A 2-point sweep recorded as ``ssltrain sweep`` records it (spec and pending points), nothing run."""
    spec = build_spec(str(write_base(tmp_path, shapes)), ["eval.knn_k=5,10"], name)
    sweep = SweepDir(tmp_path / "runs" / name)
    sweep.create(spec)
    for point in spec.points():
        sweep.add_point(point)
    return sweep, [p.name for p in spec.points()]


def test_a_point_another_process_runs_fails_its_task_once(cluster: None, shapes: Path, tmp_path: Path) -> None:
    """The point's lock is held here (as by a local runner): the task reports it and ends, not requeued."""
    sweep, names = new_sweep(tmp_path, shapes, "busy")
    with sweep.claim(names[0]) as mine:
        assert mine
        jobs = submit_array(sweep, names[:1], slurm.SlurmSpec(time_min=10), 2)
        states = wait_array(jobs, poll_s=0.5, timeout_s=120)
    job_id = str(jobs[0].job_id)
    assert states == {job_id: "FAILED"} and slurm.job_state(job_id) == ("FAILED", 0)
    assert "is being run by another process" in (log_folder(sweep) / f"{job_id}_0_log.err").read_text()
    state = sweep.state(names[0])
    assert state is not None and (state.status, state.attempts) == ("pending", 0)  # left to the lock's holder


def test_an_array_sbatch_refuses_fails_in_one_line(cluster: None, shapes: Path, tmp_path: Path) -> None:
    sweep, names = new_sweep(tmp_path, shapes, "refused")
    with pytest.raises(ConfigError, match="sbatch refused the sweep's job array: .*Invalid partition") as err:
        submit_array(sweep, names, slurm.SlurmSpec(time_min=10, partition="nowhere"), 2)
    assert "\n" not in str(err.value)


def test_a_finished_sweep_submits_nothing(tmp_path: Path, shapes: Path) -> None:
    """Points already done are not submitted again (and no Slurm is needed to find that out)."""
    sweep, names = new_sweep(tmp_path, shapes, "done")
    for name in names:
        state = sweep.state(name)
        assert state is not None
        state.status = "done"
        sweep.write_state(state)
    assert submit_array(sweep, names, slurm.SlurmSpec(time_min=10), 2) == []
