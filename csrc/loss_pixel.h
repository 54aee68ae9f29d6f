// The per-pixel math of the fused DeferredSeg objective (docs/objective.md sections 2 and 3),
// shared by the CPU and CUDA kernels of `deferredseg::loss_stats` / `loss_fused`.
//
// Everything a kernel computes for one pixel or from the stats vector is a
// DS_LOSS_FN function here, so the CPU and CUDA kernels cannot drift apart:
// elementary functions (exp, log, log1p on the ranges the loss needs), the
// binary cross-entropy with logits, the gate term, the coherence penalty, the
// routing-logit gradient, the balance term and the final assembly of the terms.
// The kernels only differ in how they walk the pixels.
//
// The layout of the stats vector and of fparams / iparams is the contract of
// deferredseg_kernels/ops/fused.py, declared in deferredseg_kernels/contract.py and
// read here from the header generated from it, contract.h.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"
#include "contract.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DS_LOSS_FN DS_HOST_DEVICE
#elif defined(__GNUC__)
// The CPU kernel relies on these being inlined into its vectorised loops.
#define DS_LOSS_FN inline __attribute__((always_inline))
#else
#define DS_LOSS_FN inline
#endif

namespace deferredseg {
namespace loss {

// ---------------------------------------------------------------------------
// The contract of ops/fused.py: the indices, codes and stats offsets of contract.h
// (generated from deferredseg_kernels/contract.py), and the stats accessors.
// ---------------------------------------------------------------------------
using namespace contract;  // NOLINT: kSurrogate*, kMap*, kStat*, kMaxSpatial, kTermsLen, ...

// Indices into the stats vector of num_experts = E (stats_len(E) = E + kStatBalanceCount).
DS_LOSS_FN int64_t stats_len(int64_t E) { return E + kStatBalanceCount; }
DS_LOSS_FN int64_t stat_count(int64_t E) { return E + kStatCount; }             // N_V, valid pixels
DS_LOSS_FN int64_t stat_weight(int64_t E) { return E + kStatWeight; }           // W = sum_V w[y]
DS_LOSS_FN int64_t stat_pairs(int64_t E, int d) { return E + kStatPairs + d; }  // pairs, axis d
DS_LOSS_FN int64_t stat_bad(int64_t E) { return E + kStatBad; }  // labels out of range
// Optional entry (a stats vector of length stats_len(E) + 1, made by the driver under
// sync_balance): the number of valid pixels over every rank, the denominator of
// pbar. Absent, it equals N_V.
DS_LOSS_FN int64_t stat_balance_count(int64_t E) { return E + kStatBalanceCount; }

// Per-pixel sums a loss kernel accumulates (in fixed order, then in double).
constexpr int kSumSeg = 0;     // sum_V w[y] * l_seg
constexpr int kSumCollab = 1;  // sum_V l_collab
constexpr int kSumGate = 2;    // sum_V l_gate
// kSumCoh + 3 * map + axis: the sum of rho over the valid pairs (map 0 router, 1 gate)
constexpr int kSumCoh = 3;
constexpr int kNumSums = 9;

// fparams and iparams decoded: one member per field of deferredseg_kernels/contract.py
// (lambda_seg .. balance_grad_scale, surrogate .. gate_target, check_experts).
using LossParams = contract::Options;

// ---------------------------------------------------------------------------
// Branch-free building blocks. A conditional whose arms compute something is
// not vectorised by GCC (under the default -ftrapping-math it may not evaluate
// an arm's arithmetic speculatively), so everything here computes both values
// first and then selects: `sel(c, a, b)` takes values, never expressions.
// ---------------------------------------------------------------------------
template <typename T>
DS_LOSS_FN T sel(bool c, T a, T b) {
  return c ? a : b;
}

// argmax_takes of common.h (torch.argmax: first maximum wins, a NaN beats every
// number, the first NaN wins) without short-circuit evaluation.
template <typename T>
DS_LOSS_FN bool argmax_step(T v, T best) {
  const bool best_nan = best != best, v_nan = v != v;
  const bool larger = v > best;
  return (!best_nan) & (v_nan | larger);
}

// ---------------------------------------------------------------------------
// Elementary functions on the ranges the loss uses. Every exp in the loss has a
// non-positive argument (a softmax shifted by its maximum; softplus and sigmoid
// through exp(-|x|)), every log a positive one. On the host the float versions
// are branch-free polynomials so that loops over pixels vectorise; on the device
// and in double they are the library functions. NaN propagates through all of them.
// ---------------------------------------------------------------------------
#if !defined(__CUDA_ARCH__)
DS_LOSS_FN uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
DS_LOSS_FN float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
#endif

// ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with few enough bits that n * kLn2Hi is exact.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.42860682030941723212e-6f;

// exp(x) for x <= 0. Results below the smallest normal float are flushed to 0.
DS_LOSS_FN float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  const float lo = -87.0f;
  const float xc = x < lo ? lo : x;  // NaN stays NaN
  // n = round(x / ln2) by the 1.5 * 2^23 shift; its low mantissa bits hold n.
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float f = (xc - n * kLn2Hi) - n * kLn2Lo;  // |f| <= ln2 / 2
  // exp(f) by its Taylor series to degree 7: remainder below 6e-9 relative.
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  // 2^n with n in [-126, 0]; unsigned arithmetic keeps a NaN input well defined
  // (p is then NaN and so is the product).
  const uint32_t biased = float_bits(shifted) - 0x4B400000u + 127u;
  const float scale = bits_float(biased << 23);
  const float r = p * scale;
  return sel(x < lo, 0.0f, r);
#endif
}
DS_LOSS_FN double exp_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// log(x) for x >= 0 (0 gives -inf, +inf gives +inf, NaN gives NaN).
DS_LOSS_FN float log_pos(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  const float tiny = 1.17549435e-38f;  // smallest normal
  const bool sub = x < tiny;
  const float x_up = x * 8388608.0f;
  const float xs = sel(sub, x_up, x);  // subnormals: scale by 2^23
  const uint32_t bits = float_bits(xs);
  const int32_t e0 = static_cast<int32_t>((bits >> 23) & 0xffu) - sel<int32_t>(sub, 150, 127);
  const float m0 = bits_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m0 > 1.41421356f;
  const float m_half = 0.5f * m0;
  const float m = sel(big, m_half, m0);  // [sqrt(1/2), sqrt(2))
  const int32_t e = e0 + sel<int32_t>(big, 1, 0);
  // log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| <= 0.1716: series to t^9.
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  float q = 1.0f / 9.0f;
  q = q * t2 + 1.0f / 7.0f;
  q = q * t2 + 1.0f / 5.0f;
  q = q * t2 + 1.0f / 3.0f;
  q = q * t2 + 1.0f;
  const float ef = static_cast<float>(e);
  const float r = ef * kLn2Hi + (2.0f * t * q + ef * kLn2Lo);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float r_or_inf = sel(x < inf, r, inf);
  // x > 0: r (or inf); x == 0: -inf; x < 0 or NaN: NaN
  return sel(x > 0.0f, r_or_inf, sel(x == 0.0f, -inf, nan));
#endif
}
DS_LOSS_FN double log_pos(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// log(1 + u) for u in [0, 1] (or NaN); the float path is recip_log1p_unit below.
DS_LOSS_FN double log1p_unit(double u) {
#if defined(__CUDA_ARCH__)
  return ::log1p(u);
#else
  return std::log1p(u);
#endif
}

template <typename T>
DS_LOSS_FN T abs_val(T x) {
  const T neg = -x;
  return sel(x < T(0), neg, x);
}

// ---------------------------------------------------------------------------
// Per-pixel terms.
// ---------------------------------------------------------------------------

// sigmoid(x), through exp(-|x|) (the same expression bce_with_logits uses).
template <typename T>
DS_LOSS_FN T sigmoid(T x) {
  const T e = exp_nonpos(-abs_val(x));
  const T inv = T(1) / (T(1) + e);
  const T e_inv = e * inv;
  return sel(x >= T(0), inv, e_inv);
}

// For e in [0, 1] (or NaN): inv = 1 / (1 + e) and l1p = log(1 + e).
DS_LOSS_FN void recip_log1p_unit(float e, float& inv, float& l1p) {
#if defined(__CUDA_ARCH__)
  inv = 1.0f / (1.0f + e);
  l1p = ::log1pf(e);
#else
  // One division for both: with a = 1 + e, b = 2 + e and r = 1 / (a b), inv = b r and
  // t = e / (2 + e) = e a r (a few ulp each). log(1 + e) = 2 atanh(t), t in [0, 1/3]:
  // the series to t^15 leaves a relative remainder below 2e-9, and it is accurate for
  // tiny e (no 1 + e is formed in the log). e = 0 gives inv = 1, l1p = 0.
  const float a = 1.0f + e, b = 2.0f + e;
  const float r = 1.0f / (a * b);
  inv = b * r;
  const float t = (e * a) * r;
  const float t2 = t * t;
  float q = 1.0f / 15.0f;
  q = q * t2 + 1.0f / 13.0f;
  q = q * t2 + 1.0f / 11.0f;
  q = q * t2 + 1.0f / 9.0f;
  q = q * t2 + 1.0f / 7.0f;
  q = q * t2 + 1.0f / 5.0f;
  q = q * t2 + 1.0f / 3.0f;
  q = q * t2 + 1.0f;
  l1p = (2.0f * t) * q;
#endif
}
DS_LOSS_FN void recip_log1p_unit(double e, double& inv, double& l1p) {
  inv = 1.0 / (1.0 + e);
  l1p = log1p_unit(e);
}

// Binary cross-entropy with logits: loss = softplus(x) - y x, dloss/dx = sigmoid(x) - y.
// Also returns sigmoid(x) and its derivative sigmoid(x) (1 - sigmoid(x)).
template <typename T>
DS_LOSS_FN void bce_with_logits(T x, T y, T& loss, T& dloss, T& sig, T& dsig) {
  const T e = exp_nonpos(-abs_val(x));  // in (0, 1]
  T inv, l1p;
  recip_log1p_unit(e, inv, l1p);
  const T e_inv = e * inv;
  sig = sel(x >= T(0), inv, e_inv);
  dsig = e_inv * inv;
  const T yx = y * x;
  loss = (sel(x > T(0), x, T(0)) + l1p) - yx;
  dloss = sig - y;
}

// The gate loss of one valid pixel, BCE(a, h) + gate_mse (s - D)^2 + gate_sparsity s
// with D a constant, and its derivative with respect to a. Returns s and ds/da too.
// h is the gate's target (gate_target_pixel).
template <typename T>
DS_LOSS_FN void gate_pixel(T a, T h, T D, T gate_mse, T gate_sparsity, T& loss, T& dloss, T& s,
                           T& ds) {
  T bce, dbce;
  bce_with_logits(a, h, bce, dbce, s, ds);
  const T diff = s - D;
  loss = bce + gate_mse * diff * diff + gate_sparsity * s;
  dloss = dbce + (T(2) * gate_mse * diff + gate_sparsity) * ds;
}

// The gate's target (a constant): "router", h = [argmax r < E] (route_arg = argmax r
// over all E + 1 options, the model last); "benefit", (1 - c0) c_jhat with c_jhat the
// correctness of the expert jhat = argmax_{j<E} r_j. The choice is a template argument.
template <bool BENEFIT, typename T>
DS_LOSS_FN T gate_target_pixel(bool router_defers, T c0, T c_jhat) {
  if (BENEFIT) return (T(1) - c0) * c_jhat;
  return sel(router_defers, T(1), T(0));
}

// Coherence penalty rho (|d| for "l1", d^2 for "l2") and its derivative
// (sign(d) with sign(0) = 0, NaN propagating; or 2 d). The choice is a template
// argument: a select on a loop-invariant flag would keep a loop from vectorising.
template <bool L2, typename T>
DS_LOSS_FN T coh_rho(T d) {
  if (L2) return d * d;
  return abs_val(d);
}
template <bool L2, typename T>
DS_LOSS_FN T coh_drho(T d) {
  if (L2) return T(2) * d;
  const T zero_or_nan = d * T(0);  // keeps NaN
  return sel(d > T(0), T(1), sel(d < T(0), T(-1), zero_or_nan));
}

// "paper" surrogate: the coefficient of log(pi_k + eps) of routing channel k,
// -c0 for the model (k = E), 1 - 2 cj for expert j; written base + slope c_k with
// (base, slope) = (1, -2) for an expert and (0, -1) for the model.
template <typename T>
DS_LOSS_FN T paper_base(bool expert) {
  return expert ? T(1) : T(0);
}
template <typename T>
DS_LOSS_FN T paper_slope(bool expert) {
  return expert ? T(-2) : T(-1);
}

// "paper" surrogate, one routing channel k of a valid pixel with coefficient
// coef_k: returns coef_k log(pi_k + eps) and writes g_k = coef_k / (pi_k + eps),
// the derivative with respect to pi_k.
template <typename T>
DS_LOSS_FN T paper_channel(T coef, T pi, T eps, T& g) {
  const T q = pi + eps;
  g = coef / q;
  const T lq = log_pos(q);
  return coef * lq;
}

// "ova" surrogate, one routing channel k of a valid pixel: returns
// BCEWithLogits(r_k, c_k) = softplus(r_k) - c_k r_k and writes g = sigmoid(r_k) - c_k,
// its derivative with respect to r_k. No softmax enters it.
template <typename T>
DS_LOSS_FN T ova_channel(T r, T c, T& g) {
  T loss, sig, dsig;
  bce_with_logits(r, c, loss, g, sig, dsig);
  return loss;
}

// The part of the routing-logit gradient shared by every channel of a pixel
// (SUR: kSurrogateSoftmax, kSurrogatePaper or kSurrogateOva):
//   softmax surrogate: cc * Ctot,  paper: -cc * sum_k g_k pi_k,  ova: 0
//                                                               (collab, scaled by cc)
//   minus sum_k bal_k pi_k                                      (balance)
//   minus cD * D                                                (coherence on D)
template <int SUR, typename T>
DS_LOSS_FN T routing_common(T cc, T ctot_or_sg, T bsum, T cD, T D) {
  if (SUR == kSurrogateOva) return (-bsum) - cD * D;
  const T collab = SUR == kSurrogatePaper ? -(cc * ctot_or_sg) : cc * ctot_or_sg;
  return (collab - bsum) - cD * D;
}

// d loss / d r_m of one valid pixel. pi_m = softmax(r)_m; expert = [m < E] as 1 or
// 0; c_m the correctness of option m (softmax surrogate), g_m the paper derivative
// (coef_m / (pi_m + eps)) or the ova one (sigmoid(r_m) - c_m); bal_m the balance
// coefficient of channel m; cD the coherence derivative with respect to D.
// The collab term (-sum_k c_k log pi_k, sum_k coef_k log(pi_k + eps), or
// sum_k BCE(r_k, c_k)) contributes cc (Ctot pi_m - c_m), cc pi_m (g_m - sum_k g_k pi_k),
// or cc g_m; the balance term pi_m (bal_m - sum_k bal_k pi_k); the coherence term
// cD pi_m ([m < E] - D).
template <int SUR, typename T>
DS_LOSS_FN T routing_grad(T pi_m, T common, T bal_m, T cD, T expert, T cc, T c_m, T g_m) {
  if (SUR == kSurrogatePaper) return pi_m * (common + (bal_m + expert * cD) + cc * g_m);
  if (SUR == kSurrogateOva) return pi_m * (common + (bal_m + expert * cD)) + cc * g_m;
  return pi_m * (common + (bal_m + expert * cD)) - cc * c_m;
}

// ---------------------------------------------------------------------------
// Balance term and the assembly of the terms, in double, from the stats vector.
// ---------------------------------------------------------------------------

// BAL and, when dS is not null, dBAL/dS_k for k = 0..E (the derivative with
// respect to the sums behind pbar, i.e. with respect to each valid pixel's pi_k).
// low / high: balance_low / balance_high (only read for "band").
DS_LOSS_FN double balance_term(const double* stats, int64_t n_stats, int64_t E, int mode,
                               const double* low, const double* high, double* dS) {
  const double count =
      n_stats > stat_balance_count(E) ? stats[stat_balance_count(E)] : stats[stat_count(E)];
  if (dS != nullptr) {
    for (int64_t k = 0; k <= E; ++k) dS[k] = 0.0;
  }
  if (!(count > 0.0)) return 0.0;  // no valid pixel: 0, no gradient
  const double inv = 1.0 / count;
  if (mode == kBalanceCv2) {
    if (E == 1) return 0.0;  // one expert always has an even load
    double tot = 0.0, sq = 0.0;
    for (int64_t j = 0; j < E; ++j) {
      const double P = stats[j] * inv;
      tot += P;
      sq += P * P;
    }
    if (!(tot > 0.0)) return 0.0;
    if (dS != nullptr) {
      const double t3 = tot * tot * tot;
      for (int64_t j = 0; j < E; ++j) {
        const double P = stats[j] * inv;
        dS[j] = 2.0 * static_cast<double>(E) * (P * tot - sq) / t3 * inv;
      }
    }
    return static_cast<double>(E) * sq / (tot * tot) - 1.0;
  }
  double band = 0.0;
  for (int64_t k = 0; k <= E; ++k) {
    const double P = stats[k] * inv;
    const double over = P - high[k], under = low[k] - P;
    band += (over < 0.0 ? 0.0 : over) + (under < 0.0 ? 0.0 : under);  // relu, NaN propagates
    if (dS != nullptr) dS[k] = ((P > high[k] ? 1.0 : 0.0) - (P < low[k] ? 1.0 : 0.0)) * inv;
  }
  return band;
}

// Factors of the per-pixel gradient, from the stats (all 0 when N_V = 0).
struct GradScales {
  double seg;               // lambda_seg / W            (times class_weight[y])
  double collab;            // lambda_collab / N_V
  double gate;              // lambda_gate / N_V
  double coh[kMaxSpatial];  // lambda_coherence / n_d  (0 for an axis without pairs)
};

DS_LOSS_FN GradScales grad_scales(const double* stats, int64_t E, const LossParams& params) {
  GradScales g;
  const double nv = stats[stat_count(E)], w = stats[stat_weight(E)];
  g.seg = w > 0.0 ? params.lambda_seg / w : 0.0;
  g.collab = nv > 0.0 ? params.lambda_collab / nv : 0.0;
  g.gate = nv > 0.0 ? params.lambda_gate / nv : 0.0;
  for (int d = 0; d < kMaxSpatial; ++d) {
    const double n = stats[stat_pairs(E, d)];
    g.coh[d] = n > 0.0 ? params.lambda_coherence / n : 0.0;
  }
  return g;
}

// terms = [loss, seg, collab, gate, coherence, balance] from the per-pixel sums.
DS_LOSS_FN void assemble_terms(const double* sums, const double* stats, int64_t n_stats, int64_t E,
                               int num_spatial, const LossParams& params, const double* low,
                               const double* high, double* terms) {
  const double nv = stats[stat_count(E)], w = stats[stat_weight(E)];
  const double seg = w > 0.0 ? sums[kSumSeg] / w : 0.0;
  const double collab = nv > 0.0 ? sums[kSumCollab] / nv : 0.0;
  const double gate = nv > 0.0 ? sums[kSumGate] / nv : 0.0;
  double coh = 0.0;
  for (int m = 0; m < 2; ++m) {
    if (!(params.coherence_maps & (m == 0 ? kMapRouter : kMapGate))) continue;
    for (int d = 0; d < num_spatial; ++d) {
      const double n = stats[stat_pairs(E, d)];
      if (n > 0.0) coh += sums[kSumCoh + 3 * m + d] / n;
    }
  }
  const double bal = balance_term(stats, n_stats, E, params.balance, low, high, nullptr);
  terms[0] = params.lambda_seg * seg + params.lambda_collab * collab + params.lambda_gate * gate +
             params.lambda_coherence * coh + params.lambda_balance * bal;
  terms[1] = seg;
  terms[2] = collab;
  terms[3] = gate;
  terms[4] = coh;
  terms[5] = bal;
}

}  // namespace loss
}  // namespace deferredseg
