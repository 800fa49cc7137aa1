"""SIGReg's characteristic-function sums in one fused pass (forward and hand-written backward).

For embeddings ``z`` (V views of N rows, D features), directions ``A`` (D x S) and nodes ``t`` (T), the eager
reference (:func:`ssltrain.losses.lejepa.ecf_sums`) forms ``x = z @ A`` (V x N x S), then ``x * t`` (V x N x S x T)
and sums ``cos`` and ``sin`` of it over the rows. Here neither product exists in memory:

* forward, :func:`_sigreg_fwd_kernel`: one program per (view, block of slices, slice of the rows) builds each
  projection tile ``P = z_tile @ A_tile`` (BN x BS, fp32, in registers), then for every node ``t_k`` adds the column
  sums of ``cos(t_k P)`` and ``sin(t_k P)`` to a BS x T accumulator. Row slices are summed in torch (a tiny
  [splits, 2, V, S, T] tensor). Nothing but z, A and t is kept for the backward pass.
* backward, :func:`_sigreg_bwd_kernel`: with ``Gc, Gs = dL/d(sum cos), dL/d(sum sin)`` (V x S x T),
  ``dL/dz = G @ A^T``, ``G_ns = sum_k t_k (Gs_sk cos(t_k p_ns) - Gc_sk sin(t_k p_ns))``. One program per (view, block
  of rows) walks the slice blocks: it recomputes the projection tile, forms G in registers and adds ``G @ A^T`` to
  its rows of an fp32 gradient buffer (each program owns its rows, so the sum is deterministic); the last slice block
  writes the gradient in the input dtype. Extra memory: that fp32 buffer (none when z is fp32).

Phases are reduced to [-pi, pi] (Cody-Waite, 2 pi split in two) before ``tl.cos`` / ``tl.sin`` (accurate
polynomials when compiled, not the MUFU approximations), so that they stay on their fast path whatever the scale of
the embeddings; their large-argument reduction is the 32-byte stack frame (not a register spill) that
``bench/kernels.py --compile-only`` reports for both kernels. Tiles are fp32 (bf16/fp16 inputs are cast on load;
fp64 inputs take the eager path, see :mod:`ssltrain.losses.dispatch`); products use :func:`_runtime.dot_precision`
("tf32x3" on GPU: about fp32 accuracy on tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt

# Block sizes. Under the interpreter they are tiny so that test shapes cover several tiles of every dimension.
if rt.INTERPRET:
    FWD = {"BN": 16, "BS": 16, "BK": 16}
    BWD = {"BN": 16, "BS": 16, "BK": 16, "BKO": 16}
else:
    # Compiled for sm_90a with `python bench/kernels.py --compile-only`: no spills beyond the 32-byte stack frame of
    # the cos / sin slow path; not timed yet.
    FWD = {"BN": 64, "BS": 64, "BK": 32, "num_warps": 8}
    BWD = {"BN": 64, "BS": 64, "BK": 32, "BKO": 32, "num_warps": 8}

_TWO_PI_HI = tl.constexpr(6.28125)  # 201/32: k * _TWO_PI_HI is exact for |k| < 2**16
_TWO_PI_LO = tl.constexpr(1.9353071795864769e-3)  # 2 pi - _TWO_PI_HI
_INV_TWO_PI = tl.constexpr(0.15915494309189535)

# ---------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _cos_sin(x):
    """cos(x), sin(x) after reducing x to [-pi, pi]."""
    k = tl.floor(x * _INV_TWO_PI + 0.5)
    r = (x - k * _TWO_PI_HI) - k * _TWO_PI_LO
    return tl.cos(r), tl.sin(r)


@triton.jit
def _proj_tile(
    z_ptr,
    s_n,
    s_d,
    a_ptr,
    s_ad,
    s_as,
    rows,
    cols,
    N,
    D,
    S,
    PREC: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
):
    """(BN x BS) fp32 tile of z[rows] @ A[:, cols], zero outside the matrices."""
    rmask = (rows < N)[:, None]
    cmask = (cols < S)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    p = tl.zeros((BN, BS), dtype=tl.float32)
    for d0 in range(0, D, BK):
        ks = d0 + tl.arange(0, BK)
        k64 = ks.to(tl.int64)
        zt = tl.load(z_ptr + r64 * s_n + k64[None, :] * s_d, mask=rmask & (ks < D)[None, :], other=0.0)
        at = tl.load(a_ptr + k64[:, None] * s_ad + c64 * s_as, mask=(ks < D)[:, None] & cmask, other=0.0)
        p = tl.dot(zt.to(tl.float32), at.to(tl.float32), p, input_precision=PREC, out_dtype=tl.float32)
    return p


@triton.jit
def _sigreg_fwd_kernel(
    z_ptr,
    s_v,
    s_n,
    s_d,
    a_ptr,
    s_ad,
    s_as,
    t_ptr,
    part_ptr,
    V,
    N,
    D,
    S,
    T,
    rows_per_split,
    PREC: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
):
    """part[split, 0 / 1, v, s, k] = sum over this split's rows n of cos / sin(t_k (z[v, n] . A[:, s]))."""
    v = tl.program_id(0)
    sb = tl.program_id(1)
    sp = tl.program_id(2)
    cols = sb * BS + tl.arange(0, BS)
    tcol = tl.arange(0, BT)
    zv = z_ptr + v.to(tl.int64) * s_v
    n_lo = sp * rows_per_split
    n_hi = tl.minimum(N, n_lo + rows_per_split)
    acc_c = tl.zeros((BS, BT), dtype=tl.float32)
    acc_s = tl.zeros((BS, BT), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BN):
        rows = n0 + tl.arange(0, BN)
        valid = (rows < n_hi)[:, None]
        p = _proj_tile(zv, s_n, s_d, a_ptr, s_ad, s_as, rows, cols, n_hi, D, S, PREC, BN, BS, BK)
        for k in range(T):
            tk = tl.load(t_ptr + k)
            c, s = _cos_sin(p * tk)
            c = tl.where(valid, c, 0.0)  # a padded row projects to 0, and cos(0) = 1
            s = tl.where(valid, s, 0.0)
            sel = tcol[None, :] == k
            acc_c += tl.where(sel, tl.sum(c, axis=0)[:, None], 0.0)
            acc_s += tl.where(sel, tl.sum(s, axis=0)[:, None], 0.0)
    m = (cols < S)[:, None] & (tcol < T)[None, :]
    off = cols.to(tl.int64)[:, None] * T + tcol[None, :]
    base = (sp.to(tl.int64) * 2 * V + v) * S * T
    tl.store(part_ptr + base + off, acc_c, mask=m)
    tl.store(part_ptr + base + V * S * T + off, acc_s, mask=m)


