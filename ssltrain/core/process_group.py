"""The process group, set up from torchrun's or Slurm's environment variables (training and evaluation both join
one), and the explanation of a collective that timed out; the collectives themselves are in
:mod:`ssltrain.core.collectives`.

torch is imported inside the functions that need it: the CLI reads the rank (``read_env``) to set up logging before
it knows whether the command needs torch at all.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ssltrain")

# The store the process group was set up with: after a collective times out, the ranks still reachable check in
# there, which names the ones that did not answer (gloo's own error names neither the rank nor the setting).
_STORE: Any = None


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


def read_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as :func:`read_env` would say, without asking ``scontrol`` for the master's address."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    return 0


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
    import torch
    import torch.distributed as dist

    from ssltrain.core.collectives import is_distributed

    global _STORE
    env = read_env()
    if env.world_size == 1 or is_distributed():
        return env
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = backend_for(device)
    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT (env:// reuses it); under Slurm, rank 0
    # opens one there. The rendezvous is what init_process_group would do with init_method; done here, the store
    # stays at hand for explain_timeouts.
    init_method = "env://" if env.source == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous(init_method, env.rank, env.world_size, timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=torch.device("cuda", env.local_rank) if device.type == "cuda" else None,
    )
    _STORE = dist.PrefixStore(f"ssltrain/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    log.info("%d ranks (%s, %s, master %s:%d)", env.world_size, env.source, backend, env.master_addr, env.master_port)
    return env


def shutdown() -> None:
    import torch.distributed as dist

    from ssltrain.core.collectives import is_distributed

    global _STORE
    if is_distributed():
        dist.destroy_process_group()
    _STORE = None


class CollectiveTimeout(RuntimeError):
    """A collective waited ``dist.timeout_s`` for a rank that did not come; the message names it and the setting."""


# gloo's text for a send/recv that waited too long, NCCL's watchdog's, and the store-based barrier's at start-up.
_TIMEOUT = re.compile(
    r"Timed out waiting \d+ms|collective operation timeout|Timed out initializing process group", re.IGNORECASE
)


def _check_in(rank: int, world_size: int, grace_s: float) -> list[int] | None:
    """Ranks that did not check in at the store within ``grace_s`` after this one did; None if the store is gone
    (its host, rank 0 under Slurm or torchrun's agent, ended)."""
    if _STORE is None:
        return None
    try:
        _STORE.set(f"timed-out/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            missing = [r for r in range(world_size) if not _STORE.check([f"timed-out/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # the store's own errors are RuntimeErrors of any text: the ranks cannot be asked
        return None


def timeout_message(err: BaseException, timeout_s: float, grace_s: float | None = None) -> str | None:
    """What to tell the user about ``err`` when it is a collective's timeout (None otherwise): which ranks did not
    answer, and that ``dist.timeout_s`` decides how long a rank waits. Collective: the ranks still alive check in."""
    import torch.distributed as dist

    if isinstance(err, CollectiveTimeout) or not isinstance(err, RuntimeError) or not _TIMEOUT.search(str(err)):
        return None
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    detail = re.sub(r"^\[[^\]]*\] ", "", detail)  # gloo's "[/path/to/source.cc:78] " prefix
    if not (dist.is_available() and dist.is_initialized()):
        return (
            f"the ranks did not all join the process group within dist.timeout_s={timeout_s:g}s ({detail}); check "
            "that every rank started (its log), or raise dist.timeout_s"
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    missing = _check_in(rank, world_size, min(timeout_s, 10.0) if grace_s is None else grace_s)
    if missing is None:
        who = "the other ranks could not be asked which one is missing (the job's store is gone: rank 0 ended?)"
    elif missing:
        several = len(missing) > 1
        names = ", ".join(str(r) for r in missing)
        whose = "their" if several else "its"
        who = f"rank{'s' * several} {names} did not answer (stopped, hung or dead: see {whose} log)"
    else:
        who = "every rank answered, so they waited in different collectives (a rank skipped one)"
    return (
        f"rank {rank}: a collective waited dist.timeout_s={timeout_s:g}s and gave up: {who}. dist.timeout_s decides "
        f"how long ranks wait for each other; raise it if a rank can legitimately be away that long (a slow "
        f"checkpoint or evaluation). ({detail})"
    )


@contextlib.contextmanager
def explain_timeouts(timeout_s: float) -> Iterator[None]:
    """Re-raise a collective's timeout as :class:`CollectiveTimeout` naming the ranks that did not answer."""
    try:
        yield
    except RuntimeError as err:
        message = timeout_message(err, timeout_s)
        if message is None:
            raise
        raise CollectiveTimeout(message) from err
