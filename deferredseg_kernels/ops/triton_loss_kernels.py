"""The Triton kernels (device code) of the DeferredSeg objective, docs/objective.md section 3.

What each kernel does, and the contract of the two ops they implement, is described in
:mod:`deferredseg_kernels.ops.triton_loss`, which launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import contract
from . import fused
from .triton_common import (
    argmax_first,
    load_channels,
    router_softmax,
    sigmoid,
    softplus,
    store_as,
    to_acc,
)

# Rows of the per-program partial sums of the loss pass: the seg, collab and gate sums,
# then the coherence sums of the router map and of the gate map, one row per axis each.
_PART_SEG = tl.constexpr(0)
_PART_COLLAB = tl.constexpr(1)
_PART_GATE = tl.constexpr(2)
_PART_COH_ROUTER = tl.constexpr(3)  # rows 3, 4, 5: axes 0, 1, 2
_PART_COH_GATE = tl.constexpr(6)  # rows 6, 7, 8
N_PART = 9  # the host allocates this many rows
_N_PART = tl.constexpr(N_PART)
# Entries of ``terms`` (ops/fused.py): the loss, then the unweighted terms.
_TERM_LOSS = tl.constexpr(fused.TERM_INDEX["loss"])
_TERM_SEG = tl.constexpr(fused.TERM_INDEX["seg"])
_TERM_COLLAB = tl.constexpr(fused.TERM_INDEX["collab"])
_TERM_GATE = tl.constexpr(fused.TERM_INDEX["gate"])
_TERM_COH = tl.constexpr(fused.TERM_INDEX["coherence"])
_TERM_BAL = tl.constexpr(fused.TERM_INDEX["balance"])
# The stats layout of ops/fused.py (entry E + offset), as constexpr globals: the only
# globals a compiled kernel may read, and their values enter the kernels' cache key.
_STAT_COUNT = tl.constexpr(fused.STAT_COUNT)
_STAT_WEIGHT = tl.constexpr(fused.STAT_WEIGHT)
_STAT_PAIRS = tl.constexpr(fused.STAT_PAIRS)
_STAT_BAD = tl.constexpr(fused.STAT_BAD)
_STAT_BALANCE_COUNT = tl.constexpr(fused.STAT_BALANCE_COUNT)
# The codes of the int options (contract.CODES) the kernels branch on at compile time.
_SURROGATE_PAPER = tl.constexpr(contract.CODES["surrogate"]["paper"])
_SURROGATE_OVA = tl.constexpr(contract.CODES["surrogate"]["ova"])
_COHERENCE_L2 = tl.constexpr(contract.CODES["coherence"]["l2"])
_MAP_ROUTER = tl.constexpr(contract.CODES["coherence_maps"]["router"])
_MAP_GATE = tl.constexpr(contract.CODES["coherence_maps"]["gate"])
_BALANCE_BAND = tl.constexpr(contract.CODES["balance"]["band"])
_GATE_TARGET_BENEFIT = tl.constexpr(contract.CODES["gate_target"]["benefit"])


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
    lambda_seg,
    lambda_collab,
    lambda_gate,
    lambda_coherence,
    lambda_balance,
    paper_eps,
    gate_mse,
    gate_sparsity,
    balance_grad_scale,
    K: tl.constexpr,
    E: tl.constexpr,
    KP: tl.constexpr,
    RP: tl.constexpr,
    NDIM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SURROGATE: tl.constexpr,
    COHERENCE: tl.constexpr,
    COHERENCE_MAPS: tl.constexpr,
    BALANCE: tl.constexpr,
    GATE_TARGET: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    IS_FP64: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # The options: the fparams by their names in contract.FLOAT_FIELDS, the iparams
    # (contract.INT_FIELDS, upper-cased) as compile-time codes, decoded here.
    GATE_BENEFIT: tl.constexpr = _GATE_TARGET_BENEFIT == GATE_TARGET
    COH_L2: tl.constexpr = _COHERENCE_L2 == COHERENCE
    MAP_ROUTER: tl.constexpr = (_MAP_ROUTER & COHERENCE_MAPS) != 0
    MAP_GATE: tl.constexpr = (_MAP_GATE & COHERENCE_MAPS) != 0
    BAL_BAND: tl.constexpr = _BALANCE_BAND == BALANCE
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

    # ---- collaboration surrogate (SURROGATE: a code of contract.CODES["surrogate"]) -
    lab = tl.load(
        l_ptr + b * slb + kr[:, None] * sle + (p * slp)[None, :],
        mask=ecm[:, None] & pm[None, :],
        other=0,
    ).to(tl.int64)
    cj = (ecm[:, None] & (lab == y[None, :]) & (lab != ignore_index)).to(pi.dtype)
    c0f = c0.to(pi.dtype)
    is_model = (kr == E)[:, None]
    if SURROGATE == _SURROGATE_PAPER:
        u = tl.where(ecm[:, None], 1.0 - 2.0 * cj, tl.where(is_model, -c0f[None, :], 0.0))
        l_collab = tl.sum(tl.where(rcm[:, None], u * tl.log(pi + paper_eps), 0.0), axis=0)
    elif SURROGATE == _SURROGATE_OVA:
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
    tl.store(part_ptr + _PART_SEG * n_prog + pid, seg_sum)
    tl.store(part_ptr + _PART_COLLAB * n_prog + pid, collab_sum)
    tl.store(part_ptr + _PART_GATE * n_prog + pid, gate_sum)
    tl.store(part_ptr + _PART_COH_ROUTER * n_prog + pid, cd0)
    tl.store(part_ptr + (_PART_COH_ROUTER + 1) * n_prog + pid, cd1)
    tl.store(part_ptr + (_PART_COH_ROUTER + 2) * n_prog + pid, cd2)
    tl.store(part_ptr + _PART_COH_GATE * n_prog + pid, cs0)
    tl.store(part_ptr + (_PART_COH_GATE + 1) * n_prog + pid, cs1)
    tl.store(part_ptr + (_PART_COH_GATE + 2) * n_prog + pid, cs2)

    # ---- gradient of the total loss, written once per pixel ---------------------
    if COMPUTE_GRAD:
        inv_nv, inv_w, inv_n0, inv_n1, inv_n2, _, gbal = _loss_coefs(
            stats_ptr, low_ptr, high_ptr, kr, E, BAL_BAND
        )
        dt = pi.dtype
        seg_scale = (lambda_seg * inv_w).to(dt)
        collab_scale = (lambda_collab * inv_nv).to(dt)
        gate_scale = (lambda_gate * inv_nv).to(dt)
        balance_coef = (gbal * (lambda_balance * balance_grad_scale)).to(dt)
        # dL/dD_p and dL/ds_p through the coherence term
        g_d = lambda_coherence * (inv_n0.to(dt) * gd0 + inv_n1.to(dt) * gd1 + inv_n2.to(dt) * gd2)
        g_s = lambda_coherence * (inv_n0.to(dt) * gs0 + inv_n1.to(dt) * gs1 + inv_n2.to(dt) * gs2)
        g_row = g_ptr + b * sgb
        off_g = p * sgp

        # segmentation channels
        if K == 1:
            gz = seg_scale * w * (sigmoid(z) - yf)
            store_as(g_row + off_g, tl.where(valid, gz, 0.0), pm, BF16_BY_HAND)
        else:
            gzt = (seg_scale * w)[None, :] * (ez / zsum[None, :] - onehot.to(dt))
            store_as(
                g_row + kz[:, None] * sgc + off_g[None, :],
                tl.where(valid[None, :], gzt, 0.0),
                (kz < K)[:, None] & pm[None, :],
                BF16_BY_HAND,
            )

        # routing channels: collaboration + balance + coherence through D
        if SURROGATE == _SURROGATE_PAPER:
            v = u * pi / (pi + paper_eps)
            g_collab = v - pi * tl.sum(v, axis=0)[None, :]
        elif SURROGATE == _SURROGATE_OVA:
            g_collab = sigmoid(r) - tk
        else:
            g_collab = tl.sum(tk, axis=0)[None, :] * pi - tk
        g_bal = pi * (balance_coef[:, None] - tl.sum(balance_coef[:, None] * pi, axis=0)[None, :])
        g_coh = g_d[None, :] * pi * (ecm[:, None].to(dt) - D[None, :])
        gr = collab_scale * g_collab + g_bal + g_coh
        store_as(
            g_row + (K + kr)[:, None] * sgc + off_g[None, :],
            tl.where(valid[None, :], gr, 0.0),
            rcm[:, None] & pm[None, :],
            BF16_BY_HAND,
        )

        # gate channel: BCE(a, h) + mse (s - D)^2 + sparsity s, and coherence through s
        ds = s * (1.0 - s)
        ga = gate_scale * ((s - hf) + (2.0 * gate_mse * dev + gate_sparsity) * ds) + g_s * ds
        store_as(g_row + (K + E + 1) * sgc + off_g, tl.where(valid, ga, 0.0), pm, BF16_BY_HAND)


@triton.jit
def _finalize_kernel(
    part_ptr,
    stats_ptr,
    low_ptr,
    high_ptr,
    terms_ptr,
    n_rows,
    lambda_seg,
    lambda_collab,
    lambda_gate,
    lambda_coherence,
    lambda_balance,
    E: tl.constexpr,
    RP: tl.constexpr,
    BALANCE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """terms = [loss, seg, collab, gate, coherence, balance] from the chunk sums of the
    terms ([N_PART, n_rows], added in a fixed order in float64) and the stats."""
    BAL_BAND: tl.constexpr = _BALANCE_BAND == BALANCE
    c = tl.arange(0, 16).to(tl.int64)
    acc = tl.zeros([16, BLOCK_R], dtype=tl.float64)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        v = tl.load(
            part_ptr + c[:, None] * n_rows + rows[None, :],
            mask=(c < _N_PART)[:, None] & (rows < n_rows)[None, :],
            other=0.0,
        )
        acc += v.to(tl.float64)
    sums = tl.sum(acc, axis=1)
    kr = tl.arange(0, RP).to(tl.int64)
    inv_nv, inv_w, inv_n0, inv_n1, inv_n2, bal, _ = _loss_coefs(
        stats_ptr, low_ptr, high_ptr, kr, E, BAL_BAND
    )
    seg = tl.sum(tl.where(c == _PART_SEG, sums, 0.0), axis=0) * inv_w
    collab = tl.sum(tl.where(c == _PART_COLLAB, sums, 0.0), axis=0) * inv_nv
    gate = tl.sum(tl.where(c == _PART_GATE, sums, 0.0), axis=0) * inv_nv
    coh = (
        tl.sum(tl.where((c == _PART_COH_ROUTER) | (c == _PART_COH_GATE), sums, 0.0), axis=0)
        * inv_n0
        + tl.sum(
            tl.where((c == _PART_COH_ROUTER + 1) | (c == _PART_COH_GATE + 1), sums, 0.0), axis=0
        )
        * inv_n1
        + tl.sum(
            tl.where((c == _PART_COH_ROUTER + 2) | (c == _PART_COH_GATE + 2), sums, 0.0), axis=0
        )
        * inv_n2
    )
    loss = (
        lambda_seg * seg
        + lambda_collab * collab
        + lambda_gate * gate
        + lambda_coherence * coh
        + lambda_balance * bal
    )
    ty = terms_ptr.dtype.element_ty
    tl.store(terms_ptr + _TERM_LOSS, loss.to(ty))
    tl.store(terms_ptr + _TERM_SEG, seg.to(ty))
    tl.store(terms_ptr + _TERM_COLLAB, collab.to(ty))
    tl.store(terms_ptr + _TERM_GATE, gate.to(ty))
    tl.store(terms_ptr + _TERM_COH, coh.to(ty))
    tl.store(terms_ptr + _TERM_BAL, bal.to(ty))
