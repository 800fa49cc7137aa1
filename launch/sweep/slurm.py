"""A sweep on Slurm: one submitit job array, one task a point, each task preemptible and requeued like a single run.

A task only calls :func:`~ssltrain.launch.sweep.point.run_point`, so it gets the single run's guarantees from
the same places: the engine checkpoints at the next step boundary on the pre-deadline USR2 or a preemption's
SIGTERM, submitit (or Slurm) requeues the task, and the requeued task resumes the point from that checkpoint. A
point already done returns at once; a point another process is running (``PointBusy``) fails its task with that
message instead of being retried. The sbatch flags, the check (in the login shell) of the paths as a compute node
will read them, made absolute by ``resolve``, and the waiting through requeues come from :mod:`ssltrain.launch.slurm`,
shared with ``ssltrain launch slurm``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import submitit

from ssltrain.config import Config, ConfigError
from ssltrain.launch import slurm
from ssltrain.launch.sweep.layout import SweepDir

log = logging.getLogger("ssltrain")

__all__ = ["PointTask", "slurm_spec_from_args", "submit_array", "wait_array", "log_folder"]


def slurm_spec_from_args(args: argparse.Namespace) -> slurm.SlurmSpec:
    """The ``ssltrain sweep --slurm`` flags as a :class:`SlurmSpec` of one task (one process) a point: a point
    trains in a single process, so it asks for at most one GPU."""
    if args.gpus_per_node > 1:
        raise ConfigError(
            f"--gpus-per-node {args.gpus_per_node}: a sweep point trains in one process on one GPU; give 0 or 1 "
            "(several points run at once with --array-parallelism)"
        )
    if args.array_parallelism < 1:
        raise ConfigError(f"--array-parallelism must be at least 1, got {args.array_parallelism}")
    try:
        return slurm.spec_from_flags(args, nodes=1, tasks_per_node=1)
    except ValueError as err:  # a --time sbatch would not take, or one the signal delay does not fit in
        raise ConfigError(str(err)) from None


def log_folder(sweep: SweepDir) -> Path:
    """submitit's pickles and the tasks' logs: ``runs/<sweep>/slurm/<arrayid>_<task>_0_log.{out,err}``."""
    return sweep.root / "slurm"


@contextmanager
def _also_to(path: Path) -> Iterator[None]:
    """Copy this process's log records to the point's ``sweep.log`` (where the local runner writes them too)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


class PointTask(submitit.helpers.Checkpointable):
    """What one array task runs: the point ``name`` of the sweep at ``sweep_root`` (absolute), from ``workdir``.

    ``workdir`` is the directory the sweep was submitted from: the sweep keeps its base config and data paths as
    typed there, so the task reads them from there whatever directory Slurm starts it in.
    """

    def __init__(self, sweep_root: str, name: str, workdir: str) -> None:
        self.sweep_root = sweep_root
        self.name = name
        self.workdir = workdir

    def __call__(self) -> dict[str, Any]:
        # imported in the task, not at submission: keeps the login side light
        from ssltrain.core.logs import setup_logging
        from ssltrain.launch.sweep.point import PointBusy, run_point

        env = submitit.JobEnvironment()
        # A requeued task keeps its id, so a result file left by the killed run would make submitit's Job.done()
        # report this one finished while it still trains.
        env.paths.result_pickle.unlink(missing_ok=True)
        # One process a point; overwrite: Slurm copies the submitting shell's environment (a torchrun's RANK...).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        setup_logging(0)
        if not Path(self.workdir).is_dir():
            raise FileNotFoundError(
                f"the sweep was submitted from '{self.workdir}', which this node ({env.hostname}) does not have; "
                "its relative paths (base config, data) cannot be read here: submit from a directory on a shared "
                "filesystem"
            )
        os.chdir(self.workdir)
        sweep = SweepDir(Path(self.sweep_root))
        with _also_to(sweep.log_path(self.name)):
            log.info(
                "slurm task %s restart %s on %s: point %s",
                env.job_id,
                os.environ.get("SLURM_RESTART_COUNT", "0"),
                env.hostname,
                self.name,
            )
            try:  # a requeue (USR2) ends in submitit's SystemExit; run_point records the point as running
                status = run_point(sweep.root, self.name)
            except PointBusy as err:
                log.error("%s; this task leaves it to that process", err)
                raise
            except Exception:
                log.exception("point %s failed", self.name)
                raise
        step = slurm.latest_step(sweep.point_dir(self.name))
        return {"point": self.name, "status": status, "step": step}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before it requeues the task: the point's state is on disk, so resubmit the same task."""
        return submitit.helpers.DelayedSubmission(type(self)(self.sweep_root, self.name, self.workdir))


