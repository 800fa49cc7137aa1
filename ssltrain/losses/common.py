"""What every loss shares: the compute dtype, input checks with messages that say what is wrong, entropies."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The common dtype of the inputs, but never below float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_batch(z: Tensor, name: str, min_rows: int = 2) -> None:
    if z.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) tensor of embeddings, got shape {tuple(z.shape)}")
    if z.shape[0] < min_rows:
        raise ValueError(
            f"{name} has N={z.shape[0]} rows but this loss needs N >= {min_rows} "
            "(batch statistics / negatives are undefined for a single sample)"
        )
    if z.shape[1] < 1:
        raise ValueError(f"{name} has D=0 features, got shape {tuple(z.shape)}")


def check_pair(z_a: Tensor, z_b: Tensor, min_rows: int = 2) -> None:
    check_same(min_rows, z_a=z_a, z_b=z_b)


def check_same(min_rows: int = 2, **tensors: Tensor) -> None:
    """All named tensors must share one (N, D) shape, with N >= ``min_rows``."""
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].shape != first.shape:
            listed = " and ".join(names) if len(names) == 2 else ", ".join(names)
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors.values())
            raise ValueError(f"{listed} must have the same (N, D) shape, got {shapes}")
    for name, t in tensors.items():
        check_batch(t, name, min_rows)


def check_positive(value: float, name: str) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_rows(rows: Tensor | None, total: int, device: torch.device) -> Tensor:
    """Validate an optional 1-D index into the ``total`` stacked rows; ``None`` means all of them."""
    if rows is None:
        return torch.arange(total, device=device)
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(
            "rows must be a 1-D integer (LongTensor) index into the 2N stacked rows, got "
            f"{rows.dtype if isinstance(rows, Tensor) else type(rows).__name__} "
            f"of shape {tuple(rows.shape) if isinstance(rows, Tensor) else ()}"
        )
    if rows.numel() == 0:
        raise ValueError("rows is empty: the mean over zero rows is undefined")
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= total:
        raise ValueError(f"rows must lie in [0, {total}) (the 2N stacked rows), got values in [{lo}, {hi}]")
    return rows.to(device=device, dtype=torch.long)


def check_views(views: list[Tensor] | tuple[Tensor, ...], name: str) -> None:
    if not isinstance(views, (list, tuple)) or len(views) == 0:
        raise ValueError(f"{name} must be a non-empty list of (B, K) tensors, got {type(views).__name__}")
    for v, t in enumerate(views):
        if not isinstance(t, Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{v}] must be a 2-D (B, K) tensor, got {shape}")


def check_multicrop(student: list[Tensor], teacher: list[Tensor], s_name: str, t_name: str) -> None:
    """V student views and G <= V teacher views, all (B, K), with at least one (g, v != g) pair."""
    check_views(student, s_name)
    check_views(teacher, t_name)
    shape = student[0].shape
    for name, views in ((s_name, student), (t_name, teacher)):
        for v, t in enumerate(views):
            if t.shape != shape:
                raise ValueError(
                    f"all views must share one (B, K) shape, got {s_name}[0] {tuple(shape)} and "
                    f"{name}[{v}] {tuple(t.shape)}"
                )
    if len(teacher) > len(student):
        raise ValueError(
            f"{t_name} has G={len(teacher)} views but {s_name} only V={len(student)}; the G global views must "
            f"come first in {s_name}, so G <= V"
        )
    if len(student) < 2:
        raise ValueError(f"{s_name} needs V >= 2 views: with V=1 there is no pair (g, v) with v != g")


def entropy(p: Tensor, log_p: Tensor) -> Tensor:
    """Row-wise Shannon entropy ``-sum_c p_c log p_c`` from probabilities and their (finite) logs."""
    return -(p * log_p).sum(dim=-1)


def marginal_entropy(marginal: Tensor) -> Tensor:
    """``H[M] = -sum_c M_c log M_c`` of a distribution; ``log M`` of ``M`` clamped at the smallest positive normal
    number, so a class whose mass underflows to 0 adds 0 (not NaN) and its gradient stays finite."""
    return entropy(marginal, torch.log(marginal.clamp_min(torch.finfo(marginal.dtype).tiny)))
