"""What every Triton kernel module shares: buffer allocation, dtypes, dot precision, launch configurations.

Importing this module imports triton; :mod:`ssltrain.kernels` imports it only when a Triton path runs.
Whether the kernels run under the Triton interpreter is decided when this module is first imported
(triton reads ``TRITON_INTERPRET`` when a kernel is defined), and recorded in :data:`INTERPRET`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# fp32 x fp32 tl.dot precision on a GPU. "tf32x3" splits each operand into a tf32 head and a tf32 tail and keeps
# three products: about fp32 accuracy (relative error ~1e-6 per product) on tensor cores. "ieee" is exact fp32 FMA
# (slower); "tf32" alone is NOT accurate enough for these losses. The interpreter only does exact numpy matmuls.
_GPU_DOT_PRECISIONS = ("tf32x3", "ieee", "bf16x6", "bf16x3", "tf32")
DOT_PRECISION_ENV = "SSLTRAIN_TRITON_DOT_PRECISION"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, uninitialised. Tests replace this with a NaN-filling version to
    prove that the kernels write every element they hand back."""
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The compute dtype: float64 when any input is float64, else float32 (as the eager reference upcasts)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot on tiles of the compute dtype."""
    if dtype == torch.float64 or INTERPRET:
        return "ieee"
    prec = os.environ.get(DOT_PRECISION_ENV, "tf32x3").lower()
    if prec not in _GPU_DOT_PRECISIONS:
        raise ValueError(f"{DOT_PRECISION_ENV} must be one of {_GPU_DOT_PRECISIONS}, got {prec!r}")
    return prec


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def launch_opts(num_warps: int, num_stages: int = 3) -> dict[str, int]:
    """Compiler options for a launch (the interpreter takes none)."""
    return {} if INTERPRET else {"num_warps": num_warps, "num_stages": num_stages}


# Block sizes. Under the interpreter they are tiny (every tile step is slow numpy) so that small test shapes
# still cover several tiles, ragged edges and more than one split.
if INTERPRET:
    COLSTATS = {"BN": 16, "BD": 16}
    GRAM = {"BM": 16, "BK": 16}
    GRAM_PAIR = {"BM": 16, "BK": 16}
    CROSS = {"BD": 16, "BK": 16}
    MM = {"BM": 16, "BN": 16, "BK": 16}
    ELEMWISE = {"BM": 16, "BN": 16}
    ROWNORM = {"BM": 16, "BD": 16}
    NORM_BWD = {"BM": 16, "BD": 16}
    LSE = LSE_F32 = {"BM": 16, "BN": 16, "BK": 16}
    LSE_BWD = LSE_BWD_F32 = {"BM": 16, "BN": 16, "BK": 16, "BDO_MAX": 32}
    TARGET_PROGRAMS = 2  # forces a column split in the tests
else:
    # Chosen so that no kernel spills registers when compiled for sm_90a (checked with
    # `python bench/kernels.py --compile-only`, which compiles every variant without a GPU); not timed yet.
    COLSTATS = {"BN": 64, "BD": 32, "num_warps": 4}
    GRAM = {"BM": 64, "BK": 32, "num_warps": 8}
    GRAM_PAIR = {"BM": 64, "BK": 32, "num_warps": 8}
    CROSS = {"BD": 128, "BK": 16, "num_warps": 8}
    MM = {"BM": 128, "BN": 64, "BK": 16, "num_warps": 8}
    ELEMWISE = {"BM": 64, "BN": 64, "num_warps": 4}
    ROWNORM = {"BM": 32, "BD": 128, "num_warps": 4}
    NORM_BWD = {"BM": 16, "BD": 128, "num_warps": 4}
    # InfoNCE: LSE / LSE_BWD for 16-bit inputs (16-bit MMAs), the _F32 ones for fp32 / fp64 inputs
    LSE = {"BM": 128, "BN": 64, "BK": 64, "num_warps": 8}
    LSE_BWD = {"BM": 64, "BN": 64, "BK": 32, "BDO_MAX": 128, "num_warps": 8}
    LSE_F32 = {"BM": 64, "BN": 64, "BK": 32, "num_warps": 8}
    LSE_BWD_F32 = {"BM": 64, "BN": 32, "BK": 32, "BDO_MAX": 64, "num_warps": 8}
    TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs


# A bench/CI tool (``python bench/kernels.py --compile-only``) sets this to compile each launch for a GPU target
# without a GPU (see ``_aot.py``); None runs the kernels.
LAUNCH_HOOK: Callable[..., None] | None = None


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kernel, grid, args, kwargs)
        return
    kernel[grid](*args, **kwargs)
