"""Triton kernels of the DeferredSeg objective (docs/objective.md section 3) and its gradient.

The two ops implement the contract of :mod:`deferredseg_kernels.ops.fused` (read it
first: the layout of ``stats``, ``fparams``, ``iparams`` and ``terms``):

``deferredseg_triton::loss_stats``
    ``_stats_kernel``: one program per block of pixels of one image reads the
    routing channels and the labels and writes its partial sums (sum of pi_k over
    valid pixels, N_V, the class-weight mass W, valid neighbour pairs per axis,
    out-of-range labels) to its own slot of a buffer; ``_chunk_sum_kernel`` (many
    programs, each a fixed run of slots) and ``_reduce_kernel`` (one program) then
    add the slots in a fixed order in float64. No atomics: the same inputs give the
    same bits.

``deferredseg_triton::loss_fused``
    ``_loss_kernel``: one pass computing every term of docs/objective.md section 3 per pixel and,
    when ``COMPUTE_GRAD``, the gradient of the total loss with respect to every
    packed channel, written once per pixel into its own buffer (in the logits'
    memory format). Spatial coherence pairs a pixel with its neighbours: the
    gradient is computed in *gather* form, each pixel recomputing the deferral
    mass D and gate probability s of its (up to 6) neighbours from their logits, so
    no pixel is written by two programs and no halo exchange is needed. The
    normalisers (1/N_V, 1/W, 1/pairs) and the balance gradient come from ``stats``
    and are recomputed by every program (a few scalar operations). Per-program
    partial sums of the terms are reduced in a fixed order by ``_chunk_sum_kernel``
    and ``_finalize_kernel``, which also forms ``terms``.

Spatial shapes of 1 to 3 dims are flattened to P pixels (``(B, C, P)`` views when
the strides allow, one contiguous copy otherwise); the kernels get the strides, so
channel slices and channels-last inputs are read in place. All index arithmetic
is int64. Accumulation is float32 (float64 for float64 logits).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..types import LOGITS_DTYPES
from . import fused
from .triton_common import (
    INTERPRET,
    acc_dtype,
    argmax_first,
    can_merge,
    define_op,
    flat,
    launcher,
    load_channels,
    next_pow2,
    pixel_block,
    router_softmax,
    sigmoid,
    softplus,
    store_as,
    to_acc,
)

STATS_OP = "deferredseg_triton::loss_stats"
LOSS_OP = "deferredseg_triton::loss_fused"
N_PART = 9  # seg, collab, gate, coherence(router) x 3 axes, coherence(gate) x 3 axes
_REDUCE_ROWS = 4096  # elements of a reduction tile
_CHUNK_ITERS = 16  # tiles per program of the first reduction level
# The stats layout of ops/fused.py (entry E + offset), as constexpr globals: the only
# globals a compiled kernel may read, and their values enter the kernels' cache key.
_STAT_COUNT = tl.constexpr(fused.STAT_COUNT)
_STAT_WEIGHT = tl.constexpr(fused.STAT_WEIGHT)
_STAT_PAIRS = tl.constexpr(fused.STAT_PAIRS)
_STAT_BAD = tl.constexpr(fused.STAT_BAD)
_STAT_BALANCE_COUNT = tl.constexpr(fused.STAT_BALANCE_COUNT)


# ----------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------


@triton.jit
def _pixel_coords(p, S1, S2, NDIM: tl.constexpr):
    """Spatial coordinates (i0, i1, i2) of flat pixel indices (trailing axes size 1)."""
    if NDIM == 1:
        return p, p * 0, p * 0
    elif NDIM == 2:
        return p // S1, p % S1, p * 0
    else:
        i2 = p % S2
        rest = p // S2
        return rest // S1, rest % S1, i2


@triton.jit
def _stats_kernel(
    x_ptr,
    t_ptr,
    l_ptr,
    cw_ptr,
    part_ptr,
    P,
    S0,
    S1,
    S2,
    n_tiles,
    n_prog,
    nlab,
    ignore_index,
    sxb,
    sxc,
    sxp,
    stb,
    stp,
    slb,
    sle,
    slp,
    K: tl.constexpr,
    E: tl.constexpr,
    RP: tl.constexpr,
    NDIM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CHECK_EXPERTS: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tiles
    p = (pid - b * n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pm = p < P
    x_row = x_ptr + b * sxb
    t_row = t_ptr + b * stb

    y = tl.load(t_row + p * stp, mask=pm, other=0).to(tl.int64)
    valid = pm & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= nlab))
    yc = tl.minimum(tl.maximum(y, 0), nlab - 1)  # never index with an out-of-range label

    kr = tl.arange(0, RP).to(tl.int64)
    r = load_channels(x_row, K, kr, E + 1, p * sxp, pm, sxc, IS_FP64)
    _, ex, total, _ = router_softmax(r, kr, E)
    pi = ex / total[None, :]
    psum = tl.sum(tl.where(valid[None, :], pi, 0.0), axis=1)
    tl.store(part_ptr + kr * n_prog + pid, psum, mask=kr < E + 1)

    vf = valid.to(psum.dtype)
    if HAS_WEIGHT:
        w = to_acc(tl.load(cw_ptr + yc, mask=valid, other=0.0), IS_FP64)
    else:
        w = vf
    tl.store(part_ptr + (E + _STAT_COUNT) * n_prog + pid, tl.sum(vf, axis=0))
    tl.store(part_ptr + (E + _STAT_WEIGHT) * n_prog + pid, tl.sum(tl.where(valid, w, 0.0), axis=0))

    # Valid neighbour pairs (p, p + e_d) per spatial axis d.
    i0, i1, i2 = _pixel_coords(p, S1, S2, NDIM)
    for d in tl.static_range(3):
        if d < NDIM:
            if d == 0:
                inside = valid & (i0 + 1 < S0)
                q = p + S1 * S2
            elif d == 1:
                inside = valid & (i1 + 1 < S1)
                q = p + S2
            else:
                inside = valid & (i2 + 1 < S2)
                q = p + 1
            yq = tl.load(t_row + q * stp, mask=inside, other=0).to(tl.int64)
            pairs = tl.sum((inside & (yq != ignore_index)).to(psum.dtype), axis=0)
        else:
            pairs = tl.sum(vf * 0.0, axis=0)
        tl.store(part_ptr + (E + _STAT_PAIRS + d) * n_prog + pid, pairs)

    nbad = tl.sum(bad.to(psum.dtype), axis=0)
    if CHECK_EXPERTS:
        ecm = kr < E
        lab = tl.load(
            l_ptr + b * slb + kr[:, None] * sle + (p * slp)[None, :],
            mask=ecm[:, None] & pm[None, :],
            other=0,
        ).to(tl.int64)
        lbad = ecm[:, None] & pm[None, :] & (lab != ignore_index) & ((lab < 0) | (lab >= nlab))
        nbad += tl.sum(tl.sum(lbad.to(psum.dtype), axis=1), axis=0)
    tl.store(part_ptr + (E + _STAT_BAD) * n_prog + pid, nbad)


@triton.jit
def _chunk_sum_kernel(
    part_ptr,
    out_ptr,
    n_rows,
    n_chunks,
    n_cols,
    NCP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ITERS: tl.constexpr,
):
    """First reduction level: program i adds rows [i * ITERS * BLOCK_R, ...) of every
    column of ``part`` ([n_cols, n_rows]) in float64, always in the same order, into
    ``out[c, i]`` ([n_cols, n_chunks]). Many programs, so large grids reduce fast."""
    pid = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NCP).to(tl.int64)
    cmask = c < n_cols
    acc = tl.zeros([NCP, BLOCK_R], dtype=tl.float64)
    start = pid * (ITERS * BLOCK_R)
    for it in tl.static_range(ITERS):
        rows = start + it * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        v = tl.load(
            part_ptr + c[:, None] * n_rows + rows[None, :],
            mask=cmask[:, None] & (rows < n_rows)[None, :],
            other=0.0,
        )
        acc += v.to(tl.float64)
    tl.store(out_ptr + c * n_chunks + pid, tl.sum(acc, axis=1), mask=cmask)


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, n_rows, n_cols, NCP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Last reduction level (one program): out[c] = sum_r part[c, r] in float64, in a
    fixed order."""
    c = tl.arange(0, NCP).to(tl.int64)
    acc = tl.zeros([NCP, BLOCK_R], dtype=tl.float64)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        v = tl.load(
            part_ptr + c[:, None] * n_rows + rows[None, :],
            mask=(c < n_cols)[:, None] & (rows < n_rows)[None, :],
            other=0.0,
        )
        acc += v.to(tl.float64)
    tl.store(out_ptr + c, tl.sum(acc, axis=1), mask=c < n_cols)


