// The steps of a tile's computation on the CPU (vectorised loops over its pixels):
// the routing softmax, the stats of a tile, its maps and the gate term. loss_tile.h
// puts them together. Part of loss_cpu.cpp's translation unit (only it includes this
// file).
#pragma once

#include <cstdint>
#include <type_traits>

#include "tile.h"

namespace deferredseg {
namespace cpu_loss {

DS_FP_REGION_BEGIN

// best = max and idx = argmax (first index; a NaN wins, as argmax_step says) of the
// `rows` rows at R (rs apart), a loop a row.
template <typename T>
DS_LOSS_FN void rows_argmax(int64_t n, const T* R, int64_t rs, int64_t rows, T* __restrict__ best,
                            int32_t* __restrict__ idx) {
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    best[i] = R[i];
    idx[i] = 0;
  }
  for (int64_t k = 1; k < rows; ++k) {
    const T* __restrict__ r = R + k * rs;
    const int32_t kk = static_cast<int32_t>(k);
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) {
      const T v = r[i], cur = best[i];
      const int32_t cur_i = idx[i];
      const bool take = argmax_step(v, cur);
      best[i] = sel(take, v, cur);
      idx[i] = sel(take, kk, cur_i);
    }
  }
}

// rb, ri: the max and argmax of the E + 1 routing rows at R (rs apart).
template <typename T>
DS_LOSS_FN void tile_argmax(const TileCtx<T>& c, const T* R, int64_t rs, int64_t E) {
  rows_argmax(c.n, R, rs, E + 1, c.rb, c.ri);
}

// tile_routing for a compile-time E: one loop, the E + 1 channels of a pixel in
// registers. The same operations in the same order as the generic loops below, so
// the results are the same bits.
template <int E, bool LOG, typename T>
DS_LOSS_FN void tile_routing_fast(const TileCtx<T>& c, const T* R, int64_t xs) {
  const int64_t n = c.n;
  T* __restrict__ pi = c.pi;
  const T* __restrict__ rb = c.rb;
  T* __restrict__ rs = c.rs;
  T* __restrict__ rinv = c.rinv;
  T* __restrict__ rlog = c.rlog;
  T* __restrict__ D = c.D;
  // The NaN-aware argmax, a loop a channel (GCC does not vectorise it unrolled
  // inside the loop below).
  tile_argmax(c, R, xs, E);
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    T e[E + 1];
    const T b = rb[i];
    T s = T(0), d = T(0);
#pragma GCC unroll 8
    for (int k = 0; k <= E; ++k) {
      e[k] = exp_nonpos(R[k * xs + i] - b);
      s += e[k];
      if (k < E) d += e[k];
    }
    const T inv = T(1) / s;
#pragma GCC unroll 8
    for (int k = 0; k <= E; ++k) pi[k * kTile + i] = e[k] * inv;
    rs[i] = s;
    rinv[i] = inv;
    D[i] = d * inv;
    if (LOG) rlog[i] = log_pos(s);
  }
}

// Runs the statement with the constant NE = the E of the tile (1 .. kFastMaxExperts).
// (A macro, not a lambda: GCC compiles a lambda for the default instruction set even
// inside a function built for x86-64-v3 / v4.)
#define DS_WITH_FAST_E(E, ...) \
  switch (E) {                 \
    case 1: {                  \
      constexpr int NE = 1;    \
      __VA_ARGS__;             \
      break;                   \
    }                          \
    case 2: {                  \
      constexpr int NE = 2;    \
      __VA_ARGS__;             \
      break;                   \
    }                          \
    case 3: {                  \
      constexpr int NE = 3;    \
      __VA_ARGS__;             \
      break;                   \
    }                          \
    default: {                 \
      constexpr int NE = 4;    \
      __VA_ARGS__;             \
      break;                   \
    }                          \
  }

