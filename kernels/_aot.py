"""Compile every kernel launch for a CUDA target on a machine without a GPU (a build check, not a benchmark).

``compile_all(fn)`` runs ``fn`` (which calls the public API on CPU tensors with the GPU launch configurations)
with :data:`_runtime.LAUNCH_HOOK` set so that each launch compiles its kernel for ``sm_90a`` instead of running,
and returns one record per distinct compiled variant: registers, spills, shared memory. Kernels do not run, so the
numbers the wrappers compute are garbage; only compilation is checked. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _runtime as rt

_PTR = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def _signature(kernel, args, kwargs):
    names = kernel.arg_names
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    sig, consts = {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for name in names:
        v = values[name]
        if name in constexpr_names:
            consts[name] = v
            sig[name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
    return sig, consts


def _resources(cubin: bytes) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)} local={m.group(4)}" if m else out.strip()[-200:]


def compile_all(fn, capability: int = 90) -> list[dict]:
    if rt.INTERPRET:
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (kernels defined for compilation)")
    target = GPUTarget("cuda", capability, 32)
    seen: dict[str, dict] = {}

    def hook(kernel, grid, args, kwargs):
        sig, consts = _signature(kernel, args, kwargs)
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        key = f"{kernel.__name__}{sorted((k, str(v)) for k, v in consts.items())}{sorted(sig.items())}{opts}"
        if key in seen:
            return
        src = ASTSource(kernel, dict(sig), consts)
        ck = triton.compile(src, target=target, options=opts)
        is_block = {k: isinstance(v, int) and not isinstance(v, bool) for k, v in consts.items()}
        flags = ",".join(f"{k}={v}" for k, v in consts.items() if not is_block[k])
        seen[key] = {
            "kernel": kernel.__name__,
            "flags": flags,
            "blocks": ",".join(f"{k}={v}" for k, v in consts.items() if is_block[k]),
            "shared": ck.metadata.shared,
            "resources": _resources(ck.asm["cubin"]),
            **opts,
        }

    rt.LAUNCH_HOOK = hook
    try:
        fn()
    finally:
        rt.LAUNCH_HOOK = None
    return list(seen.values())