@triton.jit
def _safe_inv(v):
    return tl.where(v > 0, 1.0 / tl.where(v > 0, v, 1.0), 0.0)


@triton.jit
def _loss_coefs(stats_ptr, low_ptr, high_ptr, kr, E: tl.constexpr, BAL_BAND: tl.constexpr):
    """From the (float64) stats: 1/N_V, 1/W, 1/pairs per axis (0 where empty), the
    balance term and its gradient dBAL/dS_k for each routing channel k (float64)."""
    rcm = kr < E + 1
    nv = tl.load(stats_ptr + (E + _STAT_COUNT)).to(tl.float64)
    inv_nv = _safe_inv(nv)
    # pbar's denominator N_B (global under sync)
    nb = tl.load(stats_ptr + (E + _STAT_BALANCE_COUNT)).to(tl.float64)
    inv_nb = _safe_inv(nb)
    inv_w = _safe_inv(tl.load(stats_ptr + (E + _STAT_WEIGHT)).to(tl.float64))
    inv_n0 = _safe_inv(tl.load(stats_ptr + (E + _STAT_PAIRS + 0)).to(tl.float64))
    inv_n1 = _safe_inv(tl.load(stats_ptr + (E + _STAT_PAIRS + 1)).to(tl.float64))
    inv_n2 = _safe_inv(tl.load(stats_ptr + (E + _STAT_PAIRS + 2)).to(tl.float64))
    # S_k, the entries k <= E before N_V
    pbar = tl.load(stats_ptr + kr, mask=rcm, other=0.0).to(tl.float64) * inv_nb
    if BAL_BAND:
        lo = tl.load(low_ptr + kr, mask=rcm, other=0.0).to(tl.float64)
        hi = tl.load(high_ptr + kr, mask=rcm, other=0.0).to(tl.float64)
        band = tl.where(rcm, tl.maximum(pbar - hi, 0.0) + tl.maximum(lo - pbar, 0.0), 0.0)
        bal = tl.where(nb > 0, tl.sum(band, axis=0), 0.0)
        slope = (pbar > hi).to(tl.float64) - (pbar < lo).to(tl.float64)  # relu'(0) = 0
        gbal = tl.where(rcm, slope, 0.0) * inv_nb
    else:
        ecm = kr < E
        loads = tl.where(ecm, pbar, 0.0)
        tot = tl.sum(loads, axis=0)
        sq = tl.sum(loads * loads, axis=0)
        if E >= 2:
            ok = tot > 0
            ts = tl.where(ok, tot, 1.0)
            bal = tl.where(ok, E * sq / (ts * ts) - 1.0, 0.0)
            dload = E * (2.0 * loads / (ts * ts) - 2.0 * sq / (ts * ts * ts))
            gbal = tl.where(ecm, tl.where(ok, dload, 0.0), 0.0) * inv_nb
        else:  # one expert always has an even load
            bal = tot * 0.0
            gbal = tl.where(ecm, 0.0, 0.0).to(tl.float64)
    return inv_nv, inv_w, inv_n0, inv_n1, inv_n2, bal, gbal