@triton.jit
def _sigreg_bwd_kernel(
    z_ptr,
    s_v,
    s_n,
    s_d,
    a_ptr,
    s_ad,
    s_as,
    t_ptr,
    gc_ptr,
    gs_ptr,
    buf_ptr,
    out_ptr,
    N,
    D,
    S,
    T,
    PREC: tl.constexpr,
    BN: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BKO: tl.constexpr,
):
    """out[v, rows] = sum over slice blocks of G[rows, cols] @ A[:, cols]^T, accumulated in buf (fp32, V x N x D
    contiguous; may be out itself) and written to out (contiguous, input dtype) by the last slice block."""
    v = tl.program_id(0)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < N
    zv = z_ptr + v.to(tl.int64) * s_v
    gv = v.to(tl.int64) * S * T
    obase = (v.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D
    for s0 in range(0, S, BS):
        cols = s0 + tl.arange(0, BS)
        cmask = cols < S
        p = _proj_tile(zv, s_n, s_d, a_ptr, s_ad, s_as, rows, cols, N, D, S, PREC, BN, BS, BK)
        g = tl.zeros((BN, BS), dtype=tl.float32)
        for k in range(T):
            tk = tl.load(t_ptr + k)
            c, s = _cos_sin(p * tk)
            gck = tl.load(gc_ptr + gv + cols * T + k, mask=cmask, other=0.0)
            gsk = tl.load(gs_ptr + gv + cols * T + k, mask=cmask, other=0.0)
            g += tk * (gsk[None, :] * c - gck[None, :] * s)
        not_first = s0 > 0
        last = s0 + BS >= S
        not_last = s0 + BS < S
        for d0 in range(0, D, BKO):
            ds = d0 + tl.arange(0, BKO)
            dmask = ds < D
            at = tl.load(
                a_ptr + ds.to(tl.int64)[None, :] * s_ad + cols.to(tl.int64)[:, None] * s_as,
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            )
            upd = tl.dot(g, at.to(tl.float32), input_precision=PREC, out_dtype=tl.float32)
            m = rmask[:, None] & dmask[None, :]
            off = obase + ds[None, :]
            prev = tl.load(buf_ptr + off, mask=m & not_first, other=0.0)
            val = prev + upd
            tl.store(buf_ptr + off, val, mask=m & not_last)
            tl.store(out_ptr + off, val.to(out_ptr.dtype.element_ty), mask=m & last)


# ---------------------------------------------------------------------------------------------------------------
# launchers


def _check(z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor) -> None:
    if z.dim() != 3 or directions.dim() != 2 or directions.shape[0] != z.shape[2] or t.dim() != 1:
        raise ValueError(f"bad shapes z {tuple(z.shape)}, directions {tuple(directions.shape)}, t {tuple(t.shape)}")
    if any(x.dtype == torch.float64 for x in (z, directions, t)):
        raise ValueError("the SIGReg kernel computes in float32; float64 inputs take the eager path")


def forward_sums(z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(2, V, S, T) float32: sums over the rows of cos / sin of ``t * (z @ directions)`` for z (V, N, D)."""
    _check(z, directions, t)
    v, n, d = z.shape
    s = directions.shape[1]
    nt = t.numel()
    if n == 0:  # a rank without rows (every sample of its batch skipped)
        return torch.zeros((2, v, s, nt), dtype=torch.float32, device=z.device)
    cfg = FWD
    bn, bs = cfg["BN"], cfg["BS"]
    nsb = rt.cdiv(s, bs)
    splits = max(1, min(rt.cdiv(n, bn), rt.cdiv(rt.TARGET_PROGRAMS, v * nsb)))
    rows_per_split = rt.cdiv(rt.cdiv(n, splits), bn) * bn
    splits = rt.cdiv(n, rows_per_split)
    part = rt.empty((splits, 2, v, s, nt), torch.float32, z.device)
    t32 = t.to(torch.float32).contiguous()
    rt.launch(
        _sigreg_fwd_kernel,
        (v, nsb, splits),
        z,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        directions,
        directions.stride(0),
        directions.stride(1),
        t32,
        part,
        v,
        n,
        d,
        s,
        nt,
        rows_per_split,
        PREC=rt.dot_precision(torch.float32),
        BN=bn,
        BS=bs,
        BK=cfg["BK"],
        BT=rt.next_pow2(nt),
        **rt.launch_opts(cfg.get("num_warps", 4), 2),
    )
    return part.sum(0)


def backward_z(
    z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, g_cos: torch.Tensor, g_sin: torch.Tensor
) -> torch.Tensor:
    """dL/dz (V, N, D, z's dtype) given dL/d(sums of cos) and dL/d(sums of sin), each (V, S, T)."""
    v, n, d = z.shape
    s = directions.shape[1]
    nt = t.numel()
    out = rt.empty((v, n, d), z.dtype, z.device)
    if out.numel() == 0:
        return out
    buf = out if z.dtype == torch.float32 else rt.empty((v, n, d), torch.float32, z.device)
    cfg = BWD
    rt.launch(
        _sigreg_bwd_kernel,
        (v, rt.cdiv(n, cfg["BN"])),
        z,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        directions,
        directions.stride(0),
        directions.stride(1),
        t.to(torch.float32).contiguous(),
        g_cos.to(torch.float32).contiguous(),
        g_sin.to(torch.float32).contiguous(),
        buf,
        out,
        n,
        d,
        s,
        nt,
        PREC=rt.dot_precision(torch.float32),
        BN=cfg["BN"],
        BS=cfg["BS"],
        BK=cfg["BK"],
        BKO=cfg["BKO"],
        **rt.launch_opts(cfg.get("num_warps", 4), 2),
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# autograd function


class ECFSums(torch.autograd.Function):
    """``(2, ..., S, T)``: sums over the rows of cos and sin of ``t * (z @ directions)``, z (N, D) or (V, N, D).

    Differentiable in z only (the directions are a fixed random draw; the dispatcher takes the eager path when
    they require a gradient)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, directions: torch.Tensor, t: torch.Tensor):
        z3 = z if z.dim() == 3 else z.unsqueeze(0)
        sums = forward_sums(z3, directions, t)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(z, directions, t)
        return sums if z.dim() == 3 else sums[:, 0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, directions, t = ctx.saved_tensors
        z3 = z if z.dim() == 3 else z.unsqueeze(0)
        g = grad if z.dim() == 3 else grad.unsqueeze(1)
        dz = backward_z(z3, directions, t, g[0], g[1])
        return dz.reshape(z.shape), None, None