// Routing softmax of the E + 1 logit rows at R (xs apart): argmax (ri), max (rb), sum
// of exps (rs), its inverse and log, D = sum_{j<E} pi_j, and pi.
template <typename T>
DS_LOSS_FN void tile_routing(const TileCtx<T>& c, const T* R, int64_t xs, bool want_log) {
  const int64_t n = c.n, E = c.E;
  if constexpr (std::is_same<T, float>::value) {
    if (c.fast) {
      if (want_log) {
        DS_WITH_FAST_E(E, tile_routing_fast<NE, true>(c, R, xs))
      } else {
        DS_WITH_FAST_E(E, tile_routing_fast<NE, false>(c, R, xs))
      }
      return;
    }
  }
  tile_argmax(c, R, xs, E);
  const T* __restrict__ rb = c.rb;
  T* __restrict__ rs = c.rs;
  T* __restrict__ D = c.D;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    rs[i] = T(0);
    D[i] = T(0);
  }
  for (int64_t k = 0; k <= E; ++k) {
    const T* __restrict__ r = R + k * xs;
    T* __restrict__ p = c.pi + k * kTile;
    if (k < E) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T e = exp_nonpos(r[i] - rb[i]);
        p[i] = e;
        rs[i] += e;
        D[i] += e;
      }
    } else {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T e = exp_nonpos(r[i] - rb[i]);
        p[i] = e;
        rs[i] += e;
      }
    }
  }
  T* __restrict__ rinv = c.rinv;
  T* __restrict__ rlog = c.rlog;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const T inv = T(1) / rs[i];
    rinv[i] = inv;
    D[i] *= inv;
  }
  if (want_log) {
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) rlog[i] = log_pos(rs[i]);
  }
  for (int64_t k = 0; k <= E; ++k) {
    T* __restrict__ p = c.pi + k * kTile;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) p[i] *= rinv[i];
  }
}

// Stats of a tile, at their places in the stats vector: out[k] = sum_V pi_k (k = 0..E),
// out[stat_count(E)] = N_V, out[stat_weight(E)] = W.
// X holds the E + 1 routing rows; valid and y are loaded.
template <typename T>
DS_LOSS_FN void class_weights(const TileCtx<T>& c) {
  const int64_t n = c.n;
  T* __restrict__ w = c.w;
  const int32_t* __restrict__ y = c.y;
  if (c.cw != nullptr) {
    const T* __restrict__ cw = c.cw;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) w[i] = cw[y[i]];
  } else {
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) w[i] = T(1);
  }
}

// stats_tile for a compile-time E: one loop for the maximum, the softmax and every
// sum, the routing rows at Xin.
template <int E, typename T>
DS_LOSS_FN void stats_tile_fast(const TileCtx<T>& c) {
  const int64_t n = c.n;
  const T* __restrict__ R = c.Xin;
  const int64_t rs = c.xs;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ w = c.w;
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0), s4 = T(0), nv = T(0), wsum = T(0);
  DS_SIMD_SUM(s0, s1, s2, s3, s4, nv, wsum)
  for (int64_t i = 0; i < n; ++i) {
    // The maximum, a NaN winning: the value of rows_argmax for finite rows (any NaN
    // makes the sums NaN either way); argmax_step itself keeps GCC from vectorising
    // this loop.
    T b = R[i];
#pragma GCC unroll 8
    for (int k = 1; k <= E; ++k) {
      const T rk = R[k * rs + i];
      b = sel((rk > b) | (rk != rk), rk, b);
    }
    T e[E + 1];
    T s = T(0);
#pragma GCC unroll 8
    for (int k = 0; k <= E; ++k) {
      e[k] = exp_nonpos(R[k * rs + i] - b);
      s += e[k];
    }
    const T inv = T(1) / s;
    const bool ok = valid[i] != T(0);
    s0 += sel(ok, e[0] * inv, T(0));
    s1 += sel(ok, e[1] * inv, T(0));
    if (E >= 2) s2 += sel(ok, e[E >= 2 ? 2 : 0] * inv, T(0));
    if (E >= 3) s3 += sel(ok, e[E >= 3 ? 3 : 0] * inv, T(0));
    if (E >= 4) s4 += sel(ok, e[E >= 4 ? 4 : 0] * inv, T(0));
    const T wv = w[i];
    nv += valid[i];
    wsum += sel(ok, wv, T(0));
  }
  const T sums[5] = {s0, s1, s2, s3, s4};
  for (int k = 0; k <= E; ++k) c.out[k] = sums[k];
  c.out[stat_count(E)] = nv;
  c.out[stat_weight(E)] = wsum;
}

