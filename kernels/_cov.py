"""Fused VICReg variance/covariance and Barlow Twins kernels (forward and hand-written backward).

Both losses are functions of column-standardised embeddings ``X = (z - mean) * scale`` (VICReg: scale 1;
Barlow Twins: scale ``1/sqrt(Var_biased + eps)``) through the D x D matrix ``C ~ X_a^T X_b``. No kernel
materialises X, an fp32 copy of z, or (when N is small) C: X tiles are rebuilt from z in registers.

* column statistics, :func:`_colstats_kernel`: one program per block of columns streams the rows twice (mean, then
  centred sums of squares and, for a pair, cross products) and writes the per-column quantities the loss needs:
  VICReg's variance, std and hinge ``relu(gamma - std)`` (so the variance term is fused with the statistics the
  covariance kernels use), Barlow's ``1/sigma`` and diagonal ``C_jj``.
* Gram regime (``2N <= D``), :func:`_gram_kernel`: ``sum_ij C_ij^2 = ||X_a^T X_b||_F^2 = <X_a X_a^T, X_b X_b^T>_F``;
  one program per upper-triangular tile pair of the (symmetric) N x N Gram matrices, reduction over D; the
  diagonal ``sum_j C_jj^2`` comes from the column statistics and is subtracted at the end in float64. The N x N
  Gram matrices (fp32) are kept for the backward pass.
* Feature regime (``2N > D``), :func:`_cross_kernel`: tiles of ``C`` (D x D) with the reduction over N and the
  diagonal masked inside the tile: no subtraction, hence no cancellation (the near-decorrelated case). VICReg's C
  is symmetric: only upper-triangular tiles are computed, off-diagonal ones stored twice. The masked C (fp32,
  D x D) and, for Barlow, its row / column sums of squares are kept for the backward pass.
* Backward, :func:`_mm_kernel`: ``dz = (coef * L @ R + X1 * d1 + X2 * d2) * s`` per (row, column) tile, the
  standardised operands rebuilt from z on the fly, so the only stored operand is the N x N or D x D matrix.
  VICReg needs no other pass: ``dL/dz_c = z_c M`` has zero column means, so the centring's Jacobian is the
  identity on it. Barlow's BatchNorm backward ``(g - mean(g) - A mean(g A)) / sigma`` needs ``mean_n(g A)``: in
  the feature regime it follows from the stored row / column sums of ``C_off^2`` (one pass); in the Gram regime a
  first pass writes g (N x D fp32) with per-block column sums and :func:`_bn_finish_kernel` completes it.

The threshold is ``2N <= D`` rather than ``N < D``: C has rank <= N-1, so with equal variances the off-diagonal
part is at least ``1 - (N-1)/D`` of ``||C||_F^2`` and the subtraction loses at most a factor ``D/(D-N+1)`` (<= 2 for
2N <= D, but up to D/2 as N approaches D), while the Gram regime's flop advantage (D/N) is below 2 there anyway.
Very unequal variances (a few dimensions dominating the diagonal) still amplify fp32 rounding in the Gram regime.

Matrix products take fp32 tiles (fp64 for fp64 inputs) with ``input_precision`` from
:func:`_runtime.dot_precision` ("tf32x3" on GPU: about fp32 accuracy on tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt

# ---------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is approximate for fp32 on NVIDIA; sqrt_rn has no fp64 form)."""
    if tl.float64 == ACC:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _colstats_kernel(
    za_ptr,
    s_an,
    s_ad,
    zb_ptr,
    s_bn,
    s_bd,
    mean_a_ptr,
    scale_a_ptr,
    mean_b_ptr,
    scale_b_ptr,
    v1_ptr,
    v2_ptr,
    v3_ptr,
    N,
    D,
    gamma,
    eps,
    PAIR: tl.constexpr,
    ACC: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    """Column statistics, two passes over the rows (mean, then centred sums) per block of columns.

    VICReg (not PAIR): mean, scale = 1, v1 = var (unbiased), v2 = std = sqrt(var + eps), v3 = relu(gamma - std).
    Barlow Twins (PAIR): mean_a/b, scale_a/b = 1 / sqrt(var_biased + eps), v1 = C_jj = mean_n(A_nj B_nj)."""
    pid = tl.program_id(0)
    cols = pid * BD + tl.arange(0, BD)
    cmask = cols < D
    c64 = cols.to(tl.int64)[None, :]
    acc_a = tl.zeros((BN, BD), dtype=ACC)
    acc_b = tl.zeros((BN, BD), dtype=ACC)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)
        m = (rows < N)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        acc_a += tl.load(za_ptr + r64 * s_an + c64 * s_ad, mask=m, other=0.0).to(ACC)
        if PAIR:
            acc_b += tl.load(zb_ptr + r64 * s_bn + c64 * s_bd, mask=m, other=0.0).to(ACC)
    mean_a = tl.sum(acc_a, axis=0) / N
    mean_b = tl.sum(acc_b, axis=0) / N
    sq_a = tl.zeros((BN, BD), dtype=ACC)
    sq_b = tl.zeros((BN, BD), dtype=ACC)
    cr = tl.zeros((BN, BD), dtype=ACC)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)
        m = (rows < N)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        a = tl.load(za_ptr + r64 * s_an + c64 * s_ad, mask=m, other=0.0).to(ACC)
        a = tl.where(m, a - mean_a[None, :], 0.0)
        sq_a += a * a
        if PAIR:
            b = tl.load(zb_ptr + r64 * s_bn + c64 * s_bd, mask=m, other=0.0).to(ACC)
            b = tl.where(m, b - mean_b[None, :], 0.0)
            sq_b += b * b
            cr += a * b
    tl.store(mean_a_ptr + cols, mean_a, mask=cmask)
    if PAIR:
        inv_a = 1.0 / _sqrt(tl.sum(sq_a, axis=0) / N + eps, ACC)
        inv_b = 1.0 / _sqrt(tl.sum(sq_b, axis=0) / N + eps, ACC)
        tl.store(scale_a_ptr + cols, inv_a, mask=cmask)
        tl.store(mean_b_ptr + cols, mean_b, mask=cmask)
        tl.store(scale_b_ptr + cols, inv_b, mask=cmask)
        tl.store(v1_ptr + cols, tl.sum(cr, axis=0) * inv_a * inv_b / N, mask=cmask)
    else:
        var = tl.sum(sq_a, axis=0) / (N - 1)
        std = _sqrt(var + eps, ACC)
        tl.store(scale_a_ptr + cols, tl.full((BD,), 1.0, ACC), mask=cmask)
        tl.store(v1_ptr + cols, var, mask=cmask)
        tl.store(v2_ptr + cols, std, mask=cmask)
        tl.store(v3_ptr + cols, tl.maximum(gamma - std, 0.0), mask=cmask)


