// The per-tile loss on the CPU: the coherence of a tile and every term with its
// gradient (loss_tile_impl, a sequence of named steps), then the compiled entry points of the three
// tile computations, one per accumulation type and instruction set. Included by
// loss_cpu.cpp (which defines the baseline entry points) and by loss_tile_v3.cpp and
// loss_tile_v4.cpp (which define the AVX2 and AVX-512 ones).
#pragma once

#include <cstdint>
#include <type_traits>

#include "tile_steps.h"

namespace deferredseg {
namespace cpu_loss {

DS_FP_REGION_BEGIN

// One map's coherence at a pixel with value m and neighbours mprev / mnext along an
// axis: adds to g the derivative of the weighted penalty (both pairs, each where it
// counts) and returns the penalty of the forward pair.
template <bool L2, typename T>
DS_LOSS_FN T coherence_pixel(T m, T mprev, T mnext, bool okp, bool okn, T f, T& g) {
  const T dp = m - mprev, dn = m - mnext;
  const T gp = sel(okp, coh_drho<L2>(dp), T(0)), gn = sel(okn, coh_drho<L2>(dn), T(0));
  g += f * (gp + gn);
  return sel(okn, coh_rho<L2>(dn), T(0));
}

// Coherence along axis d of a tile, both maps in one loop. A pair (p - s, p) or
// (p, p + s) counts when both pixels are valid and inside the volume (valid mask,
// its window vm and the neighbour masks; all 0 / 1, so their product is too). Adds
// to gD / gS the derivative of the weighted penalty with respect to D_p / s_p,
// gathered from both pairs, and returns the penalties of the forward pairs.
template <bool L2, bool DM, bool SM, typename T>
DS_LOSS_FN void coherence_axis(const TileCtx<T>& c, int d, T& val_d, T& val_s) {
  const int64_t n = c.n, s = c.st[d];
  const T f = c.scale_coh[d];
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ hp = c.hp[d];
  const T* __restrict__ hn = c.hn[d];
  const T* __restrict__ vm = c.vm;
  const T* __restrict__ Dm = c.mapD;
  const T* __restrict__ Sm = c.mapS;
  T* __restrict__ gD = c.gD;
  T* __restrict__ gS = c.gS;
  T vd = T(0), vs = T(0);
  DS_SIMD_SUM(vd, vs)
  for (int64_t i = 0; i < n; ++i) {
    const T v = valid[i];
    const bool okp = v * vm[i - s] * hp[i] != T(0);
    const bool okn = v * vm[i + s] * hn[i] != T(0);
    if (DM) vd += coherence_pixel<L2>(Dm[i], Dm[i - s], Dm[i + s], okp, okn, f, gD[i]);
    if (SM) vs += coherence_pixel<L2>(Sm[i], Sm[i - s], Sm[i + s], okp, okn, f, gS[i]);
  }
  val_d = vd;
  val_s = vs;
}

// The coherence of a tile: gD, gS (derivatives with respect to D and s, gathered
// from both pairs of every axis) and the penalties of its forward pairs in out.
template <typename T>
DS_LOSS_FN void tile_coherence_all(const TileCtx<T>& c) {
  const int64_t n = c.n;
  T* __restrict__ gD = c.gD;
  T* __restrict__ gS = c.gS;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    gD[i] = T(0);
    gS[i] = T(0);
  }
  for (int d = 0; d < kMaxSpatial; ++d) {
    T vd = T(0), vs = T(0);
    if (d < c.nd && c.params.coherence_maps != 0) {
      const bool dm = (c.params.coherence_maps & kMapRouter) != 0,
                 sm = (c.params.coherence_maps & kMapGate) != 0;
      if (c.l2()) {
        if (dm && sm) coherence_axis<true, true, true>(c, d, vd, vs);
        else if (dm) coherence_axis<true, true, false>(c, d, vd, vs);
        else coherence_axis<true, false, true>(c, d, vd, vs);
      } else {
        if (dm && sm) coherence_axis<false, true, true>(c, d, vd, vs);
        else if (dm) coherence_axis<false, true, false>(c, d, vd, vs);
        else coherence_axis<false, false, true>(c, d, vd, vs);
      }
    }
    c.out[kSumCoh + d] = vd;
    c.out[kSumCoh + 3 + d] = vs;
  }
}

// The tile's partial sums of the seg, collab and gate terms from their per-pixel values
// (lseg, lcol, lgate). One loop for every path, so that a tile sums in the same order
// with and without the gradient (and the loss is the same bits either way).
template <typename T>
DS_LOSS_FN void tile_term_sums(const TileCtx<T>& c) {
  const int64_t n = c.n;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ lseg = c.lseg;
  const T* __restrict__ lcol = c.lcol;
  const T* __restrict__ lgate = c.lgate;
  T sseg = T(0), scol = T(0), sgate = T(0);
  DS_SIMD_SUM(sseg, scol, sgate)
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = valid[i] != T(0);
    const T lc = lcol[i], lg = lgate[i];
    sseg += lseg[i];
    scol += sel(ok, lc, T(0));
    sgate += sel(ok, lg, T(0));
  }
  c.out[kSumSeg] = sseg;
  c.out[kSumCollab] = scol;
  c.out[kSumGate] = sgate;
}

