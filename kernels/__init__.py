"""Fused Triton kernels for the loss and covariance terms (installed as ``ssltrain.kernels``).

Each entry point computes what its eager reference in :mod:`ssltrain.losses` computes (the specification), with a
hand-written backward pass. :mod:`ssltrain.losses.dispatch` validates the inputs and picks, per call, the
reference or these kernels; :func:`resolve_impl` says which of the two can run for ``loss.impl``:

* ``"eager"``: the reference.
* ``"triton"``: the fused kernels. On CUDA tensors they compile; on CPU tensors they run only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before the first kernel is used), which is what the tests do.
* ``"auto"`` (default): ``"triton"`` when every tensor is on CUDA and triton imports, else ``"eager"``.

Nothing here imports triton until a kernel runs, so CPU-only installs without triton work with the eager path.
Inputs may be bf16/fp16/fp32/fp64; the kernels compute in fp32 (fp64 for fp64 inputs) and return the
reference's dtypes: loss terms in the compute dtype, gradients in the input dtype.

Kernel design notes are in the docstrings of ``_cov`` (VICReg, Barlow Twins), ``_infonce`` (NT-Xent, CISSL) and
``_sigreg`` (LeJEPA's SIGReg; float32 only, so float64 SIGReg inputs take the eager path).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch import Tensor

__all__ = ["IMPLS", "barlow_twins", "cissl", "nt_xent", "resolve_impl", "sigreg_sums", "vicreg_regularizer"]

IMPLS = ("auto", "triton", "eager")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton can be imported (checked once, without importing it for CPU-only callers of 'eager')."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def _interpreting() -> bool:
    """Whether Triton kernels would run under the interpreter: decided when the kernels are first defined, so a
    module already loaded wins over a later change of the environment variable."""
    import sys

    loaded = sys.modules.get("ssltrain.kernels._runtime")
    if loaded is not None:
        return bool(loaded.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: Tensor | None) -> str:
    """``"triton"`` or ``"eager"`` for these inputs (None entries are ignored); see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(repr(i) for i in IMPLS)}; got {impl!r}")
    if impl == "eager":
        return "eager"
    ts = [t for t in tensors if t is not None]
    devices = sorted({str(t.device) for t in ts})
    on_cuda = bool(ts) and all(t.is_cuda for t in ts) and len(devices) == 1
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "eager"
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package, which is not importable here; use impl='eager'")
    if on_cuda:
        return "triton"
    if any(t.is_cuda for t in ts):
        raise RuntimeError(f"impl='triton' got tensors on several devices ({', '.join(devices)}); put them on one GPU")
    if all(t.device.type == "cpu" for t in ts) and _interpreting():
        return "triton"
    raise RuntimeError(
        f"impl='triton' got tensors on {', '.join(devices)}: compiled Triton kernels need CUDA tensors. "
        "Use impl='eager' (or 'auto'), or set TRITON_INTERPRET=1 before the kernels are first used to run them "
        "under the (slow) Triton interpreter on CPU."
    )


def _on_device(t: Tensor) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it the inputs' device (autograd does so for backward)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def vicreg_regularizer(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """``(variance_hinge(z, gamma, eps), covariance_offdiag(z))`` of one VICReg branch."""
    from . import _cov

    with _on_device(z):
        return _cov.VICRegRegularizer.apply(z, float(gamma), float(eps), None, torch.is_grad_enabled())


def barlow_twins(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> dict[str, Tensor]:
    """``barlow_twins_loss``: dict with ``loss``, ``on_diag``, ``off_diag``."""
    from . import _cov

    with _on_device(z_a):
        loss, on_diag, off_diag = _cov.BarlowTwins.apply(
            z_a, z_b, float(lambd), float(eps), None, torch.is_grad_enabled()
        )
    return {"loss": loss, "on_diag": on_diag, "off_diag": off_diag}


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float, rows: Tensor, all_rows: bool) -> dict[str, Tensor]:
    """``nt_xent_loss`` of the stacked rows ``rows`` (an index into the 2N rows; ``all_rows``: every row, in
    order): dict with ``loss`` and (detached) ``accuracy``."""
    from . import _infonce

    with _on_device(z_a):
        loss, accuracy = _infonce.NTXent.apply(z_a, z_b, _int32(rows), all_rows, float(temperature))
    return {"loss": loss, "accuracy": accuracy}


def cissl(
    s_a: Tensor, s_b: Tensor, t_a: Tensor, t_b: Tensor, temperature: float, rows: Tensor, all_rows: bool
) -> dict[str, Tensor]:
    """``cissl_loss`` of the stacked rows ``rows`` (as in :func:`nt_xent`): dict with ``loss`` and (detached)
    ``accuracy``."""
    from . import _infonce

    with _on_device(s_a):
        loss, accuracy = _infonce.CISSL.apply(s_a, s_b, t_a, t_b, _int32(rows), all_rows, float(temperature))
    return {"loss": loss, "accuracy": accuracy}


def sigreg_sums(z: Tensor, directions: Tensor, t: Tensor) -> Tensor:
    """:func:`ssltrain.losses.lejepa.ecf_sums` fused: ``(2, ..., S, T)`` float32 sums over the rows of cos / sin of
    ``t * (z @ directions)`` for z ``(N, D)`` or ``(V, N, D)`` (bf16/fp16/fp32), differentiable in z only."""
    from . import _sigreg

    with _on_device(z):
        return _sigreg.ECFSums.apply(z, directions, t)


def _int32(rows: Tensor) -> Tensor:
    return rows.to(torch.int32).contiguous()
