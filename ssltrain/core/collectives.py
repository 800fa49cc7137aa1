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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


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
    """Concatenate every rank's (n_r, ...) tensor along dim 0; backward sums all ranks' gradients of this rank's
    rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        counts = _row_counts(x.shape[0], x.device)
        ctx.start = sum(counts[: dist.get_rank()])
        ctx.rows = x.shape[0]
        return _all_gather_rows(x, counts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no reduce_scatter; this is its sum, then our rows
        return grad[ctx.start : ctx.start + ctx.rows]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the backward is a sum over ranks too (each rank's copy of the result fed a loss)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
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


def barrier() -> None:
    if is_distributed():
        dist.barrier()


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


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (small, picklable: names, digests, messages), in rank order, on every rank; through the
    CPU group (gloo), so no GPU is involved. ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(flag: bool) -> bool:
    """True on every rank when it is true on any: decisions (stop, reload) that all ranks must take together.

    A CPU tensor over gloo (``process_group.backend_for``): no GPU synchronisation.
    """
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