// Everything after the segmentation term, for a compile-time E and the softmax or
// paper surrogate: collab, balance, gate, and (GRAD) the gradient of the routing and
// gate logits, in one loop with the E + 1 channels of a pixel in registers. Needs: the
// routing of the tile (pi, rb, rs, D), its gate term (tile_gate), the coherence
// derivatives gD, gS (tile_coherence_all), lseg and the c_k rows.
// The formulas are those of the generic loops in loss_tile_impl.
template <int E, int SUR, bool GRAD, typename T>
DS_LOSS_FN void loss_rest_fast(const TileCtx<T>& c) {
  const int64_t n = c.n, K = c.K, xs = c.xs;
  // Logits read from Rin, gradients written to R (the same memory when Xin is X: each
  // pixel's logits are read before its gradient is written).
  const T* Rin = c.Xin + K * xs;
  T* R = c.X + K * kTile;
  T* __restrict__ a = c.X + (K + E + 1) * kTile;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ pi = c.pi;
  const T* __restrict__ ckr = c.ck;
  const T* __restrict__ rb = c.rb;
  const T* __restrict__ rs = c.rs;
  const T* __restrict__ D = c.D;
  const T* __restrict__ gD = c.gD;
  const T* __restrict__ gS = c.gS;
  T* __restrict__ lcol_out = c.lcol;
  const T* __restrict__ dgate = c.dgate;
  const T* __restrict__ dsa = c.dsa;
  T balance_coef[E + 1];
  for (int k = 0; k <= E; ++k) balance_coef[k] = c.bal[k];
  const T collab_scale = c.scale_collab, gate_scale = c.scale_gate,
          paper_eps = static_cast<T>(c.params.paper_eps);
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = valid[i] != T(0);
    T ck[E + 1], p[E + 1], gk[E + 1];
#pragma GCC unroll 8
    for (int k = 0; k <= E; ++k) {
      ck[k] = ckr[k * kTile + i];
      p[k] = pi[k * kTile + i];
    }
    // collab value; acc = Ctot (softmax) or sum_k g_k pi_k (paper)
    T lcol = T(0), acc = T(0);
    if (SUR == kSurrogatePaper) {
#pragma GCC unroll 8
      for (int k = 0; k <= E; ++k) {
        const T paper_coef = paper_base<T>(k < E) + paper_slope<T>(k < E) * ck[k];
        lcol += paper_channel(paper_coef, p[k], paper_eps, gk[k]);
        acc += gk[k] * p[k];
      }
    } else {
      const T rl = log_pos(rs[i]), b = rb[i];
#pragma GCC unroll 8
      for (int k = 0; k <= E; ++k) {
        const T logpi = (Rin[k * xs + i] - b) - rl;
        lcol -= ck[k] * logpi;
        acc += ck[k];
        gk[k] = T(0);
      }
    }
    T bsum = T(0);
#pragma GCC unroll 8
    for (int k = 0; k <= E; ++k) bsum += balance_coef[k] * p[k];
    if (GRAD) {
      const T ga = gate_scale * dgate[i] + gS[i] * dsa[i];
      const T common = routing_common<SUR>(collab_scale, acc, bsum, gD[i], D[i]);
#pragma GCC unroll 8
      for (int m = 0; m <= E; ++m) {
        const T g = routing_grad<SUR>(p[m], common, balance_coef[m], gD[i], m < E ? T(1) : T(0),
                                      collab_scale, ck[m], gk[m]);
        R[m * kTile + i] = sel(ok, g, T(0));
      }
      a[i] = sel(ok, ga, T(0));
    }
    lcol_out[i] = lcol;
  }
  tile_term_sums(c);
}

