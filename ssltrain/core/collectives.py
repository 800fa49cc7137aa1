"""Collectives that keep autograd right, so a loss over the global batch has the single-process gradient.

The convention, which is what DDP optimises: every rank computes a loss ``L_r`` and calls ``backward``; DDP then
averages replicated parameters' gradients, so training follows the gradient of ``mean_r L_r``. For that to equal
the single-process gradient on the concatenated batch, a collective's backward must *sum* the incoming gradients
of all ranks (the official VICReg ``FullGatherLayer`` does this). ``torch.distributed.all_gather`` alone returns
tensors without a graph, which silently drops every other rank's contribution: the tests in
``tests/test_distributed_losses.py`` catch exactly that.

Parameters sharded over ranks (DIET's N-way head) are not averaged by DDP; :func:`scale_grad` divides their
gradient by the world size so that they, too, follow ``mean_r L_r``.

Every function is the identity (and costs nothing) when no process group is initialised.

The second half sets the process group up from torchrun's or Slurm's environment variables.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("ssltrain")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's row count: batches can differ by the corrupt samples a rank skipped."""
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


def _all_gather_rows(x: Tensor, counts: list[int]) -> Tensor:
    """Concatenate ranks' tensors whose first dimension differs: pad to the largest, gather, trim."""
    most = max(counts)
    padded = x.contiguous()
    if x.shape[0] < most:
        padded = torch.cat([padded, padded.new_zeros((most - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (n_r, ...) tensor along dim 0; backward sums all ranks' gradients of this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        counts = _row_counts(x.shape[0], x.device)
        ctx.start = sum(counts[: dist.get_rank()])
        ctx.rows = x.shape[0]
        return _all_gather_rows(x, counts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no reduce_scatter; this is its sum, then our rows
        return grad[ctx.start : ctx.start + ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the backward is a sum over ranks too (each rank's copy of the result fed a loss)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def gather(x: Tensor) -> Tensor:
    """All ranks' rows concatenated in rank order, with autograd; row counts may differ between ranks."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All ranks' rows concatenated in rank order, for targets and statistics that need no gradient."""
    if world_size() == 1:
        return x
    return _all_gather_rows(x, _row_counts(x.shape[0], x.device))


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks with autograd."""
    if world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


@torch.no_grad()
def all_reduce_max(x: Tensor) -> Tensor:
    if world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def all_reduce_mean_no_grad(x: Tensor) -> Tensor:
    if world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (for parameters DDP does not average)."""
    if factor == 1.0:
        return x
    return _ScaleGrad.apply(x, factor)


def row_offset(local_rows_count: int, device: torch.device | None = None) -> int:
    """Where this rank's rows start in a tensor gathered over ranks."""
    if world_size() == 1:
        return 0
    return sum(_row_counts(local_rows_count, device or torch.device("cpu"))[: rank()])


def local_rows(local_batch: int, device: torch.device | None = None) -> Tensor:
    """Indices of this rank's samples in the stacked two-view batch ``[gather(z_a); gather(z_b)]``.

    Contrastive losses compute only these rows against all gathered columns: the mean over ranks of the
    per-rank losses is then the loss of the whole batch, with 1/W of the compute per rank.
    """
    if world_size() == 1:
        return torch.arange(2 * local_batch, device=device)
    counts = _row_counts(local_batch, device or torch.device("cpu"))
    start, total = sum(counts[: rank()]), sum(counts)
    own = torch.arange(start, start + local_batch, device=device)
    return torch.cat([own, own + total])


# --- process-group set-up ---------------------------------------------------------------------------------------


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
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
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
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT", 20000 + job_id % 20000)), "slurm")
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
        backend=backend, init_method=init_method, rank=env.rank,
        world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s),
        device_id=torch.device("cuda", env.local_rank) if device.type == "cuda" else None,
    )
    log.info("rank %d of %d (%s, %s, master %s:%d)", env.rank, env.world_size, env.source, backend,
             env.master_addr, env.master_port)
    return env


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) onto every rank, in place; a no-op in one process.

    Without SyncBatchNorm each rank's statistics come from its own slice of the batch. DDP broadcasts rank 0's at
    every forward; anything else that reads them (a checkpoint, an online probe) calls this first. Collective.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for buffer in module.buffers():
            if not hasattr(buffer, "device_mesh"):  # DTensor buffers are sharded, not replicated
                dist.broadcast(buffer, src=0)


def agree(flag: bool) -> bool:
    """True on every rank when it is true on any: decisions (stop, reload) that all ranks must take together.

    A CPU tensor over gloo (``backend_for``): no GPU synchronisation.
    """
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
