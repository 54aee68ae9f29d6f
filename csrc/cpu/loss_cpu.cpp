// CPU kernels of `deferredseg::loss_stats` and `deferredseg::loss_fused` (docs/objective.md, "Terms";
// the contract of both ops is documented in deferredseg_kernels/ops/fused.py).
//
// Work unit: a tile of kTile consecutive pixels of one batch element. A tile is
// loaded into structure-of-arrays buffers (one row of kTile values a channel,
// converted to the accumulation type) and every step is a loop over the pixels
// of a row, so the loops vectorise; the per-pixel formulas are those of
// loss_pixel.h, shared with the CUDA kernels.
//
// Each op is one parallel pass over the tiles. loss_fused needs, for the
// coherence term, the maps D and s and the valid mask at the neighbours of each
// pixel; every thread computes them tile by tile into its own window buffer,
// just ahead of the tile being processed (the neighbours along the first axis
// are prod(S[1:]) pixels away), so they are computed from data that is in cache
// anyway and the window stays in cache until it is read. The routing softmax a
// map tile computes is kept (RoutingRing) for the tile's own main pass.
//
// Determinism: tiles are fixed by the shape alone, and every value a tile
// produces is a function of the tile (a map tile is always computed as a whole
// tile, whichever thread computes it). Each tile writes its partial sums to its
// own row; the rows are added in tile order in double. Results do not depend on
// the number of threads or on their timing.
//
// Instruction sets: on x86-64 the kernels are compiled three times (baseline,
// x86-64-v3 = AVX2 + FMA, x86-64-v4 = AVX-512) and the best one the CPU supports
// runs; the environment variable DEFERREDSEG_CPU_ISA=base|v3|v4 caps the choice
// (read once; used by the tests to check every variant).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../dispatch.h"  // AccType

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DS_HAVE_STREAM 1
#else
#define DS_HAVE_STREAM 0
#endif

// The kernel code is built with -fno-trapping-math (GCC): it never reads the
// floating-point exception flags, and without it GCC does not if-convert a select
// whose operand it has sunk into a branch, so the loops over pixels would stay
// scalar. The option changes no value (it is not -ffast-math).
#if defined(__GNUC__) && !defined(__clang__)
#define DS_FP_REGION_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define DS_FP_REGION_END _Pragma("GCC pop_options")
#else
#define DS_FP_REGION_BEGIN
#define DS_FP_REGION_END
#endif

DS_FP_REGION_BEGIN
#include "../loss_pixel.h"
DS_FP_REGION_END
#include "../loss.h"

#define DS_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
#define DS_SIMD DS_PRAGMA(omp simd)
#define DS_SIMD_SUM(...) DS_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define DS_SIMD DS_PRAGMA(GCC ivdep)
#define DS_SIMD_SUM(...)
#endif

#if defined(__GNUC__)
#define DS_INLINE inline __attribute__((always_inline))
#else
#define DS_INLINE inline
#endif

// Per-ISA variants (x86-64 Linux with GCC >= 12; elsewhere only the baseline).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DS_X86_VARIANTS 1
#define DS_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define DS_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define DS_X86_VARIANTS 0
#endif

namespace deferredseg {
namespace cpu_loss {

using namespace loss;

constexpr int64_t kTile = 256;       // pixels a tile
constexpr int64_t kGrainTiles = 16;  // a thread takes at least this many tiles
// A gradient at least this large is written with non-temporal stores (see stream_row):
// it would not stay in a core's cache anyway.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

enum Isa { kIsaBase = 0, kIsaV3 = 1, kIsaV4 = 2 };

// The instruction set the kernels use: the best the CPU has, capped by DEFERREDSEG_CPU_ISA.
inline int cpu_isa() {
  static const int isa = [] {
    int best = kIsaBase;
#if DS_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      best = kIsaV4;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      best = kIsaV3;
    }
#endif
    const char* env = std::getenv("DEFERREDSEG_CPU_ISA");
    if (env != nullptr) {
      const std::string v(env);
      const int cap = v == "base" ? kIsaBase : v == "v3" ? kIsaV3 : kIsaV4;
      best = std::min(best, cap);
    }
    return best;
  }();
  return isa;
}

// Experts up to this many take the unrolled paths below (one loop over the pixels of a
// tile instead of O(E) loops); DEFERREDSEG_CPU_GENERIC=1 (read once) sends every E
// to the generic path, so that the tests can check both.
constexpr int64_t kFastMaxExperts = 4;
inline bool cpu_fast_paths() {
  static const bool fast = [] {
    const char* env = std::getenv("DEFERREDSEG_CPU_GENERIC");
    return !(env != nullptr && std::string(env) == "1");
  }();
  return fast;
}

// Spatial layout: sizes, flattened strides and the tiling of the pixels.
struct Geometry {
  int nd = 1;
  int64_t S[kMaxSpatial] = {1, 1, 1};
  int64_t st[kMaxSpatial] = {1, 1, 1};
  int64_t B = 0, P = 0, tiles_per_batch = 0, tiles = 0;
  int64_t pad = 1;    // margin of the per-pixel window buffers: the largest stride
  int64_t ahead = 1;  // tiles a neighbour can be away: ceil(pad / kTile)

  explicit Geometry(const LossProblem& pb) : nd(pb.nd), B(pb.B), P(pb.P) {
    for (int d = 0; d < nd; ++d) {
      S[d] = pb.S[d];
      st[d] = pb.st[d];
      pad = std::max(pad, st[d]);
    }
    tiles_per_batch = (P + kTile - 1) / kTile;
    tiles = B * tiles_per_batch;
    ahead = (pad + kTile - 1) / kTile;
  }
  int64_t batch(int64_t t) const { return t / tiles_per_batch; }
  int64_t index(int64_t t) const { return t % tiles_per_batch; }
  int64_t first(int64_t t) const { return index(t) * kTile; }
  int64_t count(int64_t t) const { return std::min(kTile, P - first(t)); }
};

// Neighbour masks along axis d of the pixels p0 .. p0 + n - 1 of one batch element:
// hp[i] = 1 when pixel p0 + i has a neighbour at p - st[d] (its coordinate along d is
// > 0), hn[i] = 1 when it has one at p + st[d], else 0. Along d the coordinate
// repeats with period Q = S[d] * st[d]: coordinate 0 is the pixels [k Q, k Q + st[d]),
// coordinate S[d] - 1 the pixels [(k + 1) Q - st[d], (k + 1) Q). Inlined into the
// per-ISA workers, so the fills vectorise.
template <typename T>
DS_INLINE void zero_runs(T* m, int64_t p0, int64_t n, int64_t Q, int64_t off, int64_t len) {
  // runs [k Q + off, k Q + off + len) that end after p0: k >= ceil((p0 - off - len + 1) / Q)
  const int64_t x = p0 - off - len + 1;
  const int64_t k0 = x > 0 ? (x + Q - 1) / Q : 0;
  for (int64_t r = k0 * Q + off; r < p0 + n; r += Q) {
    const int64_t lo = std::max(r, p0), hi = std::min(r + len, p0 + n);
    for (int64_t i = lo; i < hi; ++i) m[i - p0] = T(0);
  }
}
template <typename T>
DS_INLINE void axis_masks(const Geometry& g, int d, int64_t p0, int64_t n, T* __restrict__ hp,
                          T* __restrict__ hn) {
  const int64_t s = g.st[d], Q = g.S[d] * s;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    hp[i] = T(1);
    hn[i] = T(1);
  }
  zero_runs(hp, p0, n, Q, 0, s);
  zero_runs(hn, p0, n, Q, Q - s, s);
}

// The neighbour masks of a thread's tiles, axis by axis: an axis whose period Q is
// short gets a table over Q + kTile pixels (the masks of a tile at p0 are the table
// at p0 mod Q); on another axis a tile whose pixels all share one coordinate along it
// gets a row of ones or zeros; any other tile computes its masks into its own rows.
constexpr int64_t kMaskPeriodMax = 8192;
template <typename T>
struct NeighbourMasks {
  std::vector<T> tab[kMaxSpatial][2];
  std::vector<T> ones, zeros;
  NeighbourMasks(const Geometry& g, bool want) {
    if (!want) return;
    ones.assign(kTile, T(1));
    zeros.assign(kTile, T(0));
    for (int d = 0; d < g.nd; ++d) {
      const int64_t Q = g.S[d] * g.st[d];
      if (Q > kMaskPeriodMax) continue;
      tab[d][0].resize(static_cast<size_t>(Q + kTile));
      tab[d][1].resize(static_cast<size_t>(Q + kTile));
      axis_masks(g, d, 0, Q + kTile, tab[d][0].data(), tab[d][1].data());
    }
  }
};
// Points hp / hn (or computes them into the tile's rows own_p / own_n) for the tile
// at p0 of n pixels.
template <typename T>
DS_INLINE void point_masks(NeighbourMasks<T>& nm, const Geometry& g, int64_t p0, int64_t n, T** hp, T** hn,
                           T* const* own_p, T* const* own_n) {
  for (int d = 0; d < g.nd; ++d) {
    const int64_t s = g.st[d], Q = g.S[d] * s;
    if (!nm.tab[d][0].empty()) {
      hp[d] = nm.tab[d][0].data() + p0 % Q;
      hn[d] = nm.tab[d][1].data() + p0 % Q;
    } else if (p0 / s == (p0 + n - 1) / s) {
      const int64_t cd = (p0 / s) % g.S[d];
      hp[d] = cd > 0 ? nm.ones.data() : nm.zeros.data();
      hn[d] = cd < g.S[d] - 1 ? nm.ones.data() : nm.zeros.data();
    } else {
      hp[d] = own_p[d];
      hn[d] = own_n[d];
      axis_masks(g, d, p0, n, hp[d], hn[d]);
    }
  }
}