@triton.jit
def _neighbor_maps(
    x_row,
    t_row,
    q,
    inside,
    kr,
    sxc,
    sxp,
    stp,
    ignore_index,
    K: tl.constexpr,
    E: tl.constexpr,
    MAP_ROUTER: tl.constexpr,
    MAP_GATE: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """For pixels q (where ``inside``): whether q is valid, D_q and s_q (0 where unused)."""
    yq = tl.load(t_row + q * stp, mask=inside, other=0).to(tl.int64)
    vq = inside & (yq != ignore_index)
    dq = to_acc(q * 0, IS_FP64)
    sq = dq
    if MAP_ROUTER:
        rq = load_channels(x_row, K, kr, E + 1, q * sxp, vq, sxc, IS_FP64)
        _, _, _, dq = router_softmax(rq, kr, E)
    if MAP_GATE:
        aq = to_acc(tl.load(x_row + (K + E + 1) * sxc + q * sxp, mask=vq, other=0.0), IS_FP64)
        sq = sigmoid(aq)
    return vq, dq, sq


@triton.jit
def _rho(x, COH_L2: tl.constexpr):
    if COH_L2:
        return x * x
    else:
        return tl.abs(x)


@triton.jit
def _drho(x, COH_L2: tl.constexpr):
    if COH_L2:
        return 2.0 * x
    else:
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))  # sign(0) = 0


