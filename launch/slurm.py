"""Slurm launcher: one submitit job per run, one task per GPU, requeued on timeout and preemption.

Why it is this small: everything a restarted job needs is on disk. ``ssltrain.engine.loop.train`` resumes from the run's
latest complete checkpoint, and on the pre-deadline signal (``--signal=USR2@<delay>``) it checkpoints at the next step
boundary on every rank and then hands the signal to submitit's handler, which on rank 0 calls
:meth:`TrainJob.checkpoint`, runs ``scontrol requeue`` and exits. Preemption (``scontrol requeue``: SIGTERM to every
process) checkpoints at the next step boundary the same way, and Slurm requeues the job. So the job object carries
only the resolved config; only a job killed outright (a node failure) restarts from the last periodic checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from ssltrain.config import Config, from_yaml_text, to_yaml

log = logging.getLogger("ssltrain")

# Slurm job states after which the job will not run again (squeue/scontrol spell them like this).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)


@dataclasses.dataclass(frozen=True)
class SlurmSpec:
    """What to ask Slurm for. ``tasks_per_node`` defaults to one task per GPU (one rank each), or 1 without GPUs."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    time_min: int = 24 * 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: room for one step plus a checkpoint write
    max_requeues: int = 10  # timeouts after which submitit stops requeueing (preemptions do not count)

    def __post_init__(self) -> None:
        if self.time_min * 60 <= self.signal_delay_s:
            raise ValueError(
                f"--time {self.time_min} min is not longer than --signal-delay-s {self.signal_delay_s}: Slurm would "
                "signal the job as it starts, and it would requeue itself without training; give a longer --time or "
                "a shorter --signal-delay-s"
            )
        if min(self.nodes, self.ntasks_per_node) < 1:
            raise ValueError(f"--nodes and --tasks-per-node must be positive, got {self.nodes}, {self.ntasks_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return max(self.gpus_per_node, 1)


def spec_from_flags(args: Any, nodes: int, tasks_per_node: int | None) -> SlurmSpec:
    """A :class:`SlurmSpec` from the Slurm flags ``launch slurm`` and ``sweep --slurm`` share; ValueError names a
    ``--time`` sbatch would not take, or one the signal delay does not fit in."""
    return SlurmSpec(
        nodes=nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        partition=args.partition,
        time_min=parse_time(args.time),
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        signal_delay_s=args.signal_delay_s,
        max_requeues=args.max_requeues,
    )


def parse_time(value: str | int) -> int:
    """Minutes (rounded up) from any sbatch ``--time`` form: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S``; submitit needs a number of minutes, and people paste what they use in sbatch scripts."""
    text = str(value).strip()
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text):
        raise ValueError(f"time {text!r}: use minutes (90) or [D-]HH:MM:SS (01:30:00)")
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        parts += [0] * (3 - len(parts))
        seconds = ((int(days) * 24 + parts[0]) * 60 + parts[1]) * 60 + parts[2]
    else:  # M, M:S, H:M:S
        seconds = (
            parts[0] * 60
            if len(parts) == 1
            else (parts[0] * 60 + parts[1] if len(parts) == 2 else (parts[0] * 60 + parts[1]) * 60 + parts[2])
        )
    if seconds <= 0:
        raise ValueError(f"time {text!r} must be positive")
    return -(-seconds // 60)


def absolute_spec(spec: str) -> str:
    """A shard spec (paths, globs, brace ranges, comma-separated) with every relative part made absolute against
    this directory; patterns are kept as patterns."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    return ",".join(
        p if "://" in p else os.path.normpath(os.path.join(os.getcwd(), os.path.expanduser(p))) for p in parts
    )


def resolve(cfg: Config) -> Config:
    """A copy with an absolute ``out_dir`` and absolute data paths: the job's working directory on the compute node
    may differ from the login shell's."""
    data = dataclasses.replace(cfg.data, train=absolute_spec(cfg.data.train))
    evals = dataclasses.replace(cfg.eval, train=absolute_spec(cfg.eval.train), val=absolute_spec(cfg.eval.val))
    return dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).expanduser().resolve()), data=data, eval=evals)


def log_folder(cfg: Config) -> Path:
    """Where submitit keeps the job's pickles and logs: ``<run_dir>/slurm/<jobid>_<task>_log.{out,err}``."""
    return cfg.run_dir / "slurm"