DS_FP_REGION_BEGIN

// ---------------------------------------------------------------------------
// A tile's buffers and options. Arrays are kTile long; X, ck and pi hold one
// kTile row a channel.
// ---------------------------------------------------------------------------
template <typename T>
struct TileCtx {
  // options (constant over the tiles of a call)
  int64_t K = 1, E = 1;
  int nd = 1;
  int64_t st[kMaxSpatial] = {0, 0, 0};
  int surrogate = kSurrogateSoftmax;  // kSurrogate*: "softmax", "paper" or "ova"
  bool benefit = false;               // gate_target "benefit" (else "router")
  bool l2 = false, grad = false;
  bool routing_ready = false;  // rb, ri, rs, rinv, D, pi and lgate, dgate, dsa already hold this tile's
                               // routing and gate term (computed by maps_tile), valid / yf / y its target
  bool fast = false;           // E <= kFastMaxExperts, float accumulation: the unrolled paths
  int maps = 0;
  T gate_mse = 0, gate_sparsity = 0, eps = 0;
  T scale_seg = 0, scale_collab = 0, scale_gate = 0;
  T scale_coh[kMaxSpatial] = {0, 0, 0};
  const T* bal = nullptr;  // E + 1 balance coefficients lambda_balance * scale * dBAL/dS_k
  const T* cw = nullptr;   // class weights (K' values) or null

  // the tile
  int64_t n = 0;
  T* X = nullptr;   // logits in (stats: the E + 1 routing channels; maps: routing + gate), gradient out
  // The logits of the tile as X holds them (same rows), xs apart: X itself (xs = kTile)
  // after load_rows, or the input tensor, read in place (float or double logits of
  // unit pixel stride). Logits are read from Xin, gradients written to X.
  const T* Xin = nullptr;
  int64_t xs = kTile;
  T* ck = nullptr;  // c_k: expert j correct (rows 0..E-1), model correct c0 (row E)
  T* pi = nullptr;  // routing probabilities
  T *valid, *yf, *w, *zb, *zs, *zy, *rb, *rs, *rinv, *rlog, *D, *lseg, *lcol, *lgate, *dgate, *dsa, *acc, *bsum,
      *common, *gD, *gS;
  T* tg = nullptr;  // the gate's target with gate_target "benefit" (benefit_target)
  T* hp[kMaxSpatial];  // the tile's neighbour masks (point_masks): 1 where p - st[d] is in the volume
  T* hn[kMaxSpatial];  // ... where p + st[d] is
  int32_t *y, *zi, *ri;

  // per-pixel buffers at the tile's first pixel (padded: p - pad .. p + pad readable)
  const T* vm = nullptr;  // valid mask (0 / 1)
  T* vm_out = nullptr;    // maps: the valid mask written
  T* mapD = nullptr;
  T* mapS = nullptr;

  T* out = nullptr;  // the tile's partial sums (accumulation type)
};

// The buffers of one thread, bound to a TileCtx.
template <typename T>
struct Workspace {
  static constexpr int kNamed = 22;
  std::vector<T> f;
  std::vector<int32_t> i32;
  std::vector<int64_t> i64;

  Workspace(int64_t C, int64_t E) {
    f.resize(static_cast<size_t>((C + 2 * (E + 1) + kNamed + 2 * kMaxSpatial) * kTile + 64));
    i32.resize(3 * kTile);
    i64.resize(kTile);
  }
  void bind(TileCtx<T>& c, int64_t C, int64_t E) {
    T* p = f.data();
    auto take = [&](int64_t rows) {
      T* r = p;
      p += rows * kTile;
      return r;
    };
    c.X = take(C);
    c.ck = take(E + 1);
    c.pi = take(E + 1);
    T** named[kNamed] = {&c.valid, &c.yf, &c.w, &c.zb, &c.zs, &c.zy, &c.rb, &c.rs, &c.rinv, &c.rlog, &c.D,
                         &c.lseg, &c.lcol, &c.lgate, &c.dgate, &c.dsa, &c.acc, &c.bsum, &c.common, &c.gD, &c.gS,
                         &c.tg};
    for (T** q : named) *q = take(1);
    for (int d = 0; d < kMaxSpatial; ++d) {
      c.hp[d] = take(1);
      c.hn[d] = take(1);
    }
    c.y = i32.data();
    c.zi = i32.data() + kTile;
    c.ri = i32.data() + 2 * kTile;
  }
  int64_t* tv() { return i64.data(); }
};