@triton.jit
def _load_std_rows(z_ptr, s_n, s_d, mean_ptr, scale_ptr, rows, ks, N, D, ACC: tl.constexpr):
    """Tile (rows x ks) of (z - mean[ks]) * scale[ks], zero outside the matrix."""
    km = ks < D
    m = (rows < N)[:, None] & km[None, :]
    x = tl.load(z_ptr + rows.to(tl.int64)[:, None] * s_n + ks.to(tl.int64)[None, :] * s_d, mask=m, other=0.0).to(ACC)
    mu = tl.load(mean_ptr + ks, mask=km, other=0.0)
    sc = tl.load(scale_ptr + ks, mask=km, other=0.0)
    return tl.where(m, (x - mu[None, :]) * sc[None, :], 0.0)


@triton.jit
def _gram_kernel(
    za_ptr,
    s_an,
    s_ad,
    ma_ptr,
    sa_ptr,
    zb_ptr,
    s_bn,
    s_bd,
    mb_ptr,
    sb_ptr,
    ga_ptr,
    gb_ptr,
    s_gm,
    s_gn,
    part_ptr,
    ti_ptr,
    tj_ptr,
    N,
    D,
    PAIR: tl.constexpr,
    STORE: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    """Tile (ti, tj), ti <= tj, of G_a = X_a X_a^T (and G_b); writes sum(G_a * G_b) (or sum G_a^2) over the tile,
    doubled off the diagonal, to part[pid]; with STORE, writes the tile and its mirror image to G."""
    pid = tl.program_id(0)
    ti = tl.load(ti_ptr + pid)
    tj = tl.load(tj_ptr + pid)
    ri = ti * BM + tl.arange(0, BM)
    rj = tj * BM + tl.arange(0, BM)
    acc_a = tl.zeros((BM, BM), dtype=ACC)
    acc_b = tl.zeros((BM, BM), dtype=ACC)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        xi = _load_std_rows(za_ptr, s_an, s_ad, ma_ptr, sa_ptr, ri, ks, N, D, ACC)
        xj = _load_std_rows(za_ptr, s_an, s_ad, ma_ptr, sa_ptr, rj, ks, N, D, ACC)
        acc_a = tl.dot(xi, tl.trans(xj), acc_a, input_precision=PREC, out_dtype=ACC)
        if PAIR:
            yi = _load_std_rows(zb_ptr, s_bn, s_bd, mb_ptr, sb_ptr, ri, ks, N, D, ACC)
            yj = _load_std_rows(zb_ptr, s_bn, s_bd, mb_ptr, sb_ptr, rj, ks, N, D, ACC)
            acc_b = tl.dot(yi, tl.trans(yj), acc_b, input_precision=PREC, out_dtype=ACC)
    if PAIR:
        val = acc_a * acc_b
    else:
        val = acc_a * acc_a
    total = tl.sum(tl.sum(val, axis=1), axis=0)
    total = tl.where(ti == tj, total, 2.0 * total)
    tl.store(part_ptr + pid, total)
    if STORE:
        m = (ri < N)[:, None] & (rj < N)[None, :]
        off = ri.to(tl.int64)[:, None] * s_gm + rj.to(tl.int64)[None, :] * s_gn
        mirror = ri.to(tl.int64)[:, None] * s_gn + rj.to(tl.int64)[None, :] * s_gm
        tl.store(ga_ptr + off, acc_a, mask=m)
        tl.store(ga_ptr + mirror, acc_a, mask=m & (ti != tj))
        if PAIR:
            tl.store(gb_ptr + off, acc_b, mask=m)
            tl.store(gb_ptr + mirror, acc_b, mask=m & (ti != tj))


@triton.jit
def _load_std_cols(z_ptr, s_n, s_d, mean_ptr, scale_ptr, rows, cols, N, D, ACC: tl.constexpr):
    """Same as _load_std_rows; separate name for readability (rows are the reduction index here)."""
    return _load_std_rows(z_ptr, s_n, s_d, mean_ptr, scale_ptr, rows, cols, N, D, ACC)


@triton.jit
def _cross_kernel(
    za_ptr,
    s_an,
    s_ad,
    ma_ptr,
    sa_ptr,
    zb_ptr,
    s_bn,
    s_bd,
    mb_ptr,
    sb_ptr,
    c_ptr,
    s_cm,
    s_cn,
    part_ptr,
    rowsq_ptr,
    colsq_ptr,
    ti_ptr,
    tj_ptr,
    N,
    D,
    scale,
    PAIR: tl.constexpr,
    SYM: tl.constexpr,
    STORE: tl.constexpr,
    ROWCOL: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BD: tl.constexpr,
    BK: tl.constexpr,
):
    """Tile (ti, tj) of C = scale * X_a^T X_b (X_b = X_a unless PAIR), diagonal masked to 0. Writes sum C^2 over the
    tile (doubled for an off-diagonal tile when SYM) to part[pid]; with ROWCOL the tile's row sums of C^2 to
    rowsq[tj, rows] and column sums to colsq[ti, cols]; with STORE the masked tile (and its mirror when SYM)."""
    pid = tl.program_id(0)
    ti = tl.load(ti_ptr + pid)
    tj = tl.load(tj_ptr + pid)
    ci = ti * BD + tl.arange(0, BD)
    cj = tj * BD + tl.arange(0, BD)
    acc = tl.zeros((BD, BD), dtype=ACC)
    for n0 in range(0, N, BK):
        rows = n0 + tl.arange(0, BK)
        xi = _load_std_cols(za_ptr, s_an, s_ad, ma_ptr, sa_ptr, rows, ci, N, D, ACC)
        if PAIR:
            xj = _load_std_cols(zb_ptr, s_bn, s_bd, mb_ptr, sb_ptr, rows, cj, N, D, ACC)
        else:
            xj = _load_std_cols(za_ptr, s_an, s_ad, ma_ptr, sa_ptr, rows, cj, N, D, ACC)
        acc = tl.dot(tl.trans(xi), xj, acc, input_precision=PREC, out_dtype=ACC)
    c = acc * scale
    c = tl.where(ci[:, None] == cj[None, :], 0.0, c)
    c2 = c * c
    total = tl.sum(tl.sum(c2, axis=1), axis=0)
    if SYM:
        total = tl.where(ti == tj, total, 2.0 * total)
    tl.store(part_ptr + pid, total)
    if ROWCOL:
        tl.store(rowsq_ptr + tj.to(tl.int64) * D + ci, tl.sum(c2, axis=1), mask=ci < D)
        tl.store(colsq_ptr + ti.to(tl.int64) * D + cj, tl.sum(c2, axis=0), mask=cj < D)
    if STORE:
        m = (ci < D)[:, None] & (cj < D)[None, :]
        tl.store(c_ptr + ci.to(tl.int64)[:, None] * s_cm + cj.to(tl.int64)[None, :] * s_cn, c, mask=m)
        if SYM:
            mirror = ci.to(tl.int64)[:, None] * s_cn + cj.to(tl.int64)[None, :] * s_cm
            tl.store(c_ptr + mirror, c, mask=m & (ti != tj))


@triton.jit
def _mm_kernel(
    l_ptr,
    s_lm,
    s_lk,
    lmean_ptr,
    lscale_ptr,
    r_ptr,
    s_rk,
    s_rn,
    rmean_ptr,
    rscale_ptr,
    coef_ptr,
    x1_ptr,
    s_x1m,
    s_x1n,
    x1mean_ptr,
    x1scale_ptr,
    d1_ptr,
    x2_ptr,
    s_x2m,
    s_x2n,
    x2mean_ptr,
    x2scale_ptr,
    d2_ptr,
    oscale_ptr,
    out_ptr,
    s_om,
    s_on,
    psum_ptr,
    pdot_ptr,
    M,
    NC,
    K,
    L_IS_Z: tl.constexpr,
    R_IS_Z: tl.constexpr,
    HAS_X2: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """out[rows, cols] = coef * (L @ R) + X1 * d1[cols]                        (STATS: kept for a second pass,
                                                                               with per-row-block column sums of
                                                                               out and of out * X2)
       out[rows, cols] = (coef * (L @ R) + X1 * d1[cols] + X2 * d2[cols]) * oscale[cols]     (otherwise)

    L (M x K) is a stored matrix or, with L_IS_Z, a standardised z (columns = K); R (K x NC) likewise, standardised
    over its columns with R_IS_Z. X1 and X2 are standardised z tiles at [rows, cols]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < NC
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        if L_IS_Z:
            lt = _load_std_rows(l_ptr, s_lm, s_lk, lmean_ptr, lscale_ptr, rows, ks, M, K, ACC)
        else:
            lm = rmask[:, None] & (ks < K)[None, :]
            lt = tl.load(
                l_ptr + rows.to(tl.int64)[:, None] * s_lm + ks.to(tl.int64)[None, :] * s_lk, mask=lm, other=0.0
            ).to(ACC)
        if R_IS_Z:
            rt_ = _load_std_rows(r_ptr, s_rk, s_rn, rmean_ptr, rscale_ptr, ks, cols, K, NC, ACC)
        else:
            rm = (ks < K)[:, None] & cmask[None, :]
            rt_ = tl.load(
                r_ptr + ks.to(tl.int64)[:, None] * s_rk + cols.to(tl.int64)[None, :] * s_rn, mask=rm, other=0.0
            ).to(ACC)
        acc = tl.dot(lt, rt_, acc, input_precision=PREC, out_dtype=ACC)
    coef = tl.load(coef_ptr).to(ACC)
    x1 = _load_std_rows(x1_ptr, s_x1m, s_x1n, x1mean_ptr, x1scale_ptr, rows, cols, M, NC, ACC)
    d1 = tl.load(d1_ptr + cols, mask=cmask, other=0.0)
    out = acc * coef + x1 * d1[None, :]
    m = rmask[:, None] & cmask[None, :]
    o_off = rows.to(tl.int64)[:, None] * s_om + cols.to(tl.int64)[None, :] * s_on
    if STATS:
        tl.store(out_ptr + o_off, out, mask=m)
        outm = tl.where(m, out, 0.0)
        x2 = _load_std_rows(x2_ptr, s_x2m, s_x2n, x2mean_ptr, x2scale_ptr, rows, cols, M, NC, ACC)
        p_off = pid_m.to(tl.int64) * NC + cols
        tl.store(psum_ptr + p_off, tl.sum(outm, axis=0), mask=cmask)
        tl.store(pdot_ptr + p_off, tl.sum(outm * x2, axis=0), mask=cmask)
    else:
        if HAS_X2:
            x2 = _load_std_rows(x2_ptr, s_x2m, s_x2n, x2mean_ptr, x2scale_ptr, rows, cols, M, NC, ACC)
            d2 = tl.load(d2_ptr + cols, mask=cmask, other=0.0)
            out = out + x2 * d2[None, :]
        osc = tl.load(oscale_ptr + cols, mask=cmask, other=0.0)
        out = out * osc[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_finish_kernel(
    g_ptr,
    s_gm,
    s_gn,
    z_ptr,
    s_zm,
    s_zn,
    mean_ptr,
    scale_ptr,
    gmean_ptr,
    r_ptr,
    out_ptr,
    s_om,
    s_on,
    M,
    NC,
    ACC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """BatchNorm backward: out = (g - gmean[cols] - X * r[cols]) * scale[cols], X = (z - mean) * scale."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cmask = cols < NC
    m = (rows < M)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    g = tl.load(g_ptr + r64 * s_gm + c64 * s_gn, mask=m, other=0.0)
    x = _load_std_rows(z_ptr, s_zm, s_zn, mean_ptr, scale_ptr, rows, cols, M, NC, ACC)
    gm = tl.load(gmean_ptr + cols, mask=cmask, other=0.0)
    r = tl.load(r_ptr + cols, mask=cmask, other=0.0)
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    out = (g - gm[None, :] - x * r[None, :]) * sc[None, :]
    tl.store(out_ptr + r64 * s_om + c64 * s_on, out.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# launchers

_TRIU_CACHE: dict[tuple[int, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _tiles(nt: int, device: torch.device, upper: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (nt, str(device), upper)
    if key not in _TRIU_CACHE:
        if upper:
            idx = torch.triu_indices(nt, nt, device=device)
        else:
            ar = torch.arange(nt, device=device)
            idx = torch.stack(torch.meshgrid(ar, ar, indexing="ij")).reshape(2, -1)
        _TRIU_CACHE[key] = (idx[0].to(torch.int32).contiguous(), idx[1].to(torch.int32).contiguous())
    return _TRIU_CACHE[key]


def gram_regime(n: int, d: int) -> bool:
    """N x N Gram matrices when 2N <= D, tiled D x D otherwise (see the module docstring)."""
    return 2 * n <= d


def colstats(z_a: torch.Tensor, z_b: torch.Tensor | None, acc: torch.dtype, gamma: float = 0.0, eps: float = 0.0):
    """VICReg (z_b None): (mean, ones, var, std, hinge); Barlow Twins: (mean_a, inv_a, mean_b, inv_b, C_diag)."""
    n, d = z_a.shape
    dev = z_a.device
    pair = z_b is not None
    vecs = [rt.empty((d,), acc, dev) for _ in range(5)]
    if z_b is not None:
        mean_a, scale_a, mean_b, scale_b, v1 = vecs
        v2 = v3 = v1
    else:
        mean_a, scale_a, v1, v2, v3 = vecs
        z_b, mean_b, scale_b = z_a, mean_a, scale_a
    cfg = rt.COLSTATS
    rt.launch(
        _colstats_kernel,
        (rt.cdiv(d, cfg["BD"]),),
        z_a,
        z_a.stride(0),
        z_a.stride(1),
        z_b,
        z_b.stride(0),
        z_b.stride(1),
        mean_a,
        scale_a,
        mean_b,
        scale_b,
        v1,
        v2,
        v3,
        n,
        d,
        float(gamma),
        float(eps),
        PAIR=pair,
        ACC=rt.tl_dtype(acc),
        BN=cfg["BN"],
        BD=cfg["BD"],
        **rt.launch_opts(cfg.get("num_warps", 4), 1),
    )
    return vecs


def gram(z_a, mean_a, scale_a, z_b, mean_b, scale_b, acc: torch.dtype, store: bool):
    """sum(G_a * G_b) (float64 scalar tensor) and, with store, G_a and G_b (N x N, acc dtype)."""
    n, d = z_a.shape
    dev = z_a.device
    pair = z_b is not None
    cfg = rt.GRAM_PAIR if pair else rt.GRAM
    bm = cfg["BM"]
    ti, tj = _tiles(rt.cdiv(n, bm), dev, upper=True)
    part = rt.empty((ti.numel(),), acc, dev)
    g_a = rt.empty((n, n), acc, dev) if store else part
    g_b = rt.empty((n, n), acc, dev) if (store and pair) else g_a
    if not pair:
        z_b, mean_b, scale_b = z_a, mean_a, scale_a
    rt.launch(
        _gram_kernel,
        (ti.numel(),),
        z_a,
        z_a.stride(0),
        z_a.stride(1),
        mean_a,
        scale_a,
        z_b,
        z_b.stride(0),
        z_b.stride(1),
        mean_b,
        scale_b,
        g_a,
        g_b,
        n,
        1,
        part,
        ti,
        tj,
        n,
        d,
        PAIR=pair,
        STORE=store,
        ACC=rt.tl_dtype(acc),
        PREC=rt.dot_precision(acc),
        BM=bm,
        BK=cfg["BK"],
        **rt.launch_opts(cfg.get("num_warps", 4)),
    )
    total = part.to(torch.float64).sum()
    return total, (g_a if store else None), (g_b if (store and pair) else None)


def cross(z_a, mean_a, scale_a, z_b, mean_b, scale_b, acc: torch.dtype, scale: float, store: bool, rowcol: bool):
    """sum_{i != j} C_ij^2 (float64 scalar tensor) of C = scale * X_a^T X_b, and optionally the diagonal-masked C
    (D x D) and the row / column sums of C_offdiag^2 (D each)."""
    n, d = z_a.shape
    dev = z_a.device
    pair = z_b is not None
    sym = not pair
    cfg = rt.CROSS
    bd = cfg["BD"]
    nt = rt.cdiv(d, bd)
    ti, tj = _tiles(nt, dev, upper=sym)
    part = rt.empty((ti.numel(),), acc, dev)
    c = rt.empty((d, d), acc, dev) if store else part
    rowsq = rt.empty((nt, d), acc, dev) if rowcol else part
    colsq = rt.empty((nt, d), acc, dev) if rowcol else part
    if not pair:
        z_b, mean_b, scale_b = z_a, mean_a, scale_a
    rt.launch(
        _cross_kernel,
        (ti.numel(),),
        z_a,
        z_a.stride(0),
        z_a.stride(1),
        mean_a,
        scale_a,
        z_b,
        z_b.stride(0),
        z_b.stride(1),
        mean_b,
        scale_b,
        c,
        d,
        1,
        part,
        rowsq,
        colsq,
        ti,
        tj,
        n,
        d,
        scale,
        PAIR=pair,
        SYM=sym,
        STORE=store,
        ROWCOL=rowcol,
        ACC=rt.tl_dtype(acc),
        PREC=rt.dot_precision(acc),
        BD=bd,
        BK=cfg["BK"],
        **rt.launch_opts(cfg.get("num_warps", 4)),
    )
    total = part.to(torch.float64).sum()
    rows = rowsq.sum(0) if rowcol else None
    cols = colsq.sum(0) if rowcol else None
    return total, (c if store else None), rows, cols


def mm(out, left, right, coef, x1, x2, oscale, acc, stats=False):
    """Launch _mm_kernel. ``left``/``right`` are ("z", z, mean, scale) or ("mat", matrix) with the matrix's
    (row, column) orientation given by its strides; x1/x2 are (z, mean, scale, d). Returns (psum, pdot) with STATS."""
    m, nc = out.shape
    dev = out.device
    cfg = rt.MM
    bm, bn = cfg["BM"], cfg["BN"]
    if left[0] == "z":
        _, lz, lmean, lscale = left
        l_args, k = (lz, lz.stride(0), lz.stride(1), lmean, lscale), lz.shape[1]
    else:
        lmat = left[1]
        l_args, k = (lmat, lmat.stride(0), lmat.stride(1), lmat, lmat), lmat.shape[1]
    if right[0] == "z":
        _, rz, rmean, rscale = right
        r_args = (rz, rz.stride(0), rz.stride(1), rmean, rscale)
    else:
        rmat = right[1]
        r_args = (rmat, rmat.stride(0), rmat.stride(1), rmat, rmat)
    z1, mean1, scale1, d1 = x1
    z2, mean2, scale2, d2 = x2
    nrb = rt.cdiv(m, bm)
    if stats:
        psum, pdot = rt.empty((nrb, nc), acc, dev), rt.empty((nrb, nc), acc, dev)
    else:
        psum = pdot = d1
    has_x2 = d2 is not None
    if d2 is None:
        d2 = d1
    if oscale is None:
        oscale = d1
    rt.launch(
        _mm_kernel,
        (nrb, rt.cdiv(nc, bn)),
        *l_args,
        *r_args,
        coef,
        z1,
        z1.stride(0),
        z1.stride(1),
        mean1,
        scale1,
        d1,
        z2,
        z2.stride(0),
        z2.stride(1),
        mean2,
        scale2,
        d2,
        oscale,
        out,
        out.stride(0),
        out.stride(1),
        psum,
        pdot,
        m,
        nc,
        k,
        L_IS_Z=left[0] == "z",
        R_IS_Z=right[0] == "z",
        HAS_X2=has_x2,
        STATS=stats,
        ACC=rt.tl_dtype(acc),
        PREC=rt.dot_precision(acc),
        BM=bm,
        BN=bn,
        BK=cfg["BK"],
        **rt.launch_opts(cfg.get("num_warps", 4)),
    )
    return (psum, pdot) if stats else None


def bn_finish(out, g, z, mean, scale, gmean, r, acc):
    m, nc = out.shape
    cfg = rt.ELEMWISE
    rt.launch(
        _bn_finish_kernel,
        (rt.cdiv(m, cfg["BM"]), rt.cdiv(nc, cfg["BN"])),
        g,
        g.stride(0),
        g.stride(1),
        z,
        z.stride(0),
        z.stride(1),
        mean,
        scale,
        gmean,
        r,
        out,
        out.stride(0),
        out.stride(1),
        m,
        nc,
        ACC=rt.tl_dtype(acc),
        BM=cfg["BM"],
        BN=cfg["BN"],
        **rt.launch_opts(cfg.get("num_warps", 4), 1),
    )


# ---------------------------------------------------------------------------------------------------------------
# autograd functions


class VICRegRegularizer(torch.autograd.Function):
    """(variance_hinge(z), covariance_offdiag(z)) of one branch."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, gamma: float, eps: float, force_gram: bool | None = None, want_grad: bool = True):
        n, d = z.shape
        acc = rt.acc_dtype(z)
        store = want_grad and ctx.needs_input_grad[0]  # want_grad: grad mode was on at the call
        mean, ones, var, std, hinge = colstats(z, None, acc, gamma, eps)
        variance = hinge.mean()
        use_gram = gram_regime(n, d) if force_gram is None else force_gram
        if use_gram:
            total, g, _ = gram(z, mean, ones, None, None, None, acc, store)
            diag = var.to(torch.float64).pow(2).sum()
            covariance = (total / float(n - 1) ** 2 - diag) / d
            saved = g
        else:
            total, c, _, _ = cross(z, mean, ones, None, None, None, acc, 1.0 / (n - 1), store, rowcol=False)
            covariance = total / d
            saved = c
        ctx.gamma, ctx.use_gram, ctx.acc = gamma, use_gram, acc
        if store:
            ctx.save_for_backward(z, mean, ones, var, std, saved)
        return variance.to(acc), covariance.to(acc)

    @staticmethod
    def backward(ctx, g_var: torch.Tensor, g_cov: torch.Tensor):
        z, mean, ones, var, std, saved = ctx.saved_tensors
        n, d = z.shape
        acc = ctx.acc
        g_var, g_cov = g_var.to(acc), g_cov.to(acc)
        # d variance / d z_c[:, j] = -1[std_j < gamma] z_c[:, j] / (D (N-1) std_j)
        alpha = -g_var * ((ctx.gamma - std) > 0).to(acc) / (d * (n - 1) * std)
        left: tuple[object, ...]  # a stored matrix, or z rebuilt as X = (z - mean) * scale
        right: tuple[object, ...]
        if ctx.use_gram:
            # 4/(D (N-1)^2) * (z_c (z_c^T z_c) - z_c diag(s)),  z_c (z_c^T z_c) = G z_c,  s_j = (N-1) var_j
            alpha = alpha - 4.0 * g_cov * var / (d * (n - 1))
            coef = (4.0 * g_cov / (d * float(n - 1) ** 2)).reshape(1)
            left, right = ("mat", saved), ("z", z, mean, ones)
        else:
            # 4/(D (N-1)) * z_c C_offdiag with C_offdiag stored
            coef = (4.0 * g_cov / (d * (n - 1))).reshape(1)
            left, right = ("z", z, mean, ones), ("mat", saved)
        dz = rt.empty(tuple(z.shape), z.dtype, z.device)
        # The gradient w.r.t. z_c is z_c times a matrix, so its column means are 0: the centring's Jacobian
        # (I - 11^T/N) leaves it unchanged and the kernel writes it as the gradient w.r.t. z.
        mm(dz, left, right, coef, (z, mean, ones, alpha.contiguous()), (z, mean, ones, None), ones, acc)
        return dz, None, None, None, None


class BarlowTwins(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        lambd: float,
        eps: float,
        force_gram: bool | None = None,
        want_grad: bool = True,
    ):
        n, d = z_a.shape
        acc = rt.acc_dtype(z_a, z_b)
        store = want_grad and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        mean_a, inv_a, mean_b, inv_b, cdiag = colstats(z_a, z_b, acc, eps=eps)
        on_diag = (1 - cdiag).pow(2).sum()
        use_gram = gram_regime(n, d) if force_gram is None else force_gram
        if use_gram:
            total, g_a, g_b = gram(z_a, mean_a, inv_a, z_b, mean_b, inv_b, acc, store)
            off_diag = total / float(n) ** 2 - cdiag.to(torch.float64).pow(2).sum()
            saved = (g_a, g_b, cdiag)
        else:
            total, c, rowsq, colsq = cross(z_a, mean_a, inv_a, z_b, mean_b, inv_b, acc, 1.0 / n, store, rowcol=store)
            off_diag = total
            saved = (c, rowsq, colsq)
        off_diag = off_diag.to(acc)
        loss = on_diag + lambd * off_diag
        ctx.lambd, ctx.use_gram, ctx.acc = lambd, use_gram, acc
        if store:
            ctx.save_for_backward(z_a, z_b, mean_a, mean_b, inv_a, inv_b, cdiag, *saved)
        return loss, on_diag, off_diag

    @staticmethod
    def backward(ctx, g_loss, g_on, g_off):
        z_a, z_b, mean_a, mean_b, inv_a, inv_b, cdiag, *saved = ctx.saved_tensors
        n, d = z_a.shape
        acc = ctx.acc
        # L = w_on * on_diag + w_off * off_diag;  dL/dC = Gamma = 2 w_off C_off - diag(2 w_on (1 - C_jj))
        w_on = (g_loss + g_on).to(acc)
        w_off = (g_loss * ctx.lambd + g_off).to(acc)
        a_side = (z_a, mean_a, inv_a)
        b_side = (z_b, mean_b, inv_b)
        dz_a = rt.empty(tuple(z_a.shape), z_a.dtype, z_a.device)
        dz_b = rt.empty(tuple(z_b.shape), z_b.dtype, z_b.device)
        if ctx.use_gram:
            # dL/dA = B Gamma^T / N = (2 w_off / N^2) G_b A + B diag(delta) / N,
            # delta_j = -2 w_on (1 - C_jj) - 2 w_off C_jj (G_b A holds the diagonal of C too)
            g_a, g_b, _ = saved
            delta = (-2.0 * w_on * (1 - cdiag) - 2.0 * w_off * cdiag) / n
            coef = (2.0 * w_off / float(n) ** 2).reshape(1)
            tmp = rt.empty((n, d), acc, z_a.device)
            for out, own, other, g_other in ((dz_a, a_side, b_side, g_b), (dz_b, b_side, a_side, g_a)):
                psum, pdot = mm(
                    tmp, ("mat", g_other), ("z", *own), coef, (*other, delta), (*own, None), None, acc, stats=True
                )
                gmean = psum.sum(0) / n
                r = pdot.sum(0) / n
                bn_finish(out, tmp, own[0], own[1], own[2], gmean, r, acc)
        else:
            # dL/dA = (2 w_off / N) B C_off^T + B diag(delta) / N,  delta_j = -2 w_on (1 - C_jj);
            # BatchNorm backward needs r_j = mean_n(A_nj dL/dA_nj) = (2 w_off rowsq_j + delta_j C_jj) / N, known
            # from the forward's row (column) sums of C_off^2, so one pass writes dz. mean_n(dL/dA) is 0.
            c, rowsq, colsq = saved
            delta = -2.0 * w_on * (1 - cdiag)
            coef = (2.0 * w_off / n).reshape(1)
            r_a = (2.0 * w_off * rowsq + delta * cdiag) / n
            r_b = (2.0 * w_off * colsq + delta * cdiag) / n
            mm(dz_a, ("z", *b_side), ("mat", c.t()), coef, (*b_side, delta / n), (*a_side, -r_a), inv_a, acc)
            mm(dz_b, ("z", *a_side), ("mat", c), coef, (*a_side, delta / n), (*b_side, -r_b), inv_b, acc)
        return dz_a, dz_b, None, None, None, None
