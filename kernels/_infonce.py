"""Tiled InfoNCE kernels: NT-Xent (SimCLR) and CISSL, forward and hand-written backward, O(N) extra memory.

Queries are the selected rows ``R`` of the stacked, L2-normalised ``Q = [q_a; q_b]`` (2N x D); keys are all 2N rows
of ``K`` (NT-Xent: K = Q with the self pair masked; CISSL: the teacher stack, self pair kept). Logits
``l[i, k] = q_i . k_k / (|q_i| |k_k| t)`` are recomputed tile by tile from the raw inputs and the per-row inverse
norms (:func:`_rownorm_kernel`); the 2N x 2N matrix never exists.

* forward, :func:`_lse_fwd_kernel`: one program per (block of selected rows, slice of the columns) keeps an
  online log-sum-exp, the target-weighted logit sum and the largest positive / negative logits (accuracy).
  Column slices are merged in torch (tiny [splits, R] tensors). Saved for backward: the per-row LSE.
* backward: ``dl = (softmax - target) * g / (|R| t)``, rebuilt from the saved LSE.
  :func:`_lse_bwd_q_kernel` (query side, ``dl @ K_hat``) runs per (row block, D slice, column slice);
  :func:`_lse_bwd_k_kernel` (key side, ``dl^T @ Q_hat``) per (column block, D slice) looping over the selected rows.
  :func:`_norm_bwd_kernel` then applies the normalisation's Jacobian ``(du - u (u . du)) / |x|`` and writes the
  gradient in the input dtype. A D slice holds up to BDO_MAX features; for wider D the logits are recomputed once
  per slice (D=8192 InfoNCE is unusual; D <= 256 recomputes nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt
from ._cov import _sqrt

_NORM_EPS = 1e-12  # F.normalize's default


@triton.jit
def _rownorm_kernel(
    x_ptr, s_xm, s_xd, inv_ptr, proj_ptr, M, D, EPS, ACC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr
):
    """inv = 1 / max(|x_i|, eps); proj = 1 where |x_i| > eps (F.normalize's gradient projects only there)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    acc = tl.zeros((BM, BD), dtype=ACC)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        m = rmask[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_xm + ds.to(tl.int64)[None, :] * s_xd, mask=m, other=0.0).to(
            ACC
        )
        acc += x * x
    nrm = _sqrt(tl.sum(acc, axis=1), ACC)
    tl.store(inv_ptr + rows, 1.0 / tl.maximum(nrm, EPS), mask=rmask)
    tl.store(proj_ptr + rows, tl.where(nrm > EPS, 1.0, 0.0).to(ACC), mask=rmask)