// ---------------------------------------------------------------------------
// Compute steps on a loaded tile (vectorised loops over its pixels).
// ---------------------------------------------------------------------------

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
#define DS_WITH_FAST_E(E, ...)   \
  switch (E) {                   \
    case 1: {                    \
      constexpr int NE = 1;      \
      __VA_ARGS__;               \
      break;                     \
    }                            \
    case 2: {                    \
      constexpr int NE = 2;      \
      __VA_ARGS__;               \
      break;                     \
    }                            \
    case 3: {                    \
      constexpr int NE = 3;      \
      __VA_ARGS__;               \
      break;                     \
    }                            \
    default: {                   \
      constexpr int NE = 4;      \
      __VA_ARGS__;               \
      break;                     \
    }                            \
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

// Stats of a tile: out[k] = sum_V pi_k (k = 0..E), out[E + 1] = N_V, out[E + 2] = W.
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
  c.out[E + 1] = nv;
  c.out[E + 2] = wsum;
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
  c.out[c.E + 1] = nv;
  c.out[c.E + 2] = wsum;
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
  const T gm = c.gate_mse, gsp = c.gate_sparsity;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const T h = BENEFIT ? tg[i] : gate_target_pixel<false>(ri[i] < Ei, T(0), T(0));
    T l, dl, sv, ds;
    gate_pixel(a[i], h, D[i], gm, gsp, l, dl, sv, ds);
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
  if (c.maps & kMapRouter) {
    T* __restrict__ out = c.mapD;
    const T* __restrict__ D = c.D;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) out[i] = D[i];
  }
  const T* a = c.Xin + (c.E + 1) * c.xs;
  // With the "benefit" target the gate term needs the model's correctness, which the
  // main pass computes: it makes the term there; here only s is needed (for the map).
  if (c.maps & kMapGate) {
    tile_gate<true, false>(c, a);
  } else if (!c.benefit) {
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
    if (d < c.nd && c.maps != 0) {
      const bool dm = (c.maps & kMapRouter) != 0, sm = (c.maps & kMapGate) != 0;
      if (c.l2) {
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

// Everything after the segmentation term, for a compile-time E: collab, balance,
// gate, and (GRAD) the gradient of the routing and gate logits, in one loop with the
// E + 1 channels of a pixel in registers. Needs: the routing of the tile (pi, rb, rs,
// D), its gate term (tile_gate), the coherence derivatives gD, gS
// (tile_coherence_all), lseg and the c_k rows.
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
  const T* __restrict__ lseg = c.lseg;
  const T* __restrict__ lgate = c.lgate;
  const T* __restrict__ dgate = c.dgate;
  const T* __restrict__ dsa = c.dsa;
  T bal[E + 1];
  for (int k = 0; k <= E; ++k) bal[k] = c.bal[k];
  const T cc = c.scale_collab, cg = c.scale_gate, eps = c.eps;
  T sseg = T(0), scol = T(0), sgate = T(0);
  DS_SIMD_SUM(sseg, scol, sgate)
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = valid[i] != T(0);
    T ck[E + 1], p[E + 1], gk[E + 1];
#pragma GCC unroll 8
    for (int k = 0; k <= E; ++k) {
      ck[k] = ckr[k * kTile + i];
      p[k] = pi[k * kTile + i];
    }
    // collab value; acc = Ctot (softmax) or sum_k g_k pi_k (paper); unused by ova
    T lcol = T(0), acc = T(0);
    if (SUR == kSurrogatePaper) {
#pragma GCC unroll 8
      for (int k = 0; k <= E; ++k) {
        const T coef = paper_base<T>(k < E) + paper_slope<T>(k < E) * ck[k];
        lcol += paper_channel(coef, p[k], eps, gk[k]);
        acc += gk[k] * p[k];
      }
    } else if (SUR == kSurrogateOva) {
#pragma GCC unroll 8
      for (int k = 0; k <= E; ++k) lcol += ova_channel(Rin[k * xs + i], ck[k], gk[k]);
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
    for (int k = 0; k <= E; ++k) bsum += bal[k] * p[k];
    if (GRAD) {
      const T ga = cg * dgate[i] + gS[i] * dsa[i];
      const T common = routing_common<SUR>(cc, acc, bsum, gD[i], D[i]);
#pragma GCC unroll 8
      for (int m = 0; m <= E; ++m) {
        const T g = routing_grad<SUR>(p[m], common, bal[m], gD[i], m < E ? T(1) : T(0), cc, ck[m], gk[m]);
        R[m * kTile + i] = sel(ok, g, T(0));
      }
      a[i] = sel(ok, ga, T(0));
    }
    const T lg = lgate[i];
    sseg += lseg[i];
    scol += sel(ok, lcol, T(0));
    sgate += sel(ok, lg, T(0));
  }
  c.out[kSumSeg] = sseg;
  c.out[kSumCollab] = scol;
  c.out[kSumGate] = sgate;
}

// Every term of a tile and, when c.grad, the gradient (written over X).
// Loaded: X (all C rows), valid, yf, y, ck rows 0..E-1; for coherence the neighbour
// masks, vm and maps.
// out: kNumSums partial sums.
template <typename T>
DS_LOSS_FN void loss_tile_impl(const TileCtx<T>& c) {
  class_weights(c);
  const int64_t n = c.n, K = c.K, E = c.E;
  const T* __restrict__ valid = c.valid;
  const T* __restrict__ yf = c.yf;
  const int32_t* __restrict__ y = c.y;
  const T* __restrict__ w = c.w;
  T* __restrict__ lseg = c.lseg;
  T* __restrict__ c0 = c.ck + E * kTile;

  // ---- segmentation: value, c0, gradient (written over the z rows) ----
  const T seg_scale = c.scale_seg;
  if (K == 1) {
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
      const T yv = yf[i];  // 0 or 1
      c0[i] = sel(zi > T(0), yv, T(1) - yv);  // (z > 0) == y
      z[i] = sel(ok, g, T(0));
    }
  } else {
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
    T* __restrict__ coef = c.acc;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) {
      const bool ok = valid[i] != T(0);
      const T l = log_pos(zs[i]) - (zy[i] - zb[i]);  // -log softmax(z)_y
      const T wv = w[i];
      const T wl = wv * l, cf = seg_scale * wv;
      lseg[i] = sel(ok, wl, T(0));
      c0[i] = sel(zi[i] == y[i], T(1), T(0));
      coef[i] = sel(ok, cf, T(0));
      zs[i] = T(1) / zs[i];
    }
    for (int64_t k = 0; k < K; ++k) {
      T* __restrict__ z = c.X + k * kTile;
      const int32_t kk = static_cast<int32_t>(k);
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T g = coef[i] * (z[i] * zs[i] - sel(y[i] == kk, T(1), T(0)));
        z[i] = sel(valid[i] != T(0), g, T(0));
      }
    }
  }

  // ---- routing ----
  T* const R = c.X + K * kTile;
  const T* const Rin = c.Xin + K * c.xs;  // the logits of R (R itself when Xin is X)
  const bool softmax = c.surrogate == kSurrogateSoftmax;
  // The "benefit" gate target needs c0 (made above) and the c_k rows.
  if (c.benefit) benefit_target(c, Rin);
  if constexpr (std::is_same<T, float>::value) {
    if (c.fast) {
      if (!c.routing_ready) tile_routing(c, Rin, c.xs, false);
      if (c.benefit) {
        tile_gate<false, true>(c, Rin + (E + 1) * c.xs);
      } else if (!c.routing_ready) {
        tile_gate<false, false>(c, Rin + (E + 1) * c.xs);
      }
      tile_coherence_all(c);
      if (c.surrogate == kSurrogatePaper) {
        if (c.grad) {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogatePaper, true>(c))
        } else {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogatePaper, false>(c))
        }
      } else if (c.surrogate == kSurrogateOva) {
        if (c.grad) {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogateOva, true>(c))
        } else {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogateOva, false>(c))
        }
      } else {
        if (c.grad) {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogateSoftmax, true>(c))
        } else {
          DS_WITH_FAST_E(E, loss_rest_fast<NE, kSurrogateSoftmax, false>(c))
        }
      }
      return;
    }
  }
  if (!c.routing_ready) {
    tile_routing(c, Rin, c.xs, softmax);
  } else if (softmax) {
    const T* __restrict__ rs = c.rs;
    T* __restrict__ rlog = c.rlog;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) rlog[i] = log_pos(rs[i]);
  }
  const T* __restrict__ rb = c.rb;
  const T* __restrict__ rlog = c.rlog;
  const T* __restrict__ D = c.D;

  // collab value; acc = Ctot (softmax) or sum_k g_k pi_k (paper); unused by ova
  T* __restrict__ lcol = c.lcol;
  T* __restrict__ acc = c.acc;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    lcol[i] = T(0);
    acc[i] = T(0);
  }
  if (c.surrogate == kSurrogateOva) {
    for (int64_t k = 0; k <= E; ++k) {
      const T* __restrict__ r = Rin + k * c.xs;
      const T* __restrict__ ck = c.ck + k * kTile;
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        T g;
        lcol[i] += ova_channel(r[i], ck[i], g);
      }
    }
  } else if (softmax) {
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
    const T eps = c.eps;
    for (int64_t k = 0; k <= E; ++k) {
      const T* __restrict__ p = c.pi + k * kTile;
      const T* __restrict__ ck = c.ck + k * kTile;
      const T base = paper_base<T>(k < E), slope = paper_slope<T>(k < E);
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const T coef = base + slope * ck[i];
        T g;
        lcol[i] += paper_channel(coef, p[i], eps, g);
        acc[i] += g * p[i];
      }
    }
  }

  // balance: bsum = sum_k bal_k pi_k
  T* __restrict__ bsum = c.bsum;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) bsum[i] = T(0);
  for (int64_t k = 0; k <= E; ++k) {
    const T* __restrict__ p = c.pi + k * kTile;
    const T bk = c.bal[k];
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) bsum[i] += bk * p[i];
  }

  // gate
  T* __restrict__ a = c.X + (K + E + 1) * kTile;
  if (c.benefit) {
    tile_gate<false, true>(c, Rin + (E + 1) * c.xs);
  } else if (!c.routing_ready) {
    tile_gate<false, false>(c, Rin + (E + 1) * c.xs);
  }
  const T* __restrict__ lgate = c.lgate;
  const T* __restrict__ dgate = c.dgate;
  const T* __restrict__ dsa = c.dsa;

  tile_coherence_all(c);
  const T* __restrict__ gD = c.gD;
  const T* __restrict__ gS = c.gS;

  // ---- gradient ----
  if (c.grad) {
    const T cc = c.scale_collab, cg = c.scale_gate;
    DS_SIMD
    for (int64_t i = 0; i < n; ++i) {
      const T g = cg * dgate[i] + gS[i] * dsa[i];
      a[i] = sel(valid[i] != T(0), g, T(0));
    }
    T* __restrict__ common = c.common;
    if (c.surrogate == kSurrogatePaper) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) common[i] = routing_common<kSurrogatePaper>(cc, acc[i], bsum[i], gD[i], D[i]);
    } else if (c.surrogate == kSurrogateOva) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) common[i] = routing_common<kSurrogateOva>(cc, acc[i], bsum[i], gD[i], D[i]);
    } else {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) common[i] = routing_common<kSurrogateSoftmax>(cc, acc[i], bsum[i], gD[i], D[i]);
    }
    const T eps = c.eps;
    for (int64_t m = 0; m <= E; ++m) {
      T* __restrict__ r = R + m * kTile;
      const T* __restrict__ p = c.pi + m * kTile;
      const T* __restrict__ ck = c.ck + m * kTile;
      const T bm = c.bal[m];
      const T expert = m < E ? T(1) : T(0);
      if (c.surrogate == kSurrogatePaper) {
        const T base = paper_base<T>(m < E), slope = paper_slope<T>(m < E);
        DS_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const T cv = ck[i], pv = p[i];
          const T g_m = (base + slope * cv) / (pv + eps);
          const T g = routing_grad<kSurrogatePaper>(pv, common[i], bm, gD[i], expert, cc, cv, g_m);
          r[i] = sel(valid[i] != T(0), g, T(0));
        }
      } else if (c.surrogate == kSurrogateOva) {
        // The logits of this row (rin) are read before rout, the same row of X when Xin
        // is X, is written, pixel by pixel (so neither pointer is restrict).
        const T* rin = Rin + m * c.xs;
        T* rout = R + m * kTile;
        DS_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const T cv = ck[i];
          T g_m;
          ova_channel(rin[i], cv, g_m);
          const T g = routing_grad<kSurrogateOva>(p[i], common[i], bm, gD[i], expert, cc, cv, g_m);
          rout[i] = sel(valid[i] != T(0), g, T(0));
        }
      } else {
        DS_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const T g = routing_grad<kSurrogateSoftmax>(p[i], common[i], bm, gD[i], expert, cc, ck[i], T(0));
          r[i] = sel(valid[i] != T(0), g, T(0));
        }
      }
    }
  }

  // ---- sums ----
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