// ---------------------------------------------------------------------------
// The steps of loss_tile_impl, in the order it runs them (each reads what the ones
// before it wrote to the tile's rows).
// ---------------------------------------------------------------------------

// Segmentation, K = 1: the binary cross-entropy of each pixel (lseg, weighted), the
// model's correctness c0 (z > 0) == y and the gradient of z (written over its row).
template <typename T>
DS_LOSS_FN void tile_seg_binary(const TileCtx<T>& c) {
  const int64_t n = c.n;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ yf = c.yf;
  const T* __restrict__ w = c.w;
  T* __restrict__ lseg = c.lseg;
  T* __restrict__ c0 = c.ck + c.E * kTile;
  const T seg_scale = c.scale_seg;
  const T* zin = c.Xin;
  T* z = c.X;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    T l, dl, s, ds;
    const T zi = zin[i];
    bce_with_logits(zi, yf[i], l, dl, s, ds);
    const bool ok = valid[i] != T(0);
    const T wv = w[i];
    const T wl = wv * l, g = seg_scale * wv * dl;
    lseg[i] = sel(ok, wl, T(0));
    const T yv = yf[i];                     // 0 or 1
    c0[i] = sel(zi > T(0), yv, T(1) - yv);  // (z > 0) == y
    z[i] = sel(ok, g, T(0));
  }
}

// Segmentation, K >= 2: the cross-entropy of the softmax over the K class logits (lseg,
// weighted), c0 = [argmax z == y] and the gradient of the z rows (written over them).
template <typename T>
DS_LOSS_FN void tile_seg_softmax(const TileCtx<T>& c) {
  const int64_t n = c.n, K = c.K;
  const T* __restrict__ valid = c.valid;
  const int32_t* __restrict__ y = c.y;
  const T* __restrict__ w = c.w;
  T* __restrict__ lseg = c.lseg;
  T* __restrict__ c0 = c.ck + c.E * kTile;
  const T seg_scale = c.scale_seg;
  T* __restrict__ zb = c.zb;
  T* __restrict__ zs = c.zs;
  T* __restrict__ zy = c.zy;
  int32_t* __restrict__ zi = c.zi;
  rows_argmax(n, c.Xin, c.xs, K, zb, zi);
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    zs[i] = T(0);
    zy[i] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* zin = c.Xin + k * c.xs;  // z is zin when Xin is X
    T* z = c.X + k * kTile;
    const int32_t kk = static_cast<int32_t>(k);
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) {
      const T v = zin[i], cur = zy[i];
      const T e = exp_nonpos(v - zb[i]);
      zy[i] = sel(y[i] == kk, v, cur);
      z[i] = e;
      zs[i] += e;
    }
  }
  T* __restrict__ seg_coef = c.acc;  // w[y] seg_scale per pixel (the collab rows come later)
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = valid[i] != T(0);
    const T l = log_pos(zs[i]) - (zy[i] - zb[i]);  // -log softmax(z)_y
    const T wv = w[i];
    const T wl = wv * l, cf = seg_scale * wv;
    lseg[i] = sel(ok, wl, T(0));
    c0[i] = sel(zi[i] == y[i], T(1), T(0));
    seg_coef[i] = sel(ok, cf, T(0));
    zs[i] = T(1) / zs[i];
  }
  for (int64_t k = 0; k < K; ++k) {
    T* __restrict__ z = c.X + k * kTile;
    const int32_t kk = static_cast<int32_t>(k);
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) {
      const T g = seg_coef[i] * (z[i] * zs[i] - sel(y[i] == kk, T(1), T(0)));
      z[i] = sel(valid[i] != T(0), g, T(0));
    }
  }
}

// The gate term of the tile (tile_gate: its value and derivative per pixel), unless
// tile_routing already made it (routing_ready, router target).
template <typename T>
DS_LOSS_FN void tile_gate_term(const TileCtx<T>& c, const T* Rin) {
  const int64_t E = c.E;
  if (c.benefit()) {
    tile_gate<false, true>(c, Rin + (E + 1) * c.xs);
  } else if (!c.routing_ready) {
    tile_gate<false, false>(c, Rin + (E + 1) * c.xs);
  }
}