template <typename T>
DS_LOSS_FN void stats_tile_impl(const TileCtx<T>& c) {
  class_weights(c);
  if constexpr (std::is_same<T, float>::value) {
    if (c.fast) {
      DS_WITH_FAST_E(c.E, stats_tile_fast<NE>(c))
      return;
    }
  }
  tile_routing(c, c.Xin, c.xs, false);
  const int64_t n = c.n;
  const T* __restrict__ valid = c.valid;
  for (int64_t k = 0; k <= c.E; ++k) {
    const T* __restrict__ p = c.pi + k * kTile;
    T s = T(0);
    DS_SIMD_SUM(s)
    for (int64_t i = 0; i < n; ++i) {
      const T pv = p[i];
      s += sel(valid[i] != T(0), pv, T(0));
    }
    c.out[k] = s;
  }
  T nv = T(0), wsum = T(0);
  const T* __restrict__ w = c.w;
  DS_SIMD_SUM(nv, wsum)
  for (int64_t i = 0; i < n; ++i) {
    const T wv = w[i];
    nv += valid[i];
    wsum += sel(valid[i] != T(0), wv, T(0));
  }
  c.out[stat_count(c.E)] = nv;
  c.out[stat_weight(c.E)] = wsum;
}

// The gate term of a tile with gate logits a (needs D, and ri for the "router" target,
// tg for "benefit"): lgate, its derivative dgate with respect to a, dsa = ds/da, and
// with S also s = sigmoid(a) at mapS.
template <bool S, bool BENEFIT, typename T>
DS_LOSS_FN void tile_gate(const TileCtx<T>& c, const T* a) {
  const int64_t n = c.n;
  const int32_t Ei = static_cast<int32_t>(c.E);
  const int32_t* __restrict__ ri = c.ri;
  const T* __restrict__ tg = c.tg;
  const T* __restrict__ D = c.D;
  T* __restrict__ lgate = c.lgate;
  T* __restrict__ dgate = c.dgate;
  T* __restrict__ dsa = c.dsa;
  T* __restrict__ ms = c.mapS;
  const T gate_mse = static_cast<T>(c.params.gate_mse);
  const T gate_sparsity = static_cast<T>(c.params.gate_sparsity);
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const T h = BENEFIT ? tg[i] : gate_target_pixel<false>(ri[i] < Ei, T(0), T(0));
    T l, dl, sv, ds;
    gate_pixel(a[i], h, D[i], gate_mse, gate_sparsity, l, dl, sv, ds);
    lgate[i] = l;
    dgate[i] = dl;
    dsa[i] = ds;
    if (S) ms[i] = sv;
  }
}

// Maps of a tile: the valid mask, D (router) and s = sigmoid(a) (gate), written at
// vm_out, mapD, mapS; the routing and the gate term stay in the tile's arrays. Xin
// holds the E + 1 routing rows then the gate row.
template <typename T>
DS_LOSS_FN void maps_tile_impl(const TileCtx<T>& c) {
  const int64_t n = c.n;
  {
    const T* __restrict__ valid = c.valid;
    T* __restrict__ vm = c.vm_out;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) vm[i] = sel(valid[i] != T(0), T(1), T(0));
  }
  // Routing and gate are kept for the tile's main pass (see fused_worker_impl).
  tile_routing(c, c.Xin, c.xs, false);
  if (c.params.coherence_maps & kMapRouter) {
    T* __restrict__ out = c.mapD;
    const T* __restrict__ D = c.D;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) out[i] = D[i];
  }
  const T* a = c.Xin + (c.E + 1) * c.xs;
  // With the "benefit" target the gate term needs the model's correctness, which the
  // main pass computes: it makes the term there; here only s is needed (for the map).
  if (c.params.coherence_maps & kMapGate) {
    tile_gate<true, false>(c, a);
  } else if (!c.benefit()) {
    tile_gate<false, false>(c, a);
  }
}

// The "benefit" gate target of a tile, tg = (1 - c0) c_jhat with jhat = argmax_{j<E} r_j
// (first maximum, a NaN winning, as rows_argmax), from the routing rows at Rin and the
// c_k rows (c0 in row E). zb and zi serve as scratch (free once c0 is made).
template <typename T>
DS_LOSS_FN void benefit_target(const TileCtx<T>& c, const T* Rin) {
  const int64_t n = c.n, E = c.E;
  int32_t* __restrict__ jhat = c.zi;
  rows_argmax(n, Rin, c.xs, E, c.zb, jhat);
  T* __restrict__ tg = c.tg;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) tg[i] = T(0);
  for (int64_t j = 0; j < E; ++j) {  // tg = c_jhat
    const T* __restrict__ ck = c.ck + j * kTile;
    const int32_t jj = static_cast<int32_t>(j);
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) {
      const T cur = tg[i], cv = ck[i];
      tg[i] = sel(jhat[i] == jj, cv, cur);
    }
  }
  const T* __restrict__ c0 = c.ck + E * kTile;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) tg[i] = gate_target_pixel<true>(false, c0[i], tg[i]);
}

DS_FP_REGION_END
}  // namespace cpu_loss
}  // namespace deferredseg