// ---------------------------------------------------------------------------
// Compute entry points: one per accumulation type and instruction set.
// ---------------------------------------------------------------------------
#define DS_NO_ATTR
// float64 (used for gradcheck) is built for the baseline only.
#define DS_COMPUTE_ENTRY(ATTR, NAME, IMPL) \
  ATTR void NAME(const TileCtx<float>& c) { IMPL<float>(c); }
DS_COMPUTE_ENTRY(DS_NO_ATTR, stats_tile_base, stats_tile_impl)
DS_COMPUTE_ENTRY(DS_NO_ATTR, maps_tile_base, maps_tile_impl)
DS_COMPUTE_ENTRY(DS_NO_ATTR, loss_tile_base, loss_tile_impl)
void stats_tile_base(const TileCtx<double>& c) { stats_tile_impl<double>(c); }
void maps_tile_base(const TileCtx<double>& c) { maps_tile_impl<double>(c); }
void loss_tile_base(const TileCtx<double>& c) { loss_tile_impl<double>(c); }
#if DS_X86_VARIANTS
DS_COMPUTE_ENTRY(DS_TARGET_V3, stats_tile_v3, stats_tile_impl)
DS_COMPUTE_ENTRY(DS_TARGET_V3, maps_tile_v3, maps_tile_impl)
DS_COMPUTE_ENTRY(DS_TARGET_V3, loss_tile_v3, loss_tile_impl)
DS_COMPUTE_ENTRY(DS_TARGET_V4, stats_tile_v4, stats_tile_impl)
DS_COMPUTE_ENTRY(DS_TARGET_V4, maps_tile_v4, maps_tile_impl)
DS_COMPUTE_ENTRY(DS_TARGET_V4, loss_tile_v4, loss_tile_impl)
#endif

#if DS_X86_VARIANTS
#define DS_COMPUTE_DISPATCH(NAME)                                  \
  if constexpr (std::is_same<T, float>::value) {                   \
    if (ISA == kIsaV4) return NAME##_v4(c);                        \
    if (ISA == kIsaV3) return NAME##_v3(c);                        \
  }                                                                \
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

// ---------------------------------------------------------------------------
// Loads and stores, by dtype and strides (the unit-stride paths vectorise).
// They are inlined into the per-ISA workers below.
// ---------------------------------------------------------------------------

// Non-temporal stores of a float row (the gradient of a large input goes straight
// to memory: it is not read again by this pass, and a normal store would first read
// every line it writes). Head and tail up to 64-byte alignment use normal stores.
#if DS_HAVE_STREAM
#define DS_STREAM_ROW(ATTR, NAME, VEC, WIDTH, STORE, LOAD)                          \
  ATTR inline void NAME(float* dst, const float* src, int64_t n) {                  \
    int64_t i = 0;                                                                 \
    while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0) {             \
      dst[i] = src[i];                                                             \
      ++i;                                                                         \
    }                                                                              \
    for (; i + WIDTH <= n; i += WIDTH) STORE(dst + i, LOAD(src + i));               \
    for (; i < n; ++i) dst[i] = src[i];                                            \
  }
DS_STREAM_ROW(, stream_row_base, __m128, 4, _mm_stream_ps, _mm_loadu_ps)
#if DS_X86_VARIANTS
DS_STREAM_ROW(DS_TARGET_V3, stream_row_v3, __m256, 8, _mm256_stream_ps, _mm256_loadu_ps)
DS_STREAM_ROW(DS_TARGET_V4, stream_row_v4, __m512, 16, _mm512_stream_ps, _mm512_loadu_ps)
#endif
#endif

template <int ISA>
DS_INLINE void stream_row(float* dst, const float* src, int64_t n) {
#if DS_HAVE_STREAM
#if DS_X86_VARIANTS
  if (ISA == kIsaV4) return stream_row_v4(dst, src, n);
  if (ISA == kIsaV3) return stream_row_v3(dst, src, n);
#endif
  stream_row_base(dst, src, n);
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
#endif
}

inline void stream_fence() {
#if DS_HAVE_STREAM
  _mm_sfence();
#endif
}

// Rows c0 .. c0 + nc - 1 of the tile, x at (b, 0, p0).
template <typename scalar_t, typename T>
DS_INLINE void load_rows(const scalar_t* x, int64_t xc, int64_t xp, int64_t c0, int64_t nc, int64_t n, T* out) {
  for (int64_t c = 0; c < nc; ++c) {
    const scalar_t* __restrict__ src = x + (c0 + c) * xc;
    T* __restrict__ dst = out + c * kTile;
    if (xp == 1) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i * xp]);
    }
  }
}

// `stream`: non-temporal stores (float rows of unit stride only; see stream_row).
template <int ISA, typename scalar_t, typename T>
DS_INLINE void store_rows(scalar_t* g, int64_t gc, int64_t gp, int64_t nc, int64_t n, const T* in, bool stream) {
  for (int64_t c = 0; c < nc; ++c) {
    scalar_t* __restrict__ dst = g + c * gc;
    const T* __restrict__ src = in + c * kTile;
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (stream && gp == 1) {
        stream_row<ISA>(dst, src, n);
        continue;
      }
    }
    if (gp == 1) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i * gp] = static_cast<scalar_t>(src[i]);
    }
  }
}

// A label that is not ignore_index and outside [0, nlab): a bad label.
DS_INLINE bool label_out_of_range(int64_t v, int64_t ignore, int64_t nlab) {
  // (v < 0) | (v >= nlab) as one unsigned comparison (nlab > 0)
  return (v != ignore) & (static_cast<uint64_t>(v) >= static_cast<uint64_t>(nlab));
}

// One target value: valid flag, the label (0 where not a valid in-range label, so
// it can index), the raw value; returns 1 for a label out of range that is not
// ignore_index.
template <typename T>
DS_INLINE int64_t target_at(int64_t v, int64_t ignore, int64_t nlab, int64_t i, T* valid, T* yf, int32_t* y,
                            int64_t* tv) {
  const bool ok = v != ignore;
  const bool in_range = (v >= 0) & (v < nlab);
  const int32_t lab = sel<int32_t>(ok & in_range, static_cast<int32_t>(v), 0);
  valid[i] = sel(ok, T(1), T(0));
  y[i] = lab;
  yf[i] = static_cast<T>(lab);
  tv[i] = v;
  return sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
}

// The target of a tile (t at (b, p0)); returns the number of bad labels.
template <typename label_t, typename T>
DS_INLINE int64_t load_target(const label_t* t, int64_t tp, int64_t n, int64_t ignore, int64_t nlab,
                              T* __restrict__ valid, T* __restrict__ yf, int32_t* __restrict__ y,
                              int64_t* __restrict__ tv) {
  int64_t bad = 0;
  if (tp == 1) {
    DS_SIMD_SUM(bad)
    for (int64_t i = 0; i < n; ++i) bad += target_at(static_cast<int64_t>(t[i]), ignore, nlab, i, valid, yf, y, tv);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      bad += target_at(static_cast<int64_t>(t[i * tp]), ignore, nlab, i, valid, yf, y, tv);
    }
  }
  return bad;
}

// The valid mask of a tile's target (unit stride; t at (b, p0)); returns the number
// of bad labels (counted in float, exact for a tile: one accumulation type keeps the
// loop vectorised).
template <typename label_t, typename T>
DS_INLINE int64_t load_valid(const label_t* t, int64_t n, int64_t ignore, int64_t nlab, T* __restrict__ valid) {
  T bad = T(0);
  DS_SIMD_SUM(bad)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(t[i]);
    const bool ok = v != ignore;
    bad += sel(label_out_of_range(v, ignore, nlab), T(1), T(0));
    valid[i] = sel(ok, T(1), T(0));
  }
  return static_cast<int64_t>(bad);
}

// Expert correctness c_j = [m_j == y and m_j != ignore_index] (l at (b, 0, p0)),
// computed as [m_j == t] with t the raw target (tv): where t is a valid label this is
// the same, and where t is ignore_index the pixel is not valid and its c_j is never
// used (every term and gradient of the pixel is selected away).
// With count_bad, also returns the number of expert labels out of [0, nlab) that are
// not ignore_index, counted in the same loop (0 otherwise).
template <typename label_t, typename T>
DS_INLINE int64_t load_experts(const label_t* l, int64_t le, int64_t lp, int64_t E, int64_t n, int64_t ignore,
                               int64_t nlab, bool count_bad, const int64_t* __restrict__ tv, T* ck) {
  int64_t bad = 0;
  for (int64_t j = 0; j < E; ++j) {
    const label_t* __restrict__ src = l + j * le;
    T* __restrict__ dst = ck + j * kTile;
    if (lp == 1 && count_bad) {
      DS_SIMD_SUM(bad)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i]);
        dst[i] = sel(v == tv[i], T(1), T(0));
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    } else if (lp == 1) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i]);
        dst[i] = sel(v == tv[i], T(1), T(0));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i * lp]);
        dst[i] = sel(v == tv[i], T(1), T(0));
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    }
  }
  return count_bad ? bad : 0;
}