// The float path for E <= kFastMaxExperts (c.fast) and the softmax or paper surrogate:
// routing, gate and coherence, then loss_rest_fast. Returns whether it ran.
template <typename T>
DS_LOSS_FN bool tile_rest_fast(const TileCtx<T>& c, const T* Rin) {
  if constexpr (std::is_same<T, float>::value) {
    const int64_t E = c.E;
    // The "ova" surrogate takes the generic loops: its fused per-pixel loop (E + 1 BCEs and
    // their gradients in registers) did not vectorise and ran 4x slower than them.
    if (c.fast && c.params.surrogate != kSurrogateOva) {
      if (!c.routing_ready) tile_routing(c, Rin, c.xs, false);
      tile_gate_term(c, Rin);
      tile_coherence_all(c);
      if (c.params.surrogate == kSurrogatePaper) {
        if (c.grad) {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogatePaper, true>(c))
        } else {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogatePaper, false>(c))
        }
      } else {
        if (c.grad) {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogateSoftmax, true>(c))
        } else {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogateSoftmax, false>(c))
        }
      }
      return true;
    }
  }
  return false;
}

// The routing of the tile (pi, rb, rs, D; tile_routing), or, when the maps pass made it,
// the log of the softmax sums that the softmax surrogate reads (rlog).
template <typename T>
DS_LOSS_FN void tile_routing_logs(const TileCtx<T>& c, const T* Rin, bool softmax) {
  if (!c.routing_ready) {
    tile_routing(c, Rin, c.xs, softmax);
  } else if (softmax) {
    const int64_t n = c.n;
    const T* __restrict__ rs = c.rs;
    T* __restrict__ rlog = c.rlog;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) rlog[i] = log_pos(rs[i]);
  }
}

// The collaboration term of each pixel (lcol) and, for the gradient, acc = Ctot
// (softmax surrogate) or sum_k g_k pi_k (paper); unused by ova.
template <typename T>
DS_LOSS_FN void tile_collab(const TileCtx<T>& c, const T* Rin) {
  const int64_t n = c.n, E = c.E;
  const T* __restrict__ rb = c.rb;
  const T* __restrict__ rlog = c.rlog;
  T* __restrict__ lcol = c.lcol;
  T* __restrict__ acc = c.acc;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    lcol[i] = T(0);
    acc[i] = T(0);
  }
  if (c.params.surrogate == kSurrogateOva) {
    for (int64_t k = 0; k <= E; ++k) {
      const T* __restrict__ r = Rin + k * c.xs;
      const T* __restrict__ ck = c.ck + k * kTile;
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        T g;
        lcol[i] += ova_channel(r[i], ck[i], g);
      }
    }
  } else if (c.params.surrogate == kSurrogateSoftmax) {
    for (int64_t k = 0; k <= E; ++k) {
      const T* __restrict__ r = Rin + k * c.xs;
      const T* __restrict__ ck = c.ck + k * kTile;
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T logpi = (r[i] - rb[i]) - rlog[i];
        lcol[i] -= ck[i] * logpi;
        acc[i] += ck[i];
      }
    }
  } else {
    const T paper_eps = static_cast<T>(c.params.paper_eps);
    for (int64_t k = 0; k <= E; ++k) {
      const T* __restrict__ p = c.pi + k * kTile;
      const T* __restrict__ ck = c.ck + k * kTile;
      const T base = paper_base<T>(k < E), slope = paper_slope<T>(k < E);
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T paper_coef = base + slope * ck[i];
        T g;
        lcol[i] += paper_channel(paper_coef, p[i], paper_eps, g);
        acc[i] += g * p[i];
      }
    }
  }
}

// The balance term's share of each pixel's routing gradient: bsum = sum_k bal_k pi_k.
template <typename T>
DS_LOSS_FN void tile_balance_sums(const TileCtx<T>& c) {
  const int64_t n = c.n, E = c.E;
  T* __restrict__ bsum = c.bsum;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) bsum[i] = T(0);
  for (int64_t k = 0; k <= E; ++k) {
    const T* __restrict__ p = c.pi + k * kTile;
    const T balance_coef = c.bal[k];
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) bsum[i] += balance_coef * p[i];
  }
}