@triton.jit
def _coherence_axis(
    x_row,
    t_row,
    p,
    valid,
    i_d,
    S_d,
    step,
    D,
    s,
    kr,
    sxc,
    sxp,
    stp,
    ignore_index,
    K: tl.constexpr,
    E: tl.constexpr,
    COH_L2: tl.constexpr,
    MAP_ROUTER: tl.constexpr,
    MAP_GATE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """One spatial axis of COH for pixels p: the forward pair (p, p + e_d) counted at p
    (sums for D and s), and dCOH_axis/dD_p, dCOH_axis/ds_p (before 1/pairs)."""
    zero = to_acc(p * 0, IS_FP64)  # not D * 0: a NaN logit must not leak into disabled maps
    sum_d = tl.sum(zero, axis=0)
    sum_s = sum_d
    g_d = zero
    g_s = zero
    if MAP_ROUTER or MAP_GATE:
        inside_f = valid & (i_d + 1 < S_d)
        vf, df, sf = _neighbor_maps(
            x_row,
            t_row,
            p + step,
            inside_f,
            kr,
            sxc,
            sxp,
            stp,
            ignore_index,
            K,
            E,
            MAP_ROUTER,
            MAP_GATE,
            IS_FP64,
        )
        pair_f = inside_f & vf
        if MAP_ROUTER:
            sum_d = tl.sum(tl.where(pair_f, _rho(D - df, COH_L2), 0.0), axis=0)
        if MAP_GATE:
            sum_s = tl.sum(tl.where(pair_f, _rho(s - sf, COH_L2), 0.0), axis=0)
        if COMPUTE_GRAD:
            inside_b = valid & (i_d > 0)
            vb, db, sb = _neighbor_maps(
                x_row,
                t_row,
                p - step,
                inside_b,
                kr,
                sxc,
                sxp,
                stp,
                ignore_index,
                K,
                E,
                MAP_ROUTER,
                MAP_GATE,
                IS_FP64,
            )
            pair_b = inside_b & vb
            if MAP_ROUTER:
                g_d = tl.where(pair_f, _drho(D - df, COH_L2), 0.0) - tl.where(
                    pair_b, _drho(db - D, COH_L2), 0.0
                )
            if MAP_GATE:
                g_s = tl.where(pair_f, _drho(s - sf, COH_L2), 0.0) - tl.where(
                    pair_b, _drho(sb - s, COH_L2), 0.0
                )
    return sum_d, sum_s, g_d, g_s


@triton.jit
def _loss_kernel(
    x_ptr,
    t_ptr,
    l_ptr,
    cw_ptr,
    stats_ptr,
    low_ptr,
    high_ptr,
    g_ptr,
    part_ptr,
    P,
    S0,
    S1,
    S2,
    n_tiles,
    n_prog,
    nlab,
    ignore_index,
    sxb,
    sxc,
    sxp,
    stb,
    stp,
    slb,
    sle,
    slp,
    sgb,
    sgc,
    sgp,
    lam_seg,
    lam_collab,
    lam_gate,
    lam_coh,
    lam_bal,
    paper_eps,
    gate_mse,
    gate_sparsity,
    bal_scale,
    K: tl.constexpr,
    E: tl.constexpr,
    KP: tl.constexpr,
    RP: tl.constexpr,
    NDIM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SURROGATE: tl.constexpr,
    GATE_BENEFIT: tl.constexpr,
    COH_L2: tl.constexpr,
    MAP_ROUTER: tl.constexpr,
    MAP_GATE: tl.constexpr,
    BAL_BAND: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    IS_FP64: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tiles
    p = (pid - b * n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pm = p < P
    x_row = x_ptr + b * sxb
    t_row = t_ptr + b * stb
    off_x = p * sxp

    y = tl.load(t_row + p * stp, mask=pm, other=0).to(tl.int64)
    valid = pm & (y != ignore_index)
    yc = tl.minimum(tl.maximum(y, 0), nlab - 1)  # never index with an out-of-range label

    # ---- segmentation: l_seg, model correctness c0, d l_seg / d z -------------
    if K == 1:
        z = to_acc(tl.load(x_row + off_x, mask=pm, other=0.0), IS_FP64)
        yf = yc.to(z.dtype)
        l_seg = softplus(z) - yf * z
        c0 = (z > 0).to(tl.int64) == yc  # z = 0 predicts 0
    else:
        kz = tl.arange(0, KP).to(tl.int64)
        zt = load_channels(x_row, 0, kz, K, off_x, pm, sxc, IS_FP64)
        zm = tl.where((kz < K)[:, None], zt, float("-inf"))
        zmax = tl.max(zm, axis=0)
        ez = tl.exp(zm - zmax[None, :])
        zsum = tl.sum(ez, axis=0)
        onehot = kz[:, None] == yc[None, :]
        l_seg = zmax + tl.log(zsum) - tl.sum(tl.where(onehot, zt, 0.0), axis=0)
        c0 = argmax_first(zt, kz, kz < K, KP) == yc
    if HAS_WEIGHT:
        w = to_acc(tl.load(cw_ptr + yc, mask=valid, other=0.0), IS_FP64)
    else:
        w = tl.where(valid, 1.0, 0.0).to(l_seg.dtype)
    seg_sum = tl.sum(tl.where(valid, w * l_seg, 0.0), axis=0)

    # ---- router: pi, log pi, D, hard routing h ---------------------------------
    kr = tl.arange(0, RP).to(tl.int64)
    rcm = kr < E + 1
    ecm = kr < E
    r = load_channels(x_row, K, kr, E + 1, off_x, pm, sxc, IS_FP64)
    shifted, ex, total, D = router_softmax(r, kr, E)
    pi = ex / total[None, :]

    # ---- collaboration surrogate (SURROGATE: 0 softmax, 1 paper, 2 ova) ---------
    lab = tl.load(
        l_ptr + b * slb + kr[:, None] * sle + (p * slp)[None, :],
        mask=ecm[:, None] & pm[None, :],
        other=0,
    ).to(tl.int64)
    cj = (ecm[:, None] & (lab == y[None, :]) & (lab != ignore_index)).to(pi.dtype)
    c0f = c0.to(pi.dtype)
    is_model = (kr == E)[:, None]
    if SURROGATE == 1:
        u = tl.where(ecm[:, None], 1.0 - 2.0 * cj, tl.where(is_model, -c0f[None, :], 0.0))
        l_collab = tl.sum(tl.where(rcm[:, None], u * tl.log(pi + paper_eps), 0.0), axis=0)
    elif SURROGATE == 2:
        # one-vs-all: BCEWithLogits(r_k, c_k) for every option k (no softmax)
        tk = tl.where(ecm[:, None], cj, tl.where(is_model, c0f[None, :], 0.0))
        l_collab = tl.sum(tl.where(rcm[:, None], softplus(r) - tk * r, 0.0), axis=0)
    else:
        tk = tl.where(ecm[:, None], cj, tl.where(is_model, c0f[None, :], 0.0))
        logpi = tl.where(rcm[:, None], shifted - tl.log(total)[None, :], 0.0)
        l_collab = -tl.sum(tl.where(rcm[:, None], tk * logpi, 0.0), axis=0)
    collab_sum = tl.sum(tl.where(valid, l_collab, 0.0), axis=0)

    # ---- gate target: h = [argmax r < E] (ties between an expert and the model: expert),
    # or "benefit" (1 - c0) c_jhat with jhat = argmax_{j<E} r_j ----------------------
    if GATE_BENEFIT:
        jhat = argmax_first(r, kr, ecm, RP)
        c_jhat = tl.sum(tl.where(kr[:, None] == jhat[None, :], cj, 0.0), axis=0)
        hard = (1.0 - c0f) * c_jhat
    else:
        hard = argmax_first(r, kr, rcm, RP) < E

    # ---- gate (aggregated deferral predictor) -----------------------------------
    a = to_acc(tl.load(x_row + (K + E + 1) * sxc + off_x, mask=pm, other=0.0), IS_FP64)
    s = sigmoid(a)
    hf = hard.to(a.dtype)
    dev = s - D  # D is a constant here (stopgrad)
    l_gate = softplus(a) - hf * a + gate_mse * dev * dev + gate_sparsity * s
    gate_sum = tl.sum(tl.where(valid, l_gate, 0.0), axis=0)

    # ---- spatial coherence, gather form -----------------------------------------
    i0, i1, i2 = _pixel_coords(p, S1, S2, NDIM)
    cd0, cs0, gd0, gs0 = _coherence_axis(
        x_row,
        t_row,
        p,
        valid,
        i0,
        S0,
        S1 * S2,
        D,
        s,
        kr,
        sxc,
        sxp,
        stp,
        ignore_index,
        K,
        E,
        COH_L2,
        MAP_ROUTER,
        MAP_GATE,
        COMPUTE_GRAD,
        IS_FP64,
    )
    gd1 = to_acc(p * 0, IS_FP64)
    zero_sum = tl.sum(gd1, axis=0)
    cd1 = zero_sum
    cs1 = zero_sum
    cd2 = zero_sum
    cs2 = zero_sum
    gs1 = gd1
    gd2 = gd1
    gs2 = gd1
    if NDIM >= 2:
        cd1, cs1, gd1, gs1 = _coherence_axis(
            x_row,
            t_row,
            p,
            valid,
            i1,
            S1,
            S2,
            D,
            s,
            kr,
            sxc,
            sxp,
            stp,
            ignore_index,
            K,
            E,
            COH_L2,
            MAP_ROUTER,
            MAP_GATE,
            COMPUTE_GRAD,
            IS_FP64,
        )
    if NDIM >= 3:
        cd2, cs2, gd2, gs2 = _coherence_axis(
            x_row,
            t_row,
            p,
            valid,
            i2,
            S2,
            1,
            D,
            s,
            kr,
            sxc,
            sxp,
            stp,
            ignore_index,
            K,
            E,
            COH_L2,
            MAP_ROUTER,
            MAP_GATE,
            COMPUTE_GRAD,
            IS_FP64,
        )

    # ---- per-program partial sums (added in a fixed order by the reduction kernels) --
    tl.store(part_ptr + 0 * n_prog + pid, seg_sum)
    tl.store(part_ptr + 1 * n_prog + pid, collab_sum)
    tl.store(part_ptr + 2 * n_prog + pid, gate_sum)
    tl.store(part_ptr + 3 * n_prog + pid, cd0)
    tl.store(part_ptr + 4 * n_prog + pid, cd1)
    tl.store(part_ptr + 5 * n_prog + pid, cd2)
    tl.store(part_ptr + 6 * n_prog + pid, cs0)
    tl.store(part_ptr + 7 * n_prog + pid, cs1)
    tl.store(part_ptr + 8 * n_prog + pid, cs2)

    # ---- gradient of the total loss, written once per pixel ---------------------
    if COMPUTE_GRAD:
        inv_nv, inv_w, inv_n0, inv_n1, inv_n2, _, gbal = _loss_coefs(
            stats_ptr, low_ptr, high_ptr, kr, E, BAL_BAND
        )
        dt = pi.dtype
        c_seg = (lam_seg * inv_w).to(dt)
        c_collab = (lam_collab * inv_nv).to(dt)
        c_gate = (lam_gate * inv_nv).to(dt)
        c_bal = (gbal * (lam_bal * bal_scale)).to(dt)
        # dL/dD_p and dL/ds_p through the coherence term
        g_d = lam_coh * (inv_n0.to(dt) * gd0 + inv_n1.to(dt) * gd1 + inv_n2.to(dt) * gd2)
        g_s = lam_coh * (inv_n0.to(dt) * gs0 + inv_n1.to(dt) * gs1 + inv_n2.to(dt) * gs2)
        g_row = g_ptr + b * sgb
        off_g = p * sgp

        # segmentation channels
        if K == 1:
            gz = c_seg * w * (sigmoid(z) - yf)
            store_as(g_row + off_g, tl.where(valid, gz, 0.0), pm, BF16_BY_HAND)
        else:
            gzt = (c_seg * w)[None, :] * (ez / zsum[None, :] - onehot.to(dt))
            store_as(
                g_row + kz[:, None] * sgc + off_g[None, :],
                tl.where(valid[None, :], gzt, 0.0),
                (kz < K)[:, None] & pm[None, :],
                BF16_BY_HAND,
            )

        # routing channels: collaboration + balance + coherence through D
        if SURROGATE == 1:
            v = u * pi / (pi + paper_eps)
            g_collab = v - pi * tl.sum(v, axis=0)[None, :]
        elif SURROGATE == 2:
            g_collab = sigmoid(r) - tk
        else:
            g_collab = tl.sum(tk, axis=0)[None, :] * pi - tk
        g_bal = pi * (c_bal[:, None] - tl.sum(c_bal[:, None] * pi, axis=0)[None, :])
        g_coh = g_d[None, :] * pi * (ecm[:, None].to(dt) - D[None, :])
        gr = c_collab * g_collab + g_bal + g_coh
        store_as(
            g_row + (K + kr)[:, None] * sgc + off_g[None, :],
            tl.where(valid[None, :], gr, 0.0),
            rcm[:, None] & pm[None, :],
            BF16_BY_HAND,
        )

        # gate channel: BCE(a, h) + mse (s - D)^2 + sparsity s, and coherence through s
        ds = s * (1.0 - s)
        ga = c_gate * ((s - hf) + (2.0 * gate_mse * dev + gate_sparsity) * ds) + g_s * ds
        store_as(g_row + (K + E + 1) * sgc + off_g, tl.where(valid, ga, 0.0), pm, BF16_BY_HAND)


@triton.jit
def _finalize_kernel(
    part_ptr,
    stats_ptr,
    low_ptr,
    high_ptr,
    terms_ptr,
    n_rows,
    lam_seg,
    lam_collab,
    lam_gate,
    lam_coh,
    lam_bal,
    E: tl.constexpr,
    RP: tl.constexpr,
    BAL_BAND: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """terms = [loss, seg, collab, gate, coherence, balance] from the chunk sums of the
    terms ([9, n_rows], added in a fixed order in float64) and the stats."""
    c = tl.arange(0, 16).to(tl.int64)
    acc = tl.zeros([16, BLOCK_R], dtype=tl.float64)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        v = tl.load(
            part_ptr + c[:, None] * n_rows + rows[None, :],
            mask=(c < 9)[:, None] & (rows < n_rows)[None, :],
            other=0.0,
        )
        acc += v.to(tl.float64)
    sums = tl.sum(acc, axis=1)
    kr = tl.arange(0, RP).to(tl.int64)
    inv_nv, inv_w, inv_n0, inv_n1, inv_n2, bal, _ = _loss_coefs(
        stats_ptr, low_ptr, high_ptr, kr, E, BAL_BAND
    )
    seg = tl.sum(tl.where(c == 0, sums, 0.0), axis=0) * inv_w
    collab = tl.sum(tl.where(c == 1, sums, 0.0), axis=0) * inv_nv
    gate = tl.sum(tl.where(c == 2, sums, 0.0), axis=0) * inv_nv
    coh = (
        tl.sum(tl.where((c == 3) | (c == 6), sums, 0.0), axis=0) * inv_n0
        + tl.sum(tl.where((c == 4) | (c == 7), sums, 0.0), axis=0) * inv_n1
        + tl.sum(tl.where((c == 5) | (c == 8), sums, 0.0), axis=0) * inv_n2
    )
    loss = lam_seg * seg + lam_collab * collab + lam_gate * gate + lam_coh * coh + lam_bal * bal
    ty = terms_ptr.dtype.element_ty
    tl.store(terms_ptr + 0, loss.to(ty))
    tl.store(terms_ptr + 1, seg.to(ty))
    tl.store(terms_ptr + 2, collab.to(ty))
    tl.store(terms_ptr + 3, gate.to(ty))
    tl.store(terms_ptr + 4, coh.to(ty))
    tl.store(terms_ptr + 5, bal.to(ty))


# ----------------------------------------------------------------------------------
# Launchers (the bodies of the ops)
# ----------------------------------------------------------------------------------


def _check_dtype(logits: torch.Tensor) -> None:
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(
            "deferredseg triton kernels: logits must be float32, bfloat16, float16 "
            f"or float64, got dtype {logits.dtype}"
        )


class _Problem:
    """Flattened views and launch geometry shared by the two loss ops."""

    def __init__(self, logits, target, expert_labels, num_classes, num_experts):
        _check_dtype(logits)
        K, E = int(num_classes), int(num_experts)
        if logits.dim() < 3 or logits.dim() > 5 or logits.shape[1] != K + E + 2:
            raise ValueError(
                f"logits must have shape (B, {K + E + 2}, *S) with 1 to 3 spatial "
                f"dims, got shape {tuple(logits.shape)}"
            )
        self.K, self.E = K, E
        self.B = logits.shape[0]
        self.spatial = tuple(logits.shape[2:])
        self.ndim = len(self.spatial)
        self.S = self.spatial + (1,) * (3 - self.ndim)
        self.x = flat(logits, 2)
        self.P = self.x.shape[2]
        self.t = flat(target.reshape((self.B,) + self.spatial), 1)
        self.lab = flat(expert_labels, 2)
        self.nlab = max(K, 2)
        self.KP = next_pow2(max(K, 2))
        self.RP = next_pow2(E + 1)
        self.block, self.warps = pixel_block(self.P, max(self.KP, self.RP))
        self.n_tiles = triton.cdiv(self.P, self.block) if self.P > 0 else 0
        self.n_prog = self.B * self.n_tiles
        self.is_fp64 = logits.dtype == torch.float64


def _reduce_block(ncols_pow2: int) -> int:
    return max(16, _REDUCE_ROWS // ncols_pow2)


def _chunk_sums(part: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_cols, n_rows] partial sums -> [n_cols, n_chunks] float64 chunk sums (level 1)."""
    n_cols = part.shape[0]
    ncp = next_pow2(n_cols)
    block = _reduce_block(ncp)
    rows_per_chunk = block * _CHUNK_ITERS
    n_chunks = max(1, triton.cdiv(n_rows, rows_per_chunk))
    out = torch.empty((n_cols, n_chunks), dtype=torch.float64, device=part.device)
    launcher(_chunk_sum_kernel)[(n_chunks,)](
        part, out, n_rows, n_chunks, n_cols, NCP=ncp, BLOCK_R=block, ITERS=_CHUNK_ITERS, num_warps=4
    )
    return out


def _loss_stats_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    num_classes: int,
    num_experts: int,
    ignore_index: int,
    check_expert_labels: bool,
) -> torch.Tensor:
    pb = _Problem(logits, target, expert_labels, num_classes, num_experts)
    ncols = fused.stats_len(pb.E)
    part = torch.empty(
        (ncols, max(pb.n_prog, 1)), dtype=acc_dtype(logits.dtype), device=logits.device
    )
    if pb.n_prog > 0:
        launcher(_stats_kernel)[(pb.n_prog,)](
            pb.x,
            pb.t,
            pb.lab,
            class_weight if class_weight is not None else pb.x,
            part,
            pb.P,
            pb.S[0],
            pb.S[1],
            pb.S[2],
            pb.n_tiles,
            pb.n_prog,
            pb.nlab,
            ignore_index,
            pb.x.stride(0),
            pb.x.stride(1),
            pb.x.stride(2),
            pb.t.stride(0),
            pb.t.stride(1),
            pb.lab.stride(0),
            pb.lab.stride(1),
            pb.lab.stride(2),
            K=pb.K,
            E=pb.E,
            RP=pb.RP,
            NDIM=pb.ndim,
            HAS_WEIGHT=class_weight is not None,
            CHECK_EXPERTS=bool(check_expert_labels),
            IS_FP64=pb.is_fp64,
            BLOCK_P=pb.block,
            num_warps=pb.warps,
        )
    chunks = _chunk_sums(part, pb.n_prog)
    stats = torch.empty((ncols,), dtype=torch.float64, device=logits.device)
    ncp = next_pow2(ncols)
    launcher(_reduce_kernel)[(1,)](
        chunks, stats, chunks.shape[1], ncols, NCP=ncp, BLOCK_R=_reduce_block(ncp), num_warps=4
    )
    return stats


def _loss_fused_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    class_weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    balance_low: Optional[torch.Tensor],
    balance_high: Optional[torch.Tensor],
    num_classes: int,
    num_experts: int,
    ignore_index: int,
    fparams: Sequence[float],
    iparams: Sequence[int],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    pb = _Problem(logits, target, expert_labels, num_classes, num_experts)
    (
        lam_seg,
        lam_collab,
        lam_gate,
        lam_coh,
        lam_bal,
        paper_eps,
        gate_mse,
        gate_sparsity,
        bal_scale,
    ) = [float(v) for v in fparams]
    if len(iparams) != len(fused.IPARAMS):
        raise ValueError(
            f"iparams must have {len(fused.IPARAMS)} values {fused.IPARAMS}, got "
            f"{list(iparams)} (checking expert labels in the loss pass is a "
            "C++ CPU kernel option)"
        )
    surrogate, coherence, maps, balance, gate_target = [int(v) for v in iparams]
    if surrogate not in fused.SURROGATE_CODE.values():
        raise ValueError(f"unknown surrogate code {surrogate}")
    if gate_target not in fused.GATE_TARGET_CODE.values():
        raise ValueError(f"unknown gate_target code {gate_target}")
    band = balance == fused.BALANCE_CODE["band"]
    if band and (balance_low is None or balance_high is None):
        raise ValueError("balance='band' needs balance_low and balance_high")
    E = pb.E
    if (
        stats.dim() != 1
        or stats.numel() not in (fused.stats_len(E), fused.stats_len(E) + 1)
        or stats.dtype != torch.float64
    ):
        raise ValueError(
            f"stats must be a float64 vector of {fused.stats_len(E) + 1} values "
            f"(or {fused.stats_len(E)}), got {stats.dtype} of shape {tuple(stats.shape)}"
        )
    if stats.numel() == fused.stats_len(E):  # no N_B entry: pbar over this call's N_V
        at_count = fused.stat_count(E)
        stats = torch.cat([stats, stats[at_count : at_count + 1]])
    cdt = acc_dtype(logits.dtype)
    dummy = stats
    low = balance_low if balance_low is not None else dummy
    high = balance_high if balance_high is not None else dummy

    if compute_grad:
        grad = fused.grad_buffer(logits)
        direct = can_merge(grad, 2)
        gflat = (
            grad.view(pb.x.shape)
            if direct
            else torch.empty(pb.x.shape, dtype=logits.dtype, device=logits.device)
        )
    else:
        grad = logits.new_empty((0,))
        gflat = pb.x  # never written: COMPUTE_GRAD is a constexpr False
    part = torch.empty((N_PART, max(pb.n_prog, 1)), dtype=cdt, device=logits.device)
    if pb.n_prog > 0:
        launcher(_loss_kernel)[(pb.n_prog,)](
            pb.x,
            pb.t,
            pb.lab,
            class_weight if class_weight is not None else dummy,
            stats,
            low,
            high,
            gflat,
            part,
            pb.P,
            pb.S[0],
            pb.S[1],
            pb.S[2],
            pb.n_tiles,
            pb.n_prog,
            pb.nlab,
            ignore_index,
            pb.x.stride(0),
            pb.x.stride(1),
            pb.x.stride(2),
            pb.t.stride(0),
            pb.t.stride(1),
            pb.lab.stride(0),
            pb.lab.stride(1),
            pb.lab.stride(2),
            gflat.stride(0),
            gflat.stride(1),
            gflat.stride(2),
            lam_seg,
            lam_collab,
            lam_gate,
            lam_coh,
            lam_bal,
            paper_eps,
            gate_mse,
            gate_sparsity,
            bal_scale,
            K=pb.K,
            E=pb.E,
            KP=pb.KP,
            RP=pb.RP,
            NDIM=pb.ndim,
            HAS_WEIGHT=class_weight is not None,
            SURROGATE=surrogate,
            GATE_BENEFIT=gate_target == fused.GATE_TARGET_CODE["benefit"],
            COH_L2=coherence == fused.COHERENCE_CODE["l2"],
            MAP_ROUTER=bool(maps & fused.MAP_BITS["router"]),
            MAP_GATE=bool(maps & fused.MAP_BITS["gate"]),
            BAL_BAND=band,
            COMPUTE_GRAD=bool(compute_grad),
            IS_FP64=pb.is_fp64,
            BF16_BY_HAND=INTERPRET and logits.dtype == torch.bfloat16,
            BLOCK_P=pb.block,
            num_warps=pb.warps,
        )
    if compute_grad and not direct:
        grad.copy_(gflat.view(grad.shape))
    chunks = _chunk_sums(part, pb.n_prog)
    terms = torch.empty((fused.TERMS_LEN,), dtype=cdt, device=logits.device)
    launcher(_finalize_kernel)[(1,)](
        chunks,
        stats,
        low,
        high,
        terms,
        chunks.shape[1],
        lam_seg,
        lam_collab,
        lam_gate,
        lam_coh,
        lam_bal,
        E=pb.E,
        RP=pb.RP,
        BAL_BAND=band,
        BLOCK_R=_reduce_block(16),
        num_warps=4,
    )
    return terms, grad


# The schemas torch infers from the annotations of the two functions above (see
# define_op): ints are SymInt, results are unnamed.
_STATS_SCHEMA = (
    "(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
    "SymInt num_classes, SymInt num_experts, SymInt ignore_index, "
    "bool check_expert_labels) -> Tensor"
)
_LOSS_SCHEMA = (
    "(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
    "Tensor stats, Tensor? balance_low, Tensor? balance_high, SymInt num_classes, "
    "SymInt num_experts, SymInt ignore_index, float[] fparams, SymInt[] iparams, "
    "bool compute_grad) -> (Tensor, Tensor)"
)

loss_stats = define_op(STATS_OP, _STATS_SCHEMA, _loss_stats_impl, fused.fake_stats)
loss_fused = define_op(LOSS_OP, _LOSS_SCHEMA, _loss_fused_impl, fused.fake_loss)
fused.register_loss_autograd(LOSS_OP)


def loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    expert_labels: torch.Tensor,
    opts,
    return_terms: bool,
):
    """The ``"triton"`` backend of :func:`deferredseg_kernels.deferredseg_loss`."""
    _check_dtype(logits)
    return fused.fused_loss(
        loss_stats,
        loss_fused,
        logits,
        target,
        expert_labels,
        opts,
        return_terms,
        check_labels_eagerly=(logits.device.type == "cpu"),
    )


__all__: List[str] = ["loss", "loss_stats", "loss_fused", "STATS_OP", "LOSS_OP"]