// Expert labels out of range that are not ignore_index.
template <typename label_t>
DS_INLINE int64_t count_bad_experts(const label_t* l, int64_t le, int64_t lp, int64_t E, int64_t n, int64_t ignore,
                                    int64_t nlab) {
  int64_t bad = 0;
  for (int64_t j = 0; j < E; ++j) {
    const label_t* __restrict__ src = l + j * le;
    if (lp == 1) {
      DS_SIMD_SUM(bad)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i]);
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i * lp]);
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    }
  }
  return bad;
}

// Valid pairs (p, p + s) of a tile along one axis: `next` is the target at p0 + s
// (t + s * tp), of which `avail` pixels exist in the batch element. One loop counts
// the pairs of every pixel with a valid pixel s further on (a 0/1 sum, exact in T for
// a tile; 64-bit labels and floats in one loop of one width); then the pixels with
// no neighbour along the axis (see pairs_past_edge) take theirs back.
template <typename label_t, typename T>
DS_INLINE int64_t count_pairs(const label_t* next, int64_t tp, int64_t n, int64_t avail, int64_t ignore,
                              const T* __restrict__ valid, T* __restrict__ both) {
  const int64_t m = std::min(n, avail);  // pixels past `avail` have no neighbour along this axis
  T cnt = T(0);
  if (tp == 1) {
    DS_SIMD_SUM(cnt)
    for (int64_t i = 0; i < m; ++i) {
      const T b = sel(static_cast<int64_t>(next[i]) != ignore, valid[i], T(0));
      both[i] = b;
      cnt += b;
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      const T b = sel(static_cast<int64_t>(next[i * tp]) != ignore, valid[i], T(0));
      both[i] = b;
      cnt += b;
    }
  }
  return static_cast<int64_t>(cnt);
}

// The pairs that count_pairs counted for pixels p0 .. p0 + m - 1 (`both` at p0) whose
// coordinate along axis d is the last one: they have no neighbour at p + st[d] (the
// pixel there starts the next row / slab). Those pixels come in runs of st[d] every
// st[d - 1]; axis 0 has none (its last slab is past `avail`).
template <typename T>
DS_INLINE int64_t pairs_past_edge(const Geometry& g, int d, int64_t p0, int64_t m, const T* both) {
  if (d == 0) return 0;
  const int64_t run = g.st[d], period = g.st[d - 1], first = (g.S[d] - 1) * g.st[d];
  // Runs start at k * period + first; one reaches p0 when it starts after p0 - run.
  const int64_t need = p0 - first - run + 1;
  const int64_t k0 = need > 0 ? (need + period - 1) / period : 0;
  T cnt = T(0);
  for (int64_t r0 = k0 * period + first; r0 < p0 + m; r0 += period) {
    const int64_t lo = std::max(r0, p0), hi = std::min(r0 + run, p0 + m);
    for (int64_t p = lo; p < hi; ++p) cnt += both[p - p0];
  }
  return static_cast<int64_t>(cnt);
}

// Label tensors are read through their dtype code (0 uint8, 1 int32, 2 int64),
// switched once a tile row, so the workers are templated on the logits dtype only.
struct LabelPtr {
  const void* p = nullptr;
  int kind = 2;
};
inline int64_t label_bytes(const LabelPtr& l) { return l.kind == 0 ? 1 : (l.kind == 1 ? 4 : 8); }

// Tiles ahead that the workers prefetch. A tile reads a kTile-pixel stretch of some
// 10 to 16 rows at once; each stretch is 1 to 2 KiB, so the rows cross a 4 KiB page
// (where the hardware prefetcher stops) every few tiles. Measured on the 2-core CI
// machine: 5 to 10 % faster than without, distances 1 to 4 alike.
constexpr int64_t kPrefetchTiles = 2;

// Software prefetch (into L2) of the rows a tile ahead will read, issued in parts
// between the steps of the tile being processed (see step). Issued as one burst (some
// 100 to 250 cache lines a tile), the prefetches fill the core's queue of outstanding
// misses and the core waits at the prefetch instructions; spread over the tile they
// overlap with its compute. Measured on the 2-core CI machine, interleaved in one
// process, right after the eager reference: 4 to 7 % faster; hot, unchanged.
class TilePrefetch {
 public:
  // Rows a plan holds; the rows of a tile past this many (more than some 30 channels
  // and expert labels) are left to the hardware prefetcher.
  static constexpr int kMaxRows = 32;
  // Issues what is left of the previous plan and starts a new, empty one.
  DS_INLINE void restart() {
    step(std::numeric_limits<int64_t>::max());
    nrows_ = cur_ = 0;
    off_ = lines_ = 0;
  }
  // Adds `nrows` rows of n elements of `bytes` each, rows `row_stride` elements apart,
  // from `base` + offset elements; unit stride only (else nothing).
  DS_INLINE void add(const void* base, int64_t bytes, int64_t offset, int64_t row_stride, int64_t nrows,
                     int64_t unit, int64_t n) {
    if (unit != 1 || base == nullptr || n <= 0) return;
    const char* p0 = static_cast<const char*>(base) + offset * bytes;
    for (int64_t r = 0; r < nrows && nrows_ < kMaxRows; ++r) {
      row_[nrows_] = p0 + r * row_stride * bytes;
      len_[nrows_++] = n * bytes;
      lines_ += (n * bytes + 63) / 64;
    }
  }
  // The share of the plan each of `parts` steps issues.
  DS_INLINE int64_t share(int64_t parts) const { return (lines_ + parts - 1) / parts; }
  // Issues the next `lines` cache lines of the plan.
  DS_INLINE void step(int64_t lines) {
    while (lines > 0 && cur_ < nrows_) {
      __builtin_prefetch(row_[cur_] + off_, 0, 2);
      --lines;
      off_ += 64;
      if (off_ >= len_[cur_]) {
        off_ = 0;
        ++cur_;
      }
    }
  }

 private:
  const char* row_[kMaxRows];
  int64_t len_[kMaxRows];
  int nrows_ = 0, cur_ = 0;
  int64_t off_ = 0, lines_ = 0;
};

template <typename L>
DS_INLINE const L* label_at(const LabelPtr& l, int64_t offset) {
  return static_cast<const L*>(l.p) + offset;
}
#define DS_LABEL_SWITCH(LP, ...)            \
  switch ((LP).kind) {                      \
    case 0: {                               \
      using label_t = uint8_t;              \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    case 1: {                               \
      using label_t = int32_t;              \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
    default: {                              \
      using label_t = int64_t;              \
      __VA_ARGS__;                          \
      break;                                \
    }                                       \
  }

template <typename scalar_t>
struct Inputs {
  const scalar_t* x;
  int64_t xb, xc, xp;
  LabelPtr t;
  int64_t tb, tp;
  LabelPtr lab;
  int64_t lb, le, lp;
  scalar_t* g;  // gradient (null: none)
  int64_t gb, gc, gp;
  bool stream;  // write the gradient with non-temporal stores
  int64_t ignore, nlab;
};

// The loaders above for the label dtype of the inputs; offsets in elements.
template <typename scalar_t, typename T>
DS_INLINE int64_t load_target_at(const Inputs<scalar_t>& in, int64_t offset, int64_t n, T* valid, T* yf, int32_t* y,
                                 int64_t* tv) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.t, bad = load_target(label_at<label_t>(in.t, offset), in.tp, n, in.ignore, in.nlab, valid, yf, y, tv))
  return bad;
}
template <typename scalar_t, typename T>
DS_INLINE int64_t load_valid_at(const Inputs<scalar_t>& in, int64_t offset, int64_t n, T* valid) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.t, bad = load_valid(label_at<label_t>(in.t, offset), n, in.ignore, in.nlab, valid))
  return bad;
}
template <typename scalar_t, typename T>
DS_INLINE int64_t load_experts_at(const Inputs<scalar_t>& in, int64_t offset, int64_t E, int64_t n, bool count_bad,
                                  const int64_t* tv, T* ck) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.lab, bad = load_experts(label_at<label_t>(in.lab, offset), in.le, in.lp, E, n, in.ignore, in.nlab,
                                             count_bad, tv, ck))
  return bad;
}
template <typename scalar_t>
DS_INLINE int64_t count_bad_experts_at(const Inputs<scalar_t>& in, int64_t offset, int64_t E, int64_t n) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.lab, bad = count_bad_experts(label_at<label_t>(in.lab, offset), in.le, in.lp, E, n, in.ignore, in.nlab))
  return bad;
}
template <typename scalar_t, typename T>
DS_INLINE int64_t count_pairs_at(const Inputs<scalar_t>& in, int64_t offset, int64_t n, int64_t avail, const T* valid,
                                 T* both) {
  int64_t cnt = 0;
  DS_LABEL_SWITCH(in.t, cnt = count_pairs(label_at<label_t>(in.t, offset), in.tp, n, avail, in.ignore, valid, both))
  return cnt;
}