// The gradient of the gate logit a: gate term and coherence through s = sigmoid(a).
template <typename T>
DS_LOSS_FN void tile_gate_grad(const TileCtx<T>& c) {
  const int64_t n = c.n;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ dgate = c.dgate;
  const T* __restrict__ dsa = c.dsa;
  const T* __restrict__ gS = c.gS;
  T* __restrict__ a = c.X + (c.K + c.E + 1) * kTile;
  const T gate_scale = c.scale_gate;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate_scale * dgate[i] + gS[i] * dsa[i];
    a[i] = sel(valid[i] != T(0), g, T(0));
  }
}

// The gradient of the E + 1 routing logits (written over their rows): collaboration,
// balance and coherence through D (routing_common, then routing_grad per channel).
template <typename T>
DS_LOSS_FN void tile_routing_grad(const TileCtx<T>& c, const T* Rin) {
  const int64_t n = c.n, E = c.E;
  T* const R = c.X + c.K * kTile;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ acc = c.acc;
  const T* __restrict__ bsum = c.bsum;
  const T* __restrict__ D = c.D;
  const T* __restrict__ gD = c.gD;
  const T collab_scale = c.scale_collab;
  T* __restrict__ common = c.common;
  if (c.params.surrogate == kSurrogatePaper) {
    DS_SIMD
    for (int64_t i = 0; i < n; ++i)
      common[i] = routing_common<kSurrogatePaper>(collab_scale, acc[i], bsum[i], gD[i], D[i]);
  } else if (c.params.surrogate == kSurrogateOva) {
    DS_SIMD
    for (int64_t i = 0; i < n; ++i)
      common[i] = routing_common<kSurrogateOva>(collab_scale, acc[i], bsum[i], gD[i], D[i]);
  } else {
    DS_SIMD
    for (int64_t i = 0; i < n; ++i)
      common[i] = routing_common<kSurrogateSoftmax>(collab_scale, acc[i], bsum[i], gD[i], D[i]);
  }
  const T paper_eps = static_cast<T>(c.params.paper_eps);
  for (int64_t m = 0; m <= E; ++m) {
    T* __restrict__ r = R + m * kTile;
    const T* __restrict__ p = c.pi + m * kTile;
    const T* __restrict__ ck = c.ck + m * kTile;
    const T balance_coef = c.bal[m];
    const T expert = m < E ? T(1) : T(0);
    if (c.params.surrogate == kSurrogatePaper) {
      const T base = paper_base<T>(m < E), slope = paper_slope<T>(m < E);
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T cv = ck[i], pv = p[i];
        const T g_m = (base + slope * cv) / (pv + paper_eps);
        const T g = routing_grad<kSurrogatePaper>(pv, common[i], balance_coef, gD[i], expert,
                                                  collab_scale, cv, g_m);
        r[i] = sel(valid[i] != T(0), g, T(0));
      }
    } else if (c.params.surrogate == kSurrogateOva) {
      // The logits of this row (rin) are read before rout, the same row of X when Xin
      // is X, is written, pixel by pixel (so neither pointer is restrict).
      const T* rin = Rin + m * c.xs;
      T* rout = R + m * kTile;
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T cv = ck[i];
        T g_m;
        ova_channel(rin[i], cv, g_m);
        const T g = routing_grad<kSurrogateOva>(p[i], common[i], balance_coef, gD[i], expert,
                                                collab_scale, cv, g_m);
        rout[i] = sel(valid[i] != T(0), g, T(0));
      }
    } else {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T g = routing_grad<kSurrogateSoftmax>(p[i], common[i], balance_coef, gD[i], expert,
                                                    collab_scale, ck[i], T(0));
        r[i] = sel(valid[i] != T(0), g, T(0));
      }
    }
  }
}

// Every term of a tile and, when c.grad, the gradient (written over X).
// Loaded: X (all C rows), valid, yf, y, ck rows 0..E-1; for coherence the neighbour
// masks, vm and maps.
// out: kNumSums partial sums.
template <typename T>
DS_LOSS_FN void loss_tile_impl(const TileCtx<T>& c) {
  class_weights(c);
  // segmentation: value, c0, gradient (written over the z rows)
  if (c.K == 1) {
    tile_seg_binary(c);
  } else {
    tile_seg_softmax(c);
  }
  // routing: the logits of the routing rows (those rows themselves when Xin is X)
  const T* const Rin = c.Xin + c.K * c.xs;
  // The "benefit" gate target needs c0 (made above) and the c_k rows.
  if (c.benefit()) benefit_target(c, Rin);
  if (tile_rest_fast(c, Rin)) return;
  tile_routing_logs(c, Rin, c.params.surrogate == kSurrogateSoftmax);
  tile_collab(c, Rin);
  tile_balance_sums(c);
  tile_gate_term(c, Rin);
  tile_coherence_all(c);
  if (c.grad) {
    tile_gate_grad(c);
    tile_routing_grad(c, Rin);
  }
  tile_term_sums(c);
}