def slurm_parameters(cfg: Config, spec: SlurmSpec) -> dict[str, Any]:
    """``SlurmExecutor`` parameters (sbatch flags). ``--requeue`` is explicit: clusters may default to JobRequeue=0."""
    params: dict[str, Any] = {
        "job_name": cfg.name,
        "nodes": spec.nodes,
        "ntasks_per_node": spec.ntasks_per_node,
        "time": spec.time_min,
        "signal_delay_s": spec.signal_delay_s,
        "additional_parameters": {"requeue": True},
        # One rank dying must end the step: the others would wait in a collective until the time limit.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    optional = {
        "gpus_per_node": spec.gpus_per_node or None,
        "cpus_per_task": spec.cpus_per_task,
        "partition": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "constraint": spec.constraint,
        "mem": None if spec.mem_gb is None else _mem(spec.mem_gb),
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def sbatch_script(cfg: Config, spec: SlurmSpec) -> str:
    """The sbatch script :func:`submit` would hand to Slurm, rendered by submitit itself (for ``--dry-run``).

    Built without a ``SlurmExecutor`` so that it works on a machine without Slurm.
    """
    cfg = resolve(cfg)
    folder = log_folder(cfg)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg, spec))


class TrainJob(submitit.helpers.Checkpointable):
    """The job every task runs: set the torch.distributed variables from Slurm's, then train (resuming if possible).

    It carries the resolved config as YAML, not as a pickled ``Config``: a job requeued days later unpickles it with
    the code installed then, and a pickled dataclass would lack any field added since (YAML gets its default).
    """

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def __call__(self) -> dict[str, Any]:
        from ssltrain.core.logs import setup_logging
        from ssltrain.core.process_group import explain_timeouts
        from ssltrain.engine.loop import train  # imported in the job, not at submission: keeps the login side light

        cfg = from_yaml_text(self.config_yaml, "the submitted config")
        env = submitit.JobEnvironment()
        # A requeued job keeps its id, so a result file left by the killed run would make submitit's Job.done()
        # report this one finished while it still trains.
        env.paths.result_pickle.unlink(missing_ok=True)
        # overwrite: Slurm copies the submitting shell's environment, which may hold another job's MASTER_PORT.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        setup_logging(dist_env.rank)
        log.info(
            "slurm job %s restart %s: rank %d of %d (local %d) on %s, master %s:%d",
            env.job_id,
            os.environ.get("SLURM_RESTART_COUNT", "0"),
            dist_env.rank,
            dist_env.world_size,
            dist_env.local_rank,
            env.hostname,
            dist_env.master_addr,
            dist_env.master_port,
        )
        with explain_timeouts(cfg.dist.timeout_s):
            run_dir = train(cfg)
        step = latest_step(run_dir)
        if step < cfg.steps:
            log.warning(
                "training stopped at step %d of %d (signal); the next start of this job resumes there", step, cfg.steps
            )
        return {"run_dir": str(run_dir), "step": step, "steps": cfg.steps, "finished": step >= cfg.steps}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues: the state is on disk, so resubmit the same job."""
        return submitit.helpers.DelayedSubmission(type(self)(self.config_yaml))


def latest_step(run_dir: Path) -> int:
    """Step of the latest committed checkpoint (0 if none), read without side effects (and without torch)."""
    from ssltrain.core.checkpoint_layout import latest_checkpoint

    latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    return int(latest.name.split("-")[1]) if latest is not None else 0


def make_executor(cfg: Config, spec: SlurmSpec) -> submitit.SlurmExecutor:
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise RuntimeError("sbatch/srun not found: run this on a Slurm login node (or use --dry-run)")
    executor = submitit.SlurmExecutor(folder=log_folder(cfg), max_num_timeout=spec.max_requeues)
    executor.update_parameters(**slurm_parameters(cfg, spec))
    return executor


def submit(cfg: Config, spec: SlurmSpec) -> submitit.Job:
    """Submit one training job; returns submitit's handle (``job.job_id``, ``job.paths``)."""
    cfg = resolve(cfg)
    log_folder(cfg).mkdir(parents=True, exist_ok=True)
    return make_executor(cfg, spec).submit(TrainJob(to_yaml(cfg)))


def job_state(job_id: str) -> tuple[str, int]:
    """(state, restart count) from ``scontrol`` (no accounting needed), else ``sacct``; ("UNKNOWN", 0) if neither knows.

    submitit's own ``Job.done()`` asks ``sacct``, which fails on clusters without accounting, and takes a result
    file as done, so waiting goes through Slurm's controller instead.
    """
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if out.returncode == 0 and (state := re.search(r"\bJobState=(\S+)", out.stdout)):
        restarts = re.search(r"\bRestarts=(\d+)", out.stdout)
        return state.group(1), int(restarts.group(1)) if restarts else 0
    out = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    lines = out.stdout.split() if out.returncode == 0 else []
    return (lines[-1].split()[0] if lines else "UNKNOWN"), 0


def wait(job_id: str, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Block until the job is in a terminal state (through requeues) and return it, e.g. ``COMPLETED``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state, _ = job_state(job_id)
        if state in TERMINAL_STATES:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"slurm job {job_id} still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
