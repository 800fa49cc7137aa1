"""The process group, set up from torchrun's or Slurm's environment variables (training and evaluation both join
one); the collectives themselves are in :mod:`ssltrain.core.collectives`."""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssltrain.core.collectives import is_distributed

log = logging.getLogger("ssltrain")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # torchrun | slurm | single


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('node[01-04],gpu7' -> 'node01'): scontrol when present, else parsed."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun's variables win; else a Slurm task (srun/submitit without torchrun); else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            "slurm",
        )
    return DistEnv()


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors plus gloo for CPU ones on GPUs, gloo alone on CPUs.

    The host-side collectives (``agree``: stop, skip and reload decisions; the skipped-sample counts) use CPU tensors
    on every rank: through gloo they neither fail (NCCL refuses CPU tensors) nor wait for the GPU's queue to drain.
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistEnv:
    """Join the job's process group (NCCL and gloo on GPU, gloo on CPU; see ``backend_for``); a no-op for one process.

    ``timeout_s`` bounds every collective: a rank that died makes the others fail with an error after at most
    that long instead of hanging the job until its wall-clock limit.
    """
    env = read_env()
    if env.world_size == 1 or is_distributed():
        return env
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = backend_for(device)
    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT (env:// reuses it); under Slurm, rank 0
    # opens one there.
    init_method = "env://" if env.source == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=torch.device("cuda", env.local_rank) if device.type == "cuda" else None,
    )
    log.info(
        "rank %d of %d (%s, %s, master %s:%d)",
        env.rank,
        env.world_size,
        env.source,
        backend,
        env.master_addr,
        env.master_port,
    )
    return env


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