// The routing results (softmax, argmax, D), gate terms and loaded target of the last
// `slots` map tiles of a thread:
// the main pass of a tile takes them from here instead of recomputing them. A tile's
// map tile is always computed by the thread that runs its main pass, before it and
// by the same function, so this changes no value (and no bit).
template <typename T>
struct RoutingRing {
  // rows a slot besides pi's E + 1: rb, rs, rinv, D, lgate, dgate, dsa, valid, yf
  static constexpr int kRows = 9;
  int64_t slots = 0, E = 0;
  std::vector<T> f;
  std::vector<int32_t> i32;  // ri, y
  std::vector<int64_t> i64;  // tv: the raw target
  std::vector<int64_t> tag;
  RoutingRing(int64_t slots_, int64_t E_)
      : slots(slots_), E(E_), f(static_cast<size_t>(slots_ * (E_ + 1 + kRows) * kTile)),
        i32(static_cast<size_t>(slots_ * 2 * kTile)), i64(static_cast<size_t>(slots_ * kTile)),
        tag(static_cast<size_t>(slots_), -1) {}
  // Points the routing, gate and target arrays of c (and tv) at the slot of tile `id`.
  int64_t point(TileCtx<T>& c, int64_t id, int64_t*& tv) {
    const int64_t s = id % slots;
    T* base = f.data() + s * (E + 1 + kRows) * kTile;
    c.pi = base;
    T** rows[kRows] = {&c.rb, &c.rs, &c.rinv, &c.D, &c.lgate, &c.dgate, &c.dsa, &c.valid, &c.yf};
    for (int r = 0; r < kRows; ++r) *rows[r] = base + (E + 1 + r) * kTile;
    c.ri = i32.data() + 2 * s * kTile;
    c.y = c.ri + kTile;
    tv = i64.data() + s * kTile;
    return s;
  }
};

// The window of one thread over the per-pixel maps of one batch element: the valid
// mask, D and s of pixels [lo, lo + cap), stored with `pad` readable elements on both
// sides. It slides forward: when a new map tile does not fit, the tiles still needed
// (from `keep` on) move to the front. Reads that fall outside the volume or before
// `keep` only ever feed pairs that the neighbour masks leave out.
template <typename T>
struct MapWindow {
  int64_t cap = 0, pad = 0, lo = 0;
  std::vector<T> vm, D, S;
  MapWindow(int64_t cap_, int64_t pad_, bool with_d, bool with_s)
      : cap(cap_), pad(pad_), vm(static_cast<size_t>(cap_ + 2 * pad_), T(0)),
        D(with_d ? static_cast<size_t>(cap_ + 2 * pad_) : 0, T(0)),
        S(with_s ? static_cast<size_t>(cap_ + 2 * pad_) : 0, T(0)) {}
  int64_t at(int64_t p) const { return pad + p - lo; }
  T* vm_at(int64_t p) { return vm.data() + at(p); }
  T* D_at(int64_t p) { return D.empty() ? nullptr : D.data() + at(p); }
  T* S_at(int64_t p) { return S.empty() ? nullptr : S.data() + at(p); }
  void reset(int64_t first) { lo = first; }
  // Makes room for pixels up to `upto`, keeping those in [keep, done).
  void fit(int64_t keep, int64_t done, int64_t upto) {
    if (upto - lo <= cap) return;
    const int64_t shift = keep - lo, count = done - keep;
    if (count > 0) {
      std::memmove(vm.data() + pad, vm.data() + pad + shift, static_cast<size_t>(count) * sizeof(T));
      if (!D.empty()) std::memmove(D.data() + pad, D.data() + pad + shift, static_cast<size_t>(count) * sizeof(T));
      if (!S.empty()) std::memmove(S.data() + pad, S.data() + pad + shift, static_cast<size_t>(count) * sizeof(T));
    }
    lo = keep;
  }
};

// ---------------------------------------------------------------------------
// Workers: the tiles t0 .. t1 - 1 of one thread (per instruction set).
// ---------------------------------------------------------------------------

// Points c.Xin at the logits rows c0 .. c0 + nc - 1 of the tile at x (the pixel at
// channel 0): the input itself when in_place (scalar_t is T, unit pixel stride),
// else a copy in X (converted to T).
template <typename scalar_t, typename T>
DS_INLINE void point_logits(TileCtx<T>& c, const Inputs<scalar_t>& in, const scalar_t* x, int64_t c0, int64_t nc,
                            int64_t n, bool in_place) {
  if constexpr (std::is_same<scalar_t, T>::value) {
    if (in_place) {
      c.Xin = x + c0 * in.xc;
      c.xs = in.xc;
      return;
    }
  }
  load_rows(x, in.xc, in.xp, c0, nc, n, c.X);
  c.Xin = c.X;
  c.xs = kTile;
}

// Stats partial row of a tile: S_0..S_E, N_V, W, bad, pairs along axes 0, 1, 2.
inline int64_t stats_width(int64_t E) { return E + 7; }

template <int ISA, typename scalar_t>
DS_INLINE void stats_worker_impl(const Inputs<scalar_t>& in, const Geometry& geo,
                                 const TileCtx<typename AccType<scalar_t>::type>& base, bool check_experts,
                                 int64_t t0, int64_t t1, double* part) {
  using T = typename AccType<scalar_t>::type;
  const int64_t E = base.E, K = base.K, width = stats_width(E);
  Workspace<T> ws(E + 1, E);
  TileCtx<T> c = base;
  ws.bind(c, E + 1, E);
  std::vector<T> out(static_cast<size_t>(E + 3));
  c.out = out.data();
  // Logits of the accumulation type and unit pixel stride are read in place; without
  // class weights (which need the labels) a unit-stride target gives only its valid mask.
  const bool in_place = std::is_same<scalar_t, T>::value && in.xp == 1;
  const bool valid_only = base.cw == nullptr && in.tp == 1;
  TilePrefetch pf;
  int64_t part_lines = 0;  // the prefetch plan is issued in 3 parts a tile
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = geo.batch(t), p0 = geo.first(t), n = geo.count(t);
    pf.restart();
    if (t + kPrefetchTiles < t1) {
      const int64_t tn = t + kPrefetchTiles;
      const int64_t b1 = geo.batch(tn), q1 = geo.first(tn), n1 = geo.count(tn);
      pf.add(in.x, sizeof(scalar_t), b1 * in.xb + q1 * in.xp + K * in.xc, in.xc, E + 1, in.xp, n1);
      pf.add(in.t.p, label_bytes(in.t), b1 * in.tb + q1 * in.tp, 0, 1, in.tp, n1);
      if (geo.nd > 1 && q1 + geo.st[0] < geo.P) {  // the pairs along the first axis read it
        pf.add(in.t.p, label_bytes(in.t), b1 * in.tb + (q1 + geo.st[0]) * in.tp, 0, 1, in.tp,
               std::min(n1, geo.P - q1 - geo.st[0]));
      }
      part_lines = pf.share(3);
      pf.step(part_lines);
    }
    c.n = n;
    const int64_t toff = b * in.tb + p0 * in.tp;
    const scalar_t* x = in.x + b * in.xb + p0 * in.xp;
    int64_t bad = valid_only ? load_valid_at(in, toff, n, c.valid)
                             : load_target_at(in, toff, n, c.valid, c.yf, c.y, ws.tv());
    pf.step(part_lines);
    point_logits(c, in, x, K, E + 1, n, in_place);
    stats_tile<ISA>(c);
    pf.step(part_lines);
    if (check_experts) bad += count_bad_experts_at(in, b * in.lb + p0 * in.lp, E, n);
    double* row = part + t * width;
    for (int64_t s = 0; s < E + 3; ++s) row[s] = static_cast<double>(out[s]);
    row[E + 3] = static_cast<double>(bad);
    for (int d = 0; d < kMaxSpatial; ++d) {
      int64_t cnt = 0;
      if (d < geo.nd) {
        const int64_t s = geo.st[d];
        const int64_t m = std::max<int64_t>(0, std::min(n, geo.P - p0 - s));
        cnt = count_pairs_at(in, toff + s * in.tp, m, m, c.valid, c.acc);  // acc: free here
        cnt -= pairs_past_edge(geo, d, p0, m, c.acc);
      }
      row[E + 4 + d] = static_cast<double>(cnt);
    }
  }
}