@triton.jit
def _logits_tile(
    q_ptr,
    s_qm,
    s_qd,
    qrow,
    qinv,
    k_ptr,
    s_km,
    s_kd,
    kcol,
    kinv,
    qmask,
    kmask,
    D,
    inv_temp,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    MMA16: tl.constexpr,
    CAST32: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """(BM x BN) logits q_i . k_k * inv_q_i * inv_k_k / t for query rows qrow and key rows kcol.

    MMA16: q and k are bf16 (or fp16) and go to the tensor cores as they are: products of 16-bit floats are exact
    in fp32, so with fp32 accumulation this is as accurate as an fp32 dot of the same numbers. CAST32 (the
    interpreter, whose 16-bit dot is wrong) casts the 16-bit tiles to fp32 first: the same numbers, exactly."""
    acc = tl.zeros((BM, BN), dtype=ACC)
    q64 = qrow.to(tl.int64)[:, None] * s_qm
    k64 = kcol.to(tl.int64)[:, None] * s_km
    for d0 in range(0, D, BK):
        ds = d0 + tl.arange(0, BK)
        dm = (ds < D)[None, :]
        q = tl.load(q_ptr + q64 + ds[None, :] * s_qd, mask=qmask[:, None] & dm, other=0.0)
        k = tl.load(k_ptr + k64 + ds[None, :] * s_kd, mask=kmask[:, None] & dm, other=0.0)
        if MMA16:
            if CAST32:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(q, tl.trans(k), acc, out_dtype=ACC)
        else:
            acc = tl.dot(q.to(ACC), tl.trans(k.to(ACC)), acc, input_precision=PREC, out_dtype=ACC)
    return acc * (qinv[:, None] * inv_temp) * kinv[None, :]


@triton.jit
def _acc_dot(
    acc,
    w,
    x_ptr,
    x_off,
    xmask,
    xscale,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    MMA16: tl.constexpr,
    CAST32: tl.constexpr,
):
    """acc += w @ (x * xscale[:, None]) with x a raw input tile (rows scaled by their inverse norms).

    MMA16: the scale is folded into w, and w (fp32) is split into a 16-bit head and tail, w = hi + lo + O(2^-17 w),
    so two 16-bit MMAs against the unchanged 16-bit x reproduce the fp32 product to ~1e-5 relative."""
    x = tl.load(x_ptr + x_off, mask=xmask, other=0.0)
    if MMA16:
        ws = w * xscale[None, :]
        hi = ws.to(x.dtype)
        lo = (ws - hi.to(ACC)).to(x.dtype)
        if CAST32:
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(hi, x, acc, out_dtype=ACC)
        acc = tl.dot(lo, x, acc, out_dtype=ACC)
    else:
        acc = tl.dot(w, x.to(ACC) * xscale[:, None], acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _masks(g, pos, cols, rmask, cmask, SELF_MASK: tl.constexpr, SOFT: tl.constexpr):
    """valid (column takes part in the softmax), target weight, is-target (for accuracy) for a (rows x cols) tile."""
    valid = rmask[:, None] & cmask[None, :]
    is_self = cols[None, :] == g[:, None]
    is_pos = cols[None, :] == pos[:, None]
    if SELF_MASK:
        valid = valid & (cols[None, :] != g[:, None])
        tgt_w = tl.where(is_pos, 1.0, 0.0)
        is_tgt = is_pos
    else:
        tgt_w = tl.where(is_pos, 0.5, 0.0) + tl.where(is_self, 0.5, 0.0)
        is_tgt = is_pos | is_self
    return valid, tgt_w, is_tgt


@triton.jit
def _lse_fwd_kernel(
    q_ptr,
    s_qm,
    s_qd,
    qinv_ptr,
    rows_ptr,
    k_ptr,
    s_km,
    s_kd,
    kinv_ptr,
    m_ptr,
    l_ptr,
    tgt_ptr,
    posmax_ptr,
    negmax_ptr,
    R,
    M2,
    NHALF,
    D,
    cols_per_split,
    inv_temp,
    SELF_MASK: tl.constexpr,
    SOFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    MMA16: tl.constexpr,
    CAST32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    ridx = pid_r * BM + tl.arange(0, BM)
    rmask = ridx < R
    g = tl.load(rows_ptr + ridx, mask=rmask, other=0)
    pos = (g + NHALF) % M2
    qinv = tl.load(qinv_ptr + g, mask=rmask, other=0.0)
    neg_inf = -float("inf")
    m_i = tl.full((BM,), neg_inf, dtype=ACC)
    l_i = tl.zeros((BM,), dtype=ACC)
    tgt = tl.zeros((BM,), dtype=ACC)
    posmax = tl.full((BM,), neg_inf, dtype=ACC)
    negmax = tl.full((BM,), neg_inf, dtype=ACC)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, M2)
    for c0 in range(c_start, c_end, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < c_end
        kinv = tl.load(kinv_ptr + cols, mask=cmask, other=0.0)
        s = _logits_tile(
            q_ptr,
            s_qm,
            s_qd,
            g,
            qinv,
            k_ptr,
            s_km,
            s_kd,
            cols,
            kinv,
            rmask,
            cmask,
            D,
            inv_temp,
            ACC,
            PREC,
            MMA16,
            CAST32,
            BK,
            BM,
            BN,
        )
        valid, tgt_w, is_tgt = _masks(g, pos, cols, rmask, cmask, SELF_MASK, SOFT)
        sm = tl.where(valid, s, neg_inf)
        m_new = tl.maximum(m_i, tl.max(sm, axis=1))
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sm - m_safe[:, None]), axis=1)
        m_i = m_new
        tgt += tl.sum(tl.where(valid, tgt_w * s, 0.0), axis=1)
        posmax = tl.maximum(posmax, tl.max(tl.where(valid & is_tgt, s, neg_inf), axis=1))
        negmax = tl.maximum(negmax, tl.max(tl.where(valid & (~is_tgt), s, neg_inf), axis=1))
    off = pid_s.to(tl.int64) * R + ridx
    tl.store(m_ptr + off, m_i, mask=rmask)
    tl.store(l_ptr + off, l_i, mask=rmask)
    tl.store(tgt_ptr + off, tgt, mask=rmask)
    tl.store(posmax_ptr + off, posmax, mask=rmask)
    tl.store(negmax_ptr + off, negmax, mask=rmask)


@triton.jit
def _lse_bwd_q_kernel(
    q_ptr,
    s_qm,
    s_qd,
    qinv_ptr,
    rows_ptr,
    k_ptr,
    s_km,
    s_kd,
    kinv_ptr,
    lse_ptr,
    out_ptr,
    R,
    M2,
    NHALF,
    D,
    cols_per_split,
    inv_temp,
    SELF_MASK: tl.constexpr,
    SOFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    MMA16: tl.constexpr,
    CAST32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BDO: tl.constexpr,
):
    """out[split, r, dslice] = sum_{k in split} (softmax - target)[r, k] * k_hat[k, dslice]  (unscaled)."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    ridx = pid_r * BM + tl.arange(0, BM)
    rmask = ridx < R
    g = tl.load(rows_ptr + ridx, mask=rmask, other=0)
    pos = (g + NHALF) % M2
    qinv = tl.load(qinv_ptr + g, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + ridx, mask=rmask, other=0.0)
    dcols = pid_d * BDO + tl.arange(0, BDO)
    dmask = dcols < D
    acc = tl.zeros((BM, BDO), dtype=ACC)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, M2)
    for c0 in range(c_start, c_end, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < c_end
        kinv = tl.load(kinv_ptr + cols, mask=cmask, other=0.0)
        s = _logits_tile(
            q_ptr,
            s_qm,
            s_qd,
            g,
            qinv,
            k_ptr,
            s_km,
            s_kd,
            cols,
            kinv,
            rmask,
            cmask,
            D,
            inv_temp,
            ACC,
            PREC,
            MMA16,
            CAST32,
            BK,
            BM,
            BN,
        )
        valid, tgt_w, is_tgt = _masks(g, pos, cols, rmask, cmask, SELF_MASK, SOFT)
        dl = tl.where(valid, tl.exp(s - lse[:, None]) - tgt_w, 0.0)
        acc = _acc_dot(
            acc,
            dl,
            k_ptr,
            cols.to(tl.int64)[:, None] * s_km + dcols[None, :] * s_kd,
            cmask[:, None] & dmask[None, :],
            kinv,
            ACC,
            PREC,
            MMA16,
            CAST32,
        )
    off = (pid_s.to(tl.int64) * R + ridx.to(tl.int64))[:, None] * D + dcols[None, :]
    tl.store(out_ptr + off, acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _lse_bwd_k_kernel(
    q_ptr,
    s_qm,
    s_qd,
    qinv_ptr,
    rows_ptr,
    k_ptr,
    s_km,
    s_kd,
    kinv_ptr,
    lse_ptr,
    out_ptr,
    R,
    M2,
    NHALF,
    D,
    inv_temp,
    SELF_MASK: tl.constexpr,
    SOFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    MMA16: tl.constexpr,
    CAST32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BDO: tl.constexpr,
):
    """out[k, dslice] = sum_{r in R} (softmax - target)[r, k] * q_hat[rows[r], dslice]  (unscaled)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_c * BN + tl.arange(0, BN)
    cmask = cols < M2
    kinv = tl.load(kinv_ptr + cols, mask=cmask, other=0.0)
    dcols = pid_d * BDO + tl.arange(0, BDO)
    dmask = dcols < D
    acc = tl.zeros((BN, BDO), dtype=ACC)
    for r0 in range(0, R, BM):
        ridx = r0 + tl.arange(0, BM)
        rmask = ridx < R
        g = tl.load(rows_ptr + ridx, mask=rmask, other=0)
        pos = (g + NHALF) % M2
        qinv = tl.load(qinv_ptr + g, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + ridx, mask=rmask, other=0.0)
        s = _logits_tile(
            q_ptr,
            s_qm,
            s_qd,
            g,
            qinv,
            k_ptr,
            s_km,
            s_kd,
            cols,
            kinv,
            rmask,
            cmask,
            D,
            inv_temp,
            ACC,
            PREC,
            MMA16,
            CAST32,
            BK,
            BM,
            BN,
        )
        valid, tgt_w, is_tgt = _masks(g, pos, cols, rmask, cmask, SELF_MASK, SOFT)
        dl = tl.where(valid, tl.exp(s - lse[:, None]) - tgt_w, 0.0)
        acc = _acc_dot(
            acc,
            tl.trans(dl),
            q_ptr,
            g.to(tl.int64)[:, None] * s_qm + dcols[None, :] * s_qd,
            rmask[:, None] & dmask[None, :],
            qinv,
            ACC,
            PREC,
            MMA16,
            CAST32,
        )
    off = cols.to(tl.int64)[:, None] * D + dcols[None, :]
    tl.store(out_ptr + off, acc, mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    s_xm,
    s_xd,
    inv_ptr,
    proj_ptr,
    du_ptr,
    scale_ptr,
    out_ptr,
    s_om,
    s_od,
    M,
    D,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    """out = scale * (du - proj * u (u . du)) * inv with u = x * inv: the Jacobian of x / max(|x|, eps)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    r64 = rows.to(tl.int64)[:, None]
    inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
    proj = tl.load(proj_ptr + rows, mask=rmask, other=0.0)
    scale = tl.load(scale_ptr).to(ACC)
    dot = tl.zeros((BM, BD), dtype=ACC)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        m = rmask[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + r64 * s_xm + ds[None, :] * s_xd, mask=m, other=0.0).to(ACC)
        du = tl.load(du_ptr + r64 * D + ds[None, :], mask=m, other=0.0)
        dot += x * du
    udu = tl.sum(dot, axis=1) * inv * proj
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        m = rmask[:, None] & (ds < D)[None, :]
        x = tl.load(x_ptr + r64 * s_xm + ds[None, :] * s_xd, mask=m, other=0.0).to(ACC)
        du = tl.load(du_ptr + r64 * D + ds[None, :], mask=m, other=0.0)
        out = (du - x * (inv * udu)[:, None]) * (inv * scale)[:, None]
        tl.store(out_ptr + r64 * s_om + ds[None, :] * s_od, out.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# launchers


def rownorm(x: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m, d = x.shape
    inv, proj = rt.empty((m,), acc, x.device), rt.empty((m,), acc, x.device)
    cfg = rt.ROWNORM
    rt.launch(
        _rownorm_kernel,
        (rt.cdiv(m, cfg["BM"]),),
        x,
        x.stride(0),
        x.stride(1),
        inv,
        proj,
        m,
        d,
        _NORM_EPS,
        ACC=rt.tl_dtype(acc),
        BM=cfg["BM"],
        BD=cfg["BD"],
        **rt.launch_opts(cfg.get("num_warps", 4), 1),
    )
    return inv, proj


def _mma_flags(q: torch.Tensor, k: torch.Tensor) -> dict[str, bool]:
    """16-bit inputs of one dtype use 16-bit MMAs (exact products); the interpreter casts those tiles to fp32."""
    mma16 = q.dtype == k.dtype and q.dtype in (torch.bfloat16, torch.float16)
    return {"MMA16": mma16, "CAST32": mma16 and rt.INTERPRET}


def _splits(n_other_programs: int, n_col_blocks: int) -> int:
    """Column slices so that the grid has about TARGET_PROGRAMS programs (few selected rows, e.g. one rank's)."""
    return max(1, min(n_col_blocks, rt.cdiv(rt.TARGET_PROGRAMS, max(n_other_programs, 1))))


def lse_forward(q, qinv, rows, k, kinv, temperature, self_mask, acc):
    """Per selected row: lse, target-weighted logit sum, max target logit, max non-target logit (acc dtype)."""
    r = rows.numel()
    m2, d = k.shape
    cfg = rt.LSE if _mma_flags(q, k)["MMA16"] else rt.LSE_F32
    bm, bn = cfg["BM"], cfg["BN"]
    n_rb, n_cb = rt.cdiv(r, bm), rt.cdiv(m2, bn)
    ns = _splits(n_rb, n_cb)
    per = rt.cdiv(n_cb, ns) * bn
    ns = rt.cdiv(m2, per)
    bufs = [rt.empty((ns, r), acc, q.device) for _ in range(5)]
    rt.launch(
        _lse_fwd_kernel,
        (n_rb, ns),
        q,
        q.stride(0),
        q.stride(1),
        qinv,
        rows,
        k,
        k.stride(0),
        k.stride(1),
        kinv,
        *bufs,
        r,
        m2,
        m2 // 2,
        d,
        per,
        1.0 / temperature,
        SELF_MASK=self_mask,
        SOFT=not self_mask,
        ACC=rt.tl_dtype(acc),
        PREC=rt.dot_precision(acc),
        **_mma_flags(q, k),
        BM=bm,
        BN=bn,
        BK=cfg["BK"],
        **rt.launch_opts(cfg.get("num_warps", 4)),
    )
    m, l, tgt, posmax, negmax = bufs
    lse = torch.logsumexp(m + torch.log(l), dim=0)
    return lse, tgt.sum(0), posmax.amax(0), negmax.amax(0)


def lse_backward(q, qinv, rows, k, kinv, lse, temperature, self_mask, acc):
    """Unscaled (softmax - target) @ K_hat  (|R| x D) and (softmax - target)^T @ Q_hat  (2N x D)."""
    r = rows.numel()
    m2, d = k.shape
    cfg = rt.LSE_BWD if _mma_flags(q, k)["MMA16"] else rt.LSE_BWD_F32
    bm, bn = cfg["BM"], cfg["BN"]
    bdo = min(rt.next_pow2(d), cfg["BDO_MAX"])
    n_d = rt.cdiv(d, bdo)
    common = dict(
        SELF_MASK=self_mask,
        SOFT=not self_mask,
        ACC=rt.tl_dtype(acc),
        PREC=rt.dot_precision(acc),
        **_mma_flags(q, k),
        BM=bm,
        BN=bn,
        BK=cfg["BK"],
        BDO=bdo,
        **rt.launch_opts(cfg.get("num_warps", 4), 2),
    )
    n_rb, n_cb = rt.cdiv(r, bm), rt.cdiv(m2, bn)
    ns = _splits(n_rb * n_d, n_cb)
    per = rt.cdiv(n_cb, ns) * bn
    ns = rt.cdiv(m2, per)
    dq = rt.empty((ns, r, d), acc, q.device)
    rt.launch(
        _lse_bwd_q_kernel,
        (n_rb, n_d, ns),
        q,
        q.stride(0),
        q.stride(1),
        qinv,
        rows,
        k,
        k.stride(0),
        k.stride(1),
        kinv,
        lse,
        dq,
        r,
        m2,
        m2 // 2,
        d,
        per,
        1.0 / temperature,
        **common,
    )
    dk = rt.empty((m2, d), acc, q.device)
    rt.launch(
        _lse_bwd_k_kernel,
        (n_cb, n_d),
        q,
        q.stride(0),
        q.stride(1),
        qinv,
        rows,
        k,
        k.stride(0),
        k.stride(1),
        kinv,
        lse,
        dk,
        r,
        m2,
        m2 // 2,
        d,
        1.0 / temperature,
        **common,
    )
    return (dq[0] if ns == 1 else dq.sum(0)), dk


def norm_backward(x, inv, proj, du, scale, out):
    m, d = x.shape
    cfg = rt.NORM_BWD
    rt.launch(
        _norm_bwd_kernel,
        (rt.cdiv(m, cfg["BM"]),),
        x,
        x.stride(0),
        x.stride(1),
        inv,
        proj,
        du,
        scale,
        out,
        out.stride(0),
        out.stride(1),
        m,
        d,
        ACC=rt.tl_dtype(du.dtype),
        BM=cfg["BM"],
        BD=cfg["BD"],
        **rt.launch_opts(cfg.get("num_warps", 4), 1),
    )


def _scatter_rows(dq: torch.Tensor, rows: torch.Tensor, total: int, all_rows: bool) -> torch.Tensor:
    if all_rows:
        return dq
    out = torch.zeros((total, dq.shape[1]), dtype=dq.dtype, device=dq.device)
    return out.index_add_(0, rows.long(), dq)


# ---------------------------------------------------------------------------------------------------------------
# autograd functions


class NTXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_a, z_b, rows, all_rows: bool, temperature: float):
        acc = rt.acc_dtype(z_a, z_b)
        u = torch.cat([z_a, z_b])
        inv, proj = rownorm(u, acc)
        lse, tgt, posmax, negmax = lse_forward(u, inv, rows, u, inv, temperature, True, acc)
        loss = (lse - tgt).mean()
        accuracy = (posmax > negmax).to(acc).mean()
        ctx.mark_non_differentiable(accuracy)
        ctx.save_for_backward(u, inv, proj, rows, lse)
        ctx.temperature, ctx.all_rows, ctx.acc = temperature, all_rows, acc
        return loss, accuracy

    @staticmethod
    def backward(ctx, g_loss, _g_acc):
        u, inv, proj, rows, lse = ctx.saved_tensors
        acc, t = ctx.acc, ctx.temperature
        dq, dk = lse_backward(u, inv, rows, u, inv, lse, t, True, acc)
        if ctx.all_rows:
            du = dk.add_(dq)
        else:
            du = dk.index_add_(0, rows.long(), dq)
        scale = (g_loss.to(acc) / (rows.numel() * t)).reshape(1)
        dz = rt.empty(tuple(u.shape), u.dtype, u.device)
        norm_backward(u, inv, proj, du, scale, dz)
        n = u.shape[0] // 2
        return dz[:n], dz[n:], None, None, None


class CISSL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_a, s_b, t_a, t_b, rows, all_rows: bool, temperature: float):
        acc = rt.acc_dtype(s_a, s_b, t_a, t_b)
        s = torch.cat([s_a, s_b])
        t = torch.cat([t_a, t_b])
        s_inv, s_proj = rownorm(s, acc)
        t_inv, t_proj = rownorm(t, acc)
        lse, tgt, posmax, negmax = lse_forward(s, s_inv, rows, t, t_inv, temperature, False, acc)
        loss = (lse - tgt).mean()
        accuracy = (posmax > negmax).to(acc).mean()
        ctx.mark_non_differentiable(accuracy)
        ctx.save_for_backward(s, s_inv, s_proj, t, t_inv, t_proj, rows, lse)
        ctx.temperature, ctx.all_rows, ctx.acc = temperature, all_rows, acc
        return loss, accuracy

    @staticmethod
    def backward(ctx, g_loss, _g_acc):
        s, s_inv, s_proj, t, t_inv, t_proj, rows, lse = ctx.saved_tensors
        acc, temp = ctx.acc, ctx.temperature
        dq, dk = lse_backward(s, s_inv, rows, t, t_inv, lse, temp, False, acc)
        ds = _scatter_rows(dq, rows, s.shape[0], ctx.all_rows)
        scale = (g_loss.to(acc) / (rows.numel() * temp)).reshape(1)
        n = s.shape[0] // 2
        grads = []
        for x, inv, proj, du in ((s, s_inv, s_proj, ds), (t, t_inv, t_proj, dk)):
            dx = rt.empty(tuple(x.shape), x.dtype, x.device)
            norm_backward(x, inv, proj, du.contiguous(), scale, dx)
            grads += [dx[:n], dx[n:]]
        return (*grads, None, None, None)