// ---------------------------------------------------------------------------
// Compute entry points: one per accumulation type and instruction set, declared here.
// Each instruction set's are defined in a translation unit of their own, so that a
// parallel build compiles the three at the same time (each holds every step of the
// tile, inlined): the baseline ones where DS_TILE_ENTRIES_BASE is defined
// (loss_cpu.cpp), the x86-64-v3 and -v4 ones where DS_TILE_ENTRIES_V3 / _V4 is
// (loss_tile_v3.cpp, loss_tile_v4.cpp). float64 (used for gradcheck) is built for the
// baseline only.
// ---------------------------------------------------------------------------
#define DS_COMPUTE_ENTRIES(ATTR, SUFFIX)                  \
  ATTR void stats_tile_##SUFFIX(const TileCtx<float>& c); \
  ATTR void maps_tile_##SUFFIX(const TileCtx<float>& c);  \
  ATTR void loss_tile_##SUFFIX(const TileCtx<float>& c);
#define DS_COMPUTE_ENTRY_DEFS(ATTR, SUFFIX)                                             \
  ATTR void stats_tile_##SUFFIX(const TileCtx<float>& c) { stats_tile_impl<float>(c); } \
  ATTR void maps_tile_##SUFFIX(const TileCtx<float>& c) { maps_tile_impl<float>(c); }   \
  ATTR void loss_tile_##SUFFIX(const TileCtx<float>& c) { loss_tile_impl<float>(c); }
#define DS_NO_ATTR
DS_COMPUTE_ENTRIES(DS_NO_ATTR, base)
void stats_tile_base(const TileCtx<double>& c);
void maps_tile_base(const TileCtx<double>& c);
void loss_tile_base(const TileCtx<double>& c);
#ifdef DS_TILE_ENTRIES_BASE
DS_COMPUTE_ENTRY_DEFS(DS_NO_ATTR, base)
void stats_tile_base(const TileCtx<double>& c) { stats_tile_impl<double>(c); }
void maps_tile_base(const TileCtx<double>& c) { maps_tile_impl<double>(c); }
void loss_tile_base(const TileCtx<double>& c) { loss_tile_impl<double>(c); }
#endif
#if DS_X86_VARIANTS
DS_COMPUTE_ENTRIES(DS_TARGET_V3, v3)
DS_COMPUTE_ENTRIES(DS_TARGET_V4, v4)
#ifdef DS_TILE_ENTRIES_V3
DS_COMPUTE_ENTRY_DEFS(DS_TARGET_V3, v3)
#endif
#ifdef DS_TILE_ENTRIES_V4
DS_COMPUTE_ENTRY_DEFS(DS_TARGET_V4, v4)
#endif
#endif

#if DS_X86_VARIANTS
#define DS_COMPUTE_DISPATCH(NAME)                \
  if constexpr (std::is_same<T, float>::value) { \
    if (ISA == kIsaV4) return NAME##_v4(c);      \
    if (ISA == kIsaV3) return NAME##_v3(c);      \
  }                                              \
  NAME##_base(c);
#else
#define DS_COMPUTE_DISPATCH(NAME) NAME##_base(c);
#endif
template <int ISA, typename T>
DS_INLINE void stats_tile(const TileCtx<T>& c) {
  DS_COMPUTE_DISPATCH(stats_tile)
}
template <int ISA, typename T>
DS_INLINE void maps_tile(const TileCtx<T>& c) {
  DS_COMPUTE_DISPATCH(maps_tile)
}
template <int ISA, typename T>
DS_INLINE void loss_tile(const TileCtx<T>& c) {
  DS_COMPUTE_DISPATCH(loss_tile)
}

DS_FP_REGION_END
}  // namespace cpu_loss
}  // namespace deferredseg