template <int ISA, typename scalar_t>
DS_INLINE void fused_worker_impl(const Inputs<scalar_t>& in, const Geometry& geo,
                                 const TileCtx<typename AccType<scalar_t>::type>& base, bool check_experts,
                                 int64_t t0, int64_t t1, double* part, int64_t* bad) {
  using T = typename AccType<scalar_t>::type;
  const int64_t E = base.E, K = base.K, C = K + E + 2;
  Workspace<T> ws(C, E);
  TileCtx<T> c = base;
  ws.bind(c, C, E);
  T out[kNumSums];
  c.out = out;
  const bool maps = base.maps != 0;
  // Logits of the accumulation type and unit pixel stride are read in place.
  const bool in_place = std::is_same<scalar_t, T>::value && in.xp == 1;
  // The map window of this thread: 2 * ahead + 1 tiles are live at a time; the
  // slack makes the compaction (a memmove of the live tiles) rare.
  const int64_t live = 2 * geo.ahead + 1;
  MapWindow<T> win(maps ? std::min(geo.P, (3 * live + 1) * kTile) : 0, geo.pad, (base.maps & kMapRouter) != 0,
                   (base.maps & kMapGate) != 0);
  RoutingRing<T> ring(maps ? geo.ahead + 1 : 0, E);
  NeighbourMasks<T> masks(geo, maps);
  T* own_p[kMaxSpatial];  // the tile's own mask rows (c.hp / c.hn may point elsewhere)
  T* own_n[kMaxSpatial];
  for (int d = 0; d < kMaxSpatial; ++d) {
    own_p[d] = c.hp[d];
    own_n[d] = c.hn[d];
  }
  int64_t* tv = ws.tv();             // the raw target of the tile (a ring slot with maps)
  int64_t cur_b = -1, next_map = 0;  // window: batch element, first tile not computed yet
  TilePrefetch pf;
  int64_t part_lines = 0;  // the prefetch plan is issued in 4 parts a tile
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = geo.batch(t), j = geo.index(t), p0 = geo.first(t), n = geo.count(t);
    pf.restart();
    if (t + kPrefetchTiles < t1) {
      // The map tile computed ahead reads the logits and target first; the main
      // pass of a tile reads the expert labels.
      const int64_t tm = maps ? std::min(t + kPrefetchTiles + geo.ahead, geo.tiles - 1) : t + kPrefetchTiles;
      const int64_t b1 = geo.batch(tm), q1 = geo.first(tm), n1 = geo.count(tm);
      pf.add(in.x, sizeof(scalar_t), b1 * in.xb + q1 * in.xp, in.xc, C, in.xp, n1);
      pf.add(in.t.p, label_bytes(in.t), b1 * in.tb + q1 * in.tp, 0, 1, in.tp, n1);
      const int64_t b2 = geo.batch(t + kPrefetchTiles), q2 = geo.first(t + kPrefetchTiles),
                    n2 = geo.count(t + kPrefetchTiles);
      pf.add(in.lab.p, label_bytes(in.lab), b2 * in.lb + q2 * in.lp, in.le, E, in.lp, n2);
      part_lines = pf.share(4);
      pf.step(part_lines);
    }
    if (maps) {
      if (b != cur_b) {
        cur_b = b;
        next_map = std::max<int64_t>(0, j - geo.ahead);
        win.reset(next_map * kTile);
      }
      const int64_t last = std::min(geo.tiles_per_batch - 1, j + geo.ahead);
      const int64_t keep = std::max<int64_t>(0, j - geo.ahead) * kTile;
      for (; next_map <= last; ++next_map) {
        const int64_t q0 = next_map * kTile, m = std::min(kTile, geo.P - q0);
        const int64_t id = b * geo.tiles_per_batch + next_map;
        win.fit(keep, q0, q0 + m);
        c.n = m;
        ring.tag[ring.point(c, id, tv)] = id;
        load_target_at(in, b * in.tb + q0 * in.tp, m, c.valid, c.yf, c.y, tv);
        point_logits(c, in, in.x + b * in.xb + q0 * in.xp, K, E + 2, m, in_place);
        c.vm_out = win.vm_at(q0);
        c.mapD = win.D_at(q0);
        c.mapS = win.S_at(q0);
        maps_tile<ISA>(c);
        pf.step(part_lines);
      }
      // The tile's routing, gate term and target, from when its map tile was made.
      TORCH_CHECK(ring.tag[ring.point(c, t, tv)] == t, "deferredseg::loss_fused: routing ring out of step");
      c.routing_ready = true;
      point_masks(masks, geo, p0, n, c.hp, c.hn, own_p, own_n);
      c.vm = win.vm_at(p0);
      c.mapD = win.D_at(p0);
      c.mapS = win.S_at(p0);
    }
    c.n = n;
    if (!maps) load_target_at(in, b * in.tb + p0 * in.tp, n, c.valid, c.yf, c.y, tv);
    point_logits(c, in, in.x + b * in.xb + p0 * in.xp, 0, C, n, in_place);
    const int64_t bad_experts = load_experts_at(in, b * in.lb + p0 * in.lp, E, n, check_experts, tv, c.ck);
    if (check_experts) bad[t] = bad_experts;
    pf.step(part_lines);
    loss_tile<ISA>(c);
    pf.step(part_lines);
    if (in.g != nullptr) store_rows<ISA>(in.g + b * in.gb + p0 * in.gp, in.gc, in.gp, C, n, c.X, in.stream);
    double* row = part + t * kNumSums;
    for (int s = 0; s < kNumSums; ++s) row[s] = static_cast<double>(out[s]);
  }
  if (in.stream) stream_fence();
}

// The per-ISA copies of the workers and the dispatch between them.
#define DS_WORKER_VARIANTS(NAME, PARAMS, ARGS)                                                 \
  template <typename scalar_t>                                                                 \
  void NAME##_base PARAMS { NAME##_impl<kIsaBase> ARGS; }                                      \
  DS_WORKER_X86(NAME, PARAMS, ARGS)                                                            \
  template <typename scalar_t>                                                                 \
  void NAME PARAMS {                                                                           \
    DS_WORKER_X86_DISPATCH(NAME, ARGS)                                                         \
    NAME##_base ARGS;                                                                          \
  }
#if DS_X86_VARIANTS
#define DS_WORKER_X86(NAME, PARAMS, ARGS)                                                      \
  template <typename scalar_t>                                                                 \
  DS_TARGET_V3 void NAME##_v3 PARAMS { NAME##_impl<kIsaV3> ARGS; }                             \
  template <typename scalar_t>                                                                 \
  DS_TARGET_V4 void NAME##_v4 PARAMS { NAME##_impl<kIsaV4> ARGS; }
#define DS_WORKER_X86_DISPATCH(NAME, ARGS)                                                     \
  if constexpr (!std::is_same<scalar_t, double>::value) {                                      \
    switch (cpu_isa()) {                                                                       \
      case kIsaV4:                                                                             \
        return NAME##_v4 ARGS;                                                                 \
      case kIsaV3:                                                                             \
        return NAME##_v3 ARGS;                                                                 \
      default:                                                                                 \
        break;                                                                                 \
    }                                                                                          \
  }
#else
#define DS_WORKER_X86(NAME, PARAMS, ARGS)
#define DS_WORKER_X86_DISPATCH(NAME, ARGS)
#endif

#define DS_STATS_PARAMS                                                                        \
  (const Inputs<scalar_t>& in, const Geometry& geo, const TileCtx<typename AccType<scalar_t>::type>& base, \
   bool check_experts, int64_t t0, int64_t t1, double* part)
#define DS_FUSED_PARAMS                                                                        \
  (const Inputs<scalar_t>& in, const Geometry& geo, const TileCtx<typename AccType<scalar_t>::type>& base, \
   bool check_experts, int64_t t0, int64_t t1, double* part, int64_t* bad)
DS_WORKER_VARIANTS(stats_worker, DS_STATS_PARAMS, (in, geo, base, check_experts, t0, t1, part))
DS_WORKER_VARIANTS(fused_worker, DS_FUSED_PARAMS, (in, geo, base, check_experts, t0, t1, part, bad))

DS_FP_REGION_END

// Adds the rows of `part` (tiles x width) in tile order.
inline std::vector<double> sum_rows(const std::vector<double>& part, int64_t tiles, int64_t width) {
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t s = 0; s < width; ++s) total[s] += part[t * width + s];
  }
  return total;
}

inline LabelPtr label_ptr(const at::Tensor& t) {
  TORCH_CHECK(loss_label_dtype(t.scalar_type()), "labels must be uint8, int32 or int64, got ", t.scalar_type());
  LabelPtr l;
  l.p = t.data_ptr();
  l.kind = t.scalar_type() == at::kByte ? 0 : (t.scalar_type() == at::kInt ? 1 : 2);
  return l;
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const LossProblem& pb, GradOut* grad) {
  Inputs<scalar_t> in{};
  in.x = pb.x.data_ptr<scalar_t>();
  in.xb = pb.x.stride(0);
  in.xc = pb.x.stride(1);
  in.xp = pb.x.stride(2);
  in.t = label_ptr(pb.target);
  in.tb = pb.target.stride(0);
  in.tp = pb.target.stride(1);
  in.lab = label_ptr(pb.labels);
  in.lb = pb.labels.stride(0);
  in.le = pb.labels.stride(1);
  in.lp = pb.labels.stride(2);
  if (grad != nullptr) {
    in.g = grad->flat.data_ptr<scalar_t>();
    in.gb = grad->flat.stride(0);
    in.gc = grad->flat.stride(1);
    in.gp = grad->flat.stride(2);
    in.stream = grad->flat.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  }
  in.ignore = pb.ignore_index;
  in.nlab = pb.num_labels;
  return in;
}

// Runs the body with scalar_t = the logits dtype.
#define DS_DISPATCH_LOSS(PB, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (PB).x.scalar_type(), NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------
// The gradient buffer of large inputs. Every training step asks for a new
// logits-sized gradient; for a buffer of several MiB the C library hands the pages
// back to the system when it is freed, and the next step pays a page fault per 4 KiB
// page touched (on a 2-core VM, more than the kernel itself). So the CPU kernel keeps
// one buffer (the last one, when large) and reuses it as soon as nothing else holds
// its storage: no tensor, view or storage object of the caller's may still point at
// it. Each call returns a new tensor over that storage. `deferredseg_kernels.empty_cache()`
// frees it; DEFERREDSEG_CPU_GRAD_CACHE=0 turns the reuse off.
// ---------------------------------------------------------------------------
constexpr int64_t kGradCacheMaxBytes = int64_t(256) << 20;