def _check_points(sweep: SweepDir, names: Sequence[str]) -> list[Config]:
    """Each point's config as the compute node will read it (out_dir and data made absolute, as ``launch slurm``
    does), checked for a single process, its data and its run directory, in the login shell: a missing shard fails
    here, not in every task after its wait in the queue. Warnings shared by the points are printed once."""
    from ssltrain.launch.preflight import preflight

    seen: set[str] = set()
    configs = []
    for name in names:
        state = sweep.state(name)
        if state is None:
            raise ConfigError(f"no point '{name}' in sweep '{sweep.root}' (no {sweep.point_dir(name)}/point.json)")
        configs.append(slurm.resolve(sweep.config(state)))
        for warning in preflight(configs[-1], 1):
            if warning not in seen:
                seen.add(warning)
                log.warning(warning)
    return configs


def _executor(sweep: SweepDir, cfg: Config, spec: slurm.SlurmSpec, array_parallelism: int) -> submitit.SlurmExecutor:
    """``launch slurm``'s sbatch flags (``--requeue``, ``--signal=USR2@delay``, ...), named after the sweep, logs in
    the sweep's ``slurm/`` folder, at most ``array_parallelism`` tasks at once."""
    from shutil import which

    if which("sbatch") is None or which("srun") is None:
        raise ConfigError("sbatch/srun not found: run a --slurm sweep on a Slurm login node (or use --local)")
    params = {**slurm.slurm_parameters(cfg, spec), "job_name": sweep.root.name}
    executor = submitit.SlurmExecutor(folder=log_folder(sweep), max_num_timeout=spec.max_requeues)
    executor.update_parameters(**params, array_parallelism=array_parallelism)
    return executor


def submit_array(
    sweep: SweepDir, names: Sequence[str], spec: slurm.SlurmSpec, array_parallelism: int
) -> list[submitit.Job]:
    """Submit the points ``names`` not done yet as one job array (one task a point, in that order); returns the
    tasks' handles (``job.job_id`` is ``<array>_<task>``), none when every point is done."""
    if spec.world_size != 1:
        raise ConfigError(f"a sweep point trains in one process; this Slurm spec has {spec.world_size} tasks")
    sweep = SweepDir(sweep.root.expanduser().resolve())  # the tasks may start in another directory
    todo = [n for n in names if (s := sweep.state(n)) is None or s.status != "done"]
    if not todo:
        return []
    configs = _check_points(sweep, todo)
    executor = _executor(sweep, configs[0], spec, array_parallelism)
    log_folder(sweep).mkdir(parents=True, exist_ok=True)
    workdir = os.getcwd()
    try:
        with executor.batch():
            jobs = [executor.submit(PointTask(str(sweep.root), name, workdir)) for name in todo]
    except RuntimeError as err:  # sbatch refused the array (submitit's FailedJobError): its message, one line
        raise ConfigError(f"sbatch refused the sweep's job array: {str(err).strip().splitlines()[-1]}") from None
    for name, job in zip(todo, jobs):
        log.info("point %s: slurm task %s (log: %s)", name, job.job_id, _log(job))
    return jobs


def _log(job: submitit.Job) -> Path:
    """The task's stderr (its one process is submitit's task 0)."""
    return Path(str(job.paths.stderr).replace("%t", "0"))


def wait_array(jobs: Sequence[submitit.Job], poll_s: float = 2.0, timeout_s: float | None = None) -> dict[str, str]:
    """Block until every task has ended, through its requeues; returns each task's final Slurm state by id (e.g.
    ``COMPLETED``), and logs the tasks that did not complete with their logs."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    states: dict[str, str] = {}
    for job in jobs:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        states[str(job.job_id)] = slurm.wait(str(job.job_id), poll_s=poll_s, timeout_s=left)
    for job in jobs:
        if states[str(job.job_id)] != "COMPLETED":
            log.error("slurm task %s: %s (log: %s)", job.job_id, states[str(job.job_id)], _log(job))
    return states
