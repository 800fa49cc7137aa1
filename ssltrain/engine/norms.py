"""The L2 norm of all parameters or all gradients of a model, as one process holding the whole model would compute
it: FSDP's DTensor shards and ssltrain's own row-sharded parameters (DIET's head) are summed over ranks, replicated
tensors count once. Clipping by a norm that left out other ranks' rows would scale the ranks differently."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ssltrain.core.collectives import is_distributed


def total_norm(params: Iterable[nn.Parameter], of_grads: bool) -> Tensor:
    """The norm of the parameters' gradients (``of_grads``; parameters without one are left out) or of their values;
    a 0-d float32 tensor on their device. Collective when a process group is up."""
    pairs: list[tuple[nn.Parameter, Tensor]] = []
    for p in params:
        t = p.grad if of_grads else p.detach()
        if t is not None:
            pairs.append((p, t))
    if not pairs:
        return torch.zeros(())
    if not is_distributed():
        return torch.nn.utils.get_total_norm([t for _, t in pairs], foreach=True)
    dtensors = [t for _, t in pairs if isinstance(t, DTensor)]
    sharded = [t for p, t in pairs if not isinstance(t, DTensor) and getattr(p, "ssltrain_sharded", False)]
    replicated = [t for p, t in pairs if not isinstance(t, DTensor) and not getattr(p, "ssltrain_sharded", False)]
    squares = torch.zeros((), device=pairs[0][1].device)
    if dtensors:
        norm = torch.nn.utils.get_total_norm(dtensors, foreach=True)
        squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).square()
    if sharded:
        rows = torch.nn.utils.get_total_norm(sharded, foreach=True).square()
        dist.all_reduce(rows)
        squares = squares + rows
    if replicated:
        squares = squares + torch.nn.utils.get_total_norm(replicated, foreach=True).square()
    return squares.sqrt()