struct GradCache {
  std::mutex mu;
  at::Tensor t;
};
inline GradCache& grad_cache() {
  static GradCache* c = new GradCache();  // never destroyed: no teardown-order issues at exit
  return *c;
}
inline bool grad_cache_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("DEFERREDSEG_CPU_GRAD_CACHE");
    return !(env != nullptr && std::string(env) == "0");
  }();
  return on;
}

inline at::Tensor grad_buffer(const at::Tensor& logits) {
  const int64_t bytes = logits.numel() * static_cast<int64_t>(logits.element_size());
  if (bytes < kStreamBytes || bytes > kGradCacheMaxBytes || !logits.is_non_overlapping_and_dense() ||
      !grad_cache_enabled()) {
    return at::Tensor();  // make_grad_out allocates
  }
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const bool reusable = c.t.defined() && c.t.storage().use_count() == 1 && c.t.scalar_type() == logits.scalar_type() &&
                        c.t.sizes().equals(logits.sizes()) && c.t.strides().equals(logits.strides());
  if (!reusable) {
    c.t = at::Tensor();  // release the old one first: no two buffers alive at once
    c.t = at::empty_like(logits);
  }
  return at::empty({0}, logits.options()).set_(c.t.storage(), c.t.storage_offset(), c.t.sizes(), c.t.strides());
}

int64_t empty_cpu_cache() {
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int64_t bytes = c.t.defined() ? static_cast<int64_t>(c.t.storage().nbytes()) : 0;
  c.t = at::Tensor();
  return bytes;
}

// ---------------------------------------------------------------------------
// loss_stats
// ---------------------------------------------------------------------------
at::Tensor loss_stats_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& expert_labels,
                          const c10::optional<at::Tensor>& class_weight, int64_t num_classes, int64_t num_experts,
                          int64_t ignore_index, bool check_expert_labels) {
  const char* op = "deferredseg::loss_stats (CPU kernel)";
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU");
  LossProblem pb = prepare_loss(op, logits, target, expert_labels, num_classes, num_experts, ignore_index);
  const Geometry geo(pb);
  const int64_t E = pb.E;
  const at::Tensor cw = class_weight_vector(op, class_weight, logits, pb.num_labels, acc_dtype(logits));
  at::Tensor stats = at::zeros({stats_len(E)}, logits.options().dtype(at::kDouble));
  if (geo.tiles == 0) return stats;
  const int64_t width = stats_width(E);
  std::vector<double> part(static_cast<size_t>(geo.tiles * width), 0.0);
  DS_DISPATCH_LOSS(pb, "loss_stats_cpu", [&] {
    using T = typename AccType<scalar_t>::type;
    TileCtx<T> base;
    base.K = pb.K;
    base.E = E;
    base.nd = pb.nd;
    base.cw = cw.defined() ? cw.data_ptr<T>() : nullptr;
    base.fast = std::is_same<T, float>::value && E <= kFastMaxExperts && cpu_fast_paths();
    const auto in = make_inputs<scalar_t>(pb, nullptr);
    at::parallel_for(0, geo.tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
      stats_worker<scalar_t>(in, geo, base, check_expert_labels, t0, t1, part.data());
    });
  });
  const std::vector<double> tot = sum_rows(part, geo.tiles, width);
  double* out = stats.data_ptr<double>();
  for (int64_t k = 0; k <= E + 2; ++k) out[k] = tot[k];  // S_k, N_V, W
  out[stat_bad(E)] = tot[E + 3];
  for (int d = 0; d < kMaxSpatial; ++d) out[stat_pairs(E, d)] = tot[E + 4 + d];
  return stats;
}

// ---------------------------------------------------------------------------
// loss_fused
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& expert_labels,
    const c10::optional<at::Tensor>& class_weight, const at::Tensor& stats,
    const c10::optional<at::Tensor>& balance_low, const c10::optional<at::Tensor>& balance_high,
    int64_t num_classes, int64_t num_experts, int64_t ignore_index, c10::ArrayRef<double> fparams,
    c10::ArrayRef<int64_t> iparams, bool compute_grad) {
  const char* op = "deferredseg::loss_fused (CPU kernel)";
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU");
  LossProblem pb = prepare_loss(op, logits, target, expert_labels, num_classes, num_experts, ignore_index);
  const loss::LossParams prm = parse_loss_params(op, fparams, iparams);
  check_stats(op, stats, logits, pb.E);
  const Geometry geo(pb);
  const int64_t E = pb.E;
  const at::ScalarType acc = acc_dtype(logits);
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const double* sv = st.data_ptr<double>();
  const int64_t n_stats = st.numel();
  const bool band = prm.balance == kBalanceBand;
  const at::Tensor low = band_vector(op, "balance_low", balance_low, logits, E, band);
  const at::Tensor high = band_vector(op, "balance_high", balance_high, logits, E, band);
  const at::Tensor cw = class_weight_vector(op, class_weight, logits, pb.num_labels, acc);

  // Gradient factors from the stats (double, then the accumulation type).
  std::vector<double> dS(static_cast<size_t>(E + 1), 0.0);
  balance_term(sv, n_stats, E, prm.balance, low.data_ptr<double>(), high.data_ptr<double>(), dS.data());
  const GradScales scales = grad_scales(sv, E, prm);

  GradOut gout;
  if (compute_grad) gout = make_grad_out(logits, pb, grad_buffer(logits));
  std::vector<double> part(static_cast<size_t>(geo.tiles * kNumSums), 0.0);
  std::vector<int64_t> bad(prm.check_experts ? static_cast<size_t>(geo.tiles) : 0, 0);

  if (geo.tiles > 0) {
    DS_DISPATCH_LOSS(pb, "loss_fused_cpu", [&] {
      using T = typename AccType<scalar_t>::type;
      std::vector<T> bal(static_cast<size_t>(E + 1));
      for (int64_t k = 0; k <= E; ++k) bal[k] = static_cast<T>(prm.lambda_balance * prm.balance_grad_scale * dS[k]);
      TileCtx<T> base;
      base.K = pb.K;
      base.E = E;
      base.nd = pb.nd;
      for (int d = 0; d < kMaxSpatial; ++d) {
        base.st[d] = pb.st[d];
        base.scale_coh[d] = static_cast<T>(scales.coh[d]);
      }
      base.surrogate = prm.surrogate;
      base.benefit = prm.gate_target == kGateTargetBenefit;
      base.l2 = prm.coherence == kCoherenceL2;
      base.grad = compute_grad;
      base.maps = prm.maps;
      base.gate_mse = static_cast<T>(prm.gate_mse);
      base.gate_sparsity = static_cast<T>(prm.gate_sparsity);
      base.eps = static_cast<T>(prm.paper_eps);
      base.scale_seg = static_cast<T>(scales.seg);
      base.scale_collab = static_cast<T>(scales.collab);
      base.scale_gate = static_cast<T>(scales.gate);
      base.bal = bal.data();
      base.cw = cw.defined() ? cw.data_ptr<T>() : nullptr;
      base.fast = std::is_same<T, float>::value && E <= kFastMaxExperts && cpu_fast_paths();
      const auto in = make_inputs<scalar_t>(pb, compute_grad ? &gout : nullptr);
      at::parallel_for(0, geo.tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
        fused_worker<scalar_t>(in, geo, base, prm.check_experts, t0, t1, part.data(), bad.data());
      });
    });
  }
  if (prm.check_experts) {
    int64_t n_bad = 0;
    for (const int64_t v : bad) n_bad += v;
    TORCH_CHECK_VALUE(n_bad == 0, "expert_labels must hold labels in [0, ", pb.num_labels, ") or ignore_index=",
                      pb.ignore_index, ", got ", n_bad, " value(s) outside");
  }
  const std::vector<double> sums = sum_rows(part, geo.tiles, kNumSums);
  double terms_d[kTermsLen];
  assemble_terms(sums.data(), sv, n_stats, E, pb.nd, prm, low.data_ptr<double>(), high.data_ptr<double>(), terms_d);
  at::Tensor terms = at::empty({kTermsLen}, logits.options().dtype(at::kDouble));
  std::copy(terms_d, terms_d + kTermsLen, terms.data_ptr<double>());
  terms = terms.to(acc);
  at::Tensor grad = compute_grad ? finish_grad(gout) : at::empty({0}, logits.options());
  return {terms, grad};
}

}  // namespace cpu_loss

TORCH_LIBRARY_FRAGMENT(deferredseg, m) {
  // Frees the CPU kernel's cached gradient buffer; returns the bytes released.
  m.def("empty_cpu_cache() -> int", &cpu_loss::empty_cpu_cache);
}

TORCH_LIBRARY_IMPL(deferredseg, CPU, m) {
  m.impl("loss_stats", &cpu_loss::loss_stats_cpu);
  m.impl("loss_fused", &cpu_loss::loss_fused_cpu);
}

}  // namespace deferredseg
