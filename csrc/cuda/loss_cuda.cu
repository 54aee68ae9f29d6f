// CUDA kernels of `deferredseg::loss_stats` and `deferredseg::loss_fused`
// (docs/objective.md section 3; the contract of both ops is documented in
// deferredseg_kernels/ops/fused.py).
//
// One thread a pixel (grid-stride over a grid whose size depends on the pixel count
// only), int64 indexing, coalesced loads along the pixels, on the current stream.
// The per-pixel math is loss_pixel.h, shared with the CPU kernels.
//
// Reductions are two-stage and deterministic: every block writes its partial sums
// (a fixed shuffle / shared-memory tree in double) to its own row of a buffer, and
// one block adds the rows in a fixed order. No atomics.
//
//   loss_stats: stats_onepass  E + 1 <= 8: the whole vector's partial sums in one read of
//                              the routing channels and the target (valid count, class-
//                              weight sum, bad labels, neighbour pairs, sum_V pi_k)
//               more experts:  stats_pixels (counts; the softmax max and 1 / sum of each
//                              valid pixel), stats_pairs (neighbour pairs, from the valid
//                              mask), stats_pi (sum_V pi_k, one grid row per channel)
//               stats_finish   the stats vector
//   loss_fused: loss_prepare   gradient factors and balance coefficients (from stats)
//               loss_pixels    every term and the gradient of each pixel; the coherence
//                              in gather form (each pixel recomputes D and s of its
//                              neighbours from their logits, as the Triton kernel does),
//                              so the logits are read in one pass
//               loss_finish    the terms
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../dispatch.h"
#include "../loss.h"
#include "../loss_pixel.h"
#include "cuda_compat.h"

namespace deferredseg {
namespace cuda_loss {

using namespace loss;

constexpr int kThreads = 256;
#ifdef DS_CUDA_EMU_MAX_BLOCKS
// The CPU emulation's cap (tests/cuda_emu): small grids, so that the grid-stride loops
// take several steps on small test inputs.
constexpr int64_t kMaxBlocks = DS_CUDA_EMU_MAX_BLOCKS;
#else
constexpr int64_t kMaxBlocks = 2048;  // fixed cap: the partition depends on the shape only
#endif

inline int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// A label read by the dtype code of its tensor (LabelPtr of loss.h; uniform over the grid,
// so the branch is free).
__device__ __forceinline__ int64_t load_label(const LabelPtr& l, int64_t idx) {
  if (l.kind == 0) return static_cast<int64_t>(static_cast<const uint8_t*>(l.p)[idx]);
  if (l.kind == 1) return static_cast<int64_t>(static_cast<const int32_t*>(l.p)[idx]);
  return static_cast<const int64_t*>(l.p)[idx];
}

// Shapes and strides of one call (the strides and label range: LossStrides of loss.h).
struct Layout : LossStrides {
  int64_t B, P, K, E, C;
  int nd;
  int64_t S[kMaxSpatial], st[kMaxSpatial];
};

inline Layout make_layout(const LossProblem& pb, const at::Tensor* gflat) {
  Layout L{};
  static_cast<LossStrides&>(L) = loss_strides(pb, gflat);
  L.B = pb.B;
  L.P = pb.P;
  L.K = pb.K;
  L.E = pb.E;
  L.C = pb.C;
  L.nd = pb.nd;
  for (int d = 0; d < kMaxSpatial; ++d) {
    L.S[d] = pb.S[d];
    L.st[d] = pb.st[d];
  }
  return L;
}

// Sum of v over the block, in a fixed order (valid in thread 0). smem: kThreads / 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (warp == 0) {
    r = lane < kThreads / 32 ? smem[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  }
  __syncthreads();
  return r;
}

// The coordinate along spatial axis d of pixel p.
__device__ __forceinline__ int64_t axis_coord(const Layout& L, int64_t p, int d) {
  return (p / L.st[d]) % L.S[d];
}

// Whether pixel p of batch element b has a neighbour at p + st[d] that the valid mask marks.
__device__ __forceinline__ bool next_in_mask(const Layout& L, const uint8_t* vmask, int64_t b,
                                             int64_t p, int d) {
  return axis_coord(L, p, d) < L.S[d] - 1 && vmask[b * L.P + p + L.st[d]] != 0;
}

// Target of pixel (b, p): valid flag, label usable as an index, raw value.
struct Target {
  bool valid;
  int64_t y, raw;
  bool bad;
};
__device__ __forceinline__ Target read_target(const Layout& L, const LabelPtr& t, int64_t b,
                                              int64_t p) {
  Target r;
  r.raw = load_label(t, b * L.tb + p * L.tp);
  r.valid = r.raw != L.ignore;
  const bool in_range = r.raw >= 0 && r.raw < L.nlab;
  r.y = (r.valid && in_range) ? r.raw : 0;
  r.bad = r.valid && !in_range;
  return r;
}

// Softmax over the E + 1 routing logits at xr (stride xc): argmax, max, sum of exps
// and the sum over the experts; also jhat, the argmax over the experts alone (the
// argmax over all options is that one's, then one step with the model's logit).
template <typename scalar_t, typename acc_t>
struct Routing {
  acc_t mx, sum, experts;
  int64_t arg, jhat;
};
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Routing<scalar_t, acc_t> routing(const scalar_t* xr, int64_t xc,
                                                            int64_t E) {
  Routing<scalar_t, acc_t> r;
  r.mx = static_cast<acc_t>(xr[0]);
  r.arg = 0;
  for (int64_t k = 1; k < E; ++k) {
    const acc_t v = static_cast<acc_t>(xr[k * xc]);
    if (argmax_step(v, r.mx)) {
      r.mx = v;
      r.arg = k;
    }
  }
  r.jhat = r.arg;
  {
    const acc_t v = static_cast<acc_t>(xr[E * xc]);  // the model
    if (argmax_step(v, r.mx)) {
      r.mx = v;
      r.arg = E;
    }
  }
  r.sum = acc_t(0);
  r.experts = acc_t(0);
  for (int64_t k = 0; k <= E; ++k) {
    const acc_t e = exp_nonpos(static_cast<acc_t>(xr[k * xc]) - r.mx);
    r.sum += e;
    if (k < E) r.experts += e;
  }
  return r;
}

// ---------------------------------------------------------------------------
// loss_stats
// ---------------------------------------------------------------------------
constexpr int kStatsCols = 6;        // N_V, W, bad, pairs along axes 0, 1, 2
constexpr int kOnePassChannels = 8;  // stats_onepass keeps up to this many sum_V pi_k in registers

// Labels out of range at pixel (b, p): its target's, and its experts' when checked.
__device__ __forceinline__ int64_t bad_labels(const Layout& L, const Target& t, const LabelPtr& lab,
                                              int64_t b, int64_t p, bool check_experts) {
  int64_t bad = t.bad ? 1 : 0;
  if (check_experts) {
    for (int64_t j = 0; j < L.E; ++j) {
      const int64_t v = load_label(lab, b * L.lb + j * L.le + p * L.lp);
      bad += (v != L.ignore && (v < 0 || v >= L.nlab)) ? 1 : 0;
    }
  }
  return bad;
}

// Whether pixel p of batch element b has a neighbour at p + st[d] with a valid target.
__device__ __forceinline__ bool next_target_valid(const Layout& L, const LabelPtr& tgt, int64_t b,
                                                  int64_t p, int d) {
  return axis_coord(L, p, d) < L.S[d] - 1 &&
         load_label(tgt, b * L.tb + (p + L.st[d]) * L.tp) != L.ignore;
}

// The whole stats vector's partial sums in one pass, for E + 1 <= NR routing channels
// (their sums in registers): valid count, class-weight sum, bad labels, the valid
// neighbour pairs (from the targets of the forward neighbours, which the block has
// just read or is about to) and sum_V pi_k. part and part_pi as stats_pixels /
// stats_pairs / stats_pi write them, which is the path for more experts.
template <typename scalar_t, typename acc_t, int NR>
__global__ void __launch_bounds__(kThreads)
    stats_onepass(const scalar_t* __restrict__ x, LabelPtr tgt, LabelPtr lab,
                  const acc_t* __restrict__ cw, Layout L, bool check_experts,
                  double* __restrict__ part, double* __restrict__ part_pi) {
  __shared__ double smem[kThreads / 32];
  const int64_t n = L.B * L.P;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc[kStatsCols] = {0, 0, 0, 0, 0, 0};
  double spi[NR];
#pragma unroll
  for (int k = 0; k < NR; ++k) spi[k] = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t b = i / L.P, p = i - b * L.P;
    const Target t = read_target(L, tgt, b, p);
    acc[2] += static_cast<double>(bad_labels(L, t, lab, b, p, check_experts));
    if (!t.valid) continue;
    acc[0] += 1.0;
    acc[1] += cw != nullptr ? static_cast<double>(cw[t.y]) : 1.0;
    for (int d = 0; d < L.nd; ++d) acc[3 + d] += next_target_valid(L, tgt, b, p, d) ? 1.0 : 0.0;
    // The softmax as routing() and stats_pi compute it: the same maximum, 1 / sum and terms.
    const scalar_t* xr = x + b * L.xb + L.K * L.xc + p * L.xp;
    acc_t v[NR];
    acc_t mx = static_cast<acc_t>(xr[0]);
    v[0] = mx;
#pragma unroll
    for (int k = 1; k < NR; ++k) {
      if (k <= L.E) {
        v[k] = static_cast<acc_t>(xr[k * L.xc]);
        if (argmax_step(v[k], mx)) mx = v[k];
      }
    }
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < NR; ++k) {
      if (k <= L.E) sum += exp_nonpos(v[k] - mx);
    }
    const acc_t inv = acc_t(1) / sum;
#pragma unroll
    for (int k = 0; k < NR; ++k) {
      if (k <= L.E) spi[k] += static_cast<double>(exp_nonpos(v[k] - mx) * inv);
    }
  }
  for (int c = 0; c < kStatsCols; ++c) {
    const double s = block_sum(acc[c], smem);
    if (threadIdx.x == 0) part[blockIdx.x * kStatsCols + c] = s;
  }
#pragma unroll
  for (int k = 0; k < NR; ++k) {
    if (k > L.E) break;  // uniform over the block
    const double s = block_sum(spi[k], smem);
    if (threadIdx.x == 0) part_pi[k * gridDim.x + blockIdx.x] = s;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_pixels(const scalar_t* __restrict__ x, LabelPtr tgt, LabelPtr lab,
                 const acc_t* __restrict__ cw, Layout L, bool check_experts,
                 uint8_t* __restrict__ vmask, acc_t* __restrict__ soft, double* __restrict__ part) {
  __shared__ double smem[kThreads / 32];
  const int64_t n = L.B * L.P;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc[kStatsCols] = {0, 0, 0, 0, 0, 0};
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t b = i / L.P, p = i - b * L.P;
    const Target t = read_target(L, tgt, b, p);
    vmask[i] = t.valid ? 1 : 0;
    acc[2] += static_cast<double>(bad_labels(L, t, lab, b, p, check_experts));
    if (t.valid) {
      acc[0] += 1.0;
      acc[1] += cw != nullptr ? static_cast<double>(cw[t.y]) : 1.0;
      const Routing<scalar_t, acc_t> r =
          routing<scalar_t, acc_t>(x + b * L.xb + L.K * L.xc + p * L.xp, L.xc, L.E);
      soft[2 * i] = r.mx;
      soft[2 * i + 1] = acc_t(1) / r.sum;
    } else {
      soft[2 * i] = acc_t(0);
      soft[2 * i + 1] = acc_t(0);  // marks an invalid pixel for stats_pi
    }
  }
  for (int c = 0; c < kStatsCols; ++c) {
    const double s = block_sum(acc[c], smem);
    if (threadIdx.x == 0) part[blockIdx.x * kStatsCols + c] = s;
  }
}

// Valid neighbour pairs: a second pass, once the valid mask is complete.
__global__ void __launch_bounds__(kThreads)
    stats_pairs(const uint8_t* __restrict__ vmask, Layout L, double* __restrict__ part) {
  __shared__ double smem[kThreads / 32];
  const int64_t n = L.B * L.P;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double cnt[kMaxSpatial] = {0, 0, 0};
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    if (!vmask[i]) continue;
    const int64_t b = i / L.P, p = i - b * L.P;
    for (int d = 0; d < L.nd; ++d) cnt[d] += next_in_mask(L, vmask, b, p, d) ? 1.0 : 0.0;
  }
  for (int d = 0; d < kMaxSpatial; ++d) {
    const double s = block_sum(cnt[d], smem);
    if (threadIdx.x == 0) part[blockIdx.x * kStatsCols + 3 + d] = s;
  }
}

// sum_V pi_k for routing channel k = blockIdx.y.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_pi(const scalar_t* __restrict__ x, const acc_t* __restrict__ soft, Layout L,
             double* __restrict__ part) {
  __shared__ double smem[kThreads / 32];
  const int64_t k = blockIdx.y;
  const int64_t n = L.B * L.P;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double s = 0.0;  // a thread's pixels add up in double, as the sums of every kernel here
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const acc_t inv = soft[2 * i + 1];
    if (inv == acc_t(0)) continue;  // invalid pixel (a valid one has 1 / sum > 0, or NaN)
    const int64_t b = i / L.P, p = i - b * L.P;
    const acc_t v = static_cast<acc_t>(x[b * L.xb + (L.K + k) * L.xc + p * L.xp]);
    s += static_cast<double>(exp_nonpos(v - soft[2 * i]) * inv);
  }
  const double tot = block_sum(s, smem);
  if (threadIdx.x == 0) part[k * gridDim.x + blockIdx.x] = tot;
}

// stats = [S_0..S_E, N_V, W, n_0, n_1, n_2, bad], each column added over the blocks in order.
__global__ void __launch_bounds__(kThreads)
    stats_finish(const double* __restrict__ part, const double* __restrict__ part_pi,
                 int64_t nblocks, int64_t E, double* __restrict__ stats) {
  __shared__ double smem[kThreads / 32];
  for (int64_t col = 0; col < E + 1 + kStatsCols; ++col) {
    double s = 0.0;
    for (int64_t blk = threadIdx.x; blk < nblocks; blk += blockDim.x) {
      s += col <= E ? part_pi[col * nblocks + blk] : part[blk * kStatsCols + (col - E - 1)];
    }
    s = block_sum(s, smem);
    if (threadIdx.x == 0) {
      const int64_t c = col - E - 1;  // 0 N_V, 1 W, 2 bad, 3.. pairs
      if (col <= E) {
        stats[col] = s;
      } else if (c == 0) {
        stats[stat_count(E)] = s;
      } else if (c == 1) {
        stats[stat_weight(E)] = s;
      } else if (c == 2) {
        stats[stat_bad(E)] = s;
      } else {
        stats[stat_pairs(E, static_cast<int>(c - 3))] = s;
      }
    }
  }
}

at::Tensor loss_stats_cuda(const at::Tensor& logits, const at::Tensor& target,
                           const at::Tensor& expert_labels,
                           const c10::optional<at::Tensor>& class_weight, int64_t num_classes,
                           int64_t num_experts, int64_t ignore_index, bool check_expert_labels) {
  const char* op = "deferredseg::loss_stats (CUDA kernel)";
  TORCH_CHECK(DS_ON_DEVICE(logits), op, ": logits must be a CUDA tensor");
  DS_DEVICE_GUARD(logits);
  const LossCall call = prepare_stats(op, logits, target, expert_labels, class_weight, num_classes,
                                      num_experts, ignore_index);
  const LossProblem& pb = call.pb;
  const at::ScalarType acc = call.acc;
  const at::Tensor& cw = call.cw;
  at::Tensor stats = at::zeros({stats_len(pb.E)}, logits.options().dtype(at::kDouble));
  const int64_t n = pb.B * pb.P;
  if (n == 0) return stats;
  const Layout L = make_layout(pb, nullptr);
  const int64_t blocks = blocks_for(n);
  auto dopt = logits.options().dtype(at::kDouble);
  at::Tensor part = at::empty({blocks * kStatsCols}, dopt);
  at::Tensor part_pi = at::empty({(pb.E + 1) * blocks}, dopt);
  cudaStream_t stream = DS_CURRENT_STREAM();
  const LabelPtr tl = label_ptr(pb.target), ll = label_ptr(pb.labels);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "loss_stats_cuda", [&] {
        using acc_t = typename AccType<scalar_t>::type;
        const scalar_t* x = pb.x.data_ptr<scalar_t>();
        const acc_t* w = cw.defined() ? cw.data_ptr<acc_t>() : nullptr;
        if (pb.E + 1 <= kOnePassChannels) {  // one read of the routing channels and the target
          if (pb.E + 1 <= 4) {
            DS_LAUNCH(blocks, kThreads, stream, stats_onepass<scalar_t, acc_t, 4>)(
                x, tl, ll, w, L, check_expert_labels, part.data_ptr<double>(),
                part_pi.data_ptr<double>());
          } else {
            DS_LAUNCH(blocks, kThreads, stream, stats_onepass<scalar_t, acc_t, kOnePassChannels>)(
                x, tl, ll, w, L, check_expert_labels, part.data_ptr<double>(),
                part_pi.data_ptr<double>());
          }
          DS_LAUNCH_CHECK();
          return;
        }
        // More experts: the softmax's max and 1 / sum per pixel, then one grid row per channel.
        at::Tensor vmask = at::empty({n}, logits.options().dtype(at::kByte));
        at::Tensor soft = at::empty({2 * n}, logits.options().dtype(acc));
        DS_LAUNCH(blocks, kThreads, stream, stats_pixels<scalar_t, acc_t>)(
            x, tl, ll, w, L, check_expert_labels, vmask.data_ptr<uint8_t>(), soft.data_ptr<acc_t>(),
            part.data_ptr<double>());
        DS_LAUNCH_CHECK();
        DS_LAUNCH(blocks, kThreads, stream, stats_pairs)(vmask.data_ptr<uint8_t>(), L,
                                                         part.data_ptr<double>());
        DS_LAUNCH_CHECK();
        const dim3 pi_grid(static_cast<unsigned>(blocks), static_cast<unsigned>(pb.E + 1));
        DS_LAUNCH(pi_grid, kThreads, stream, stats_pi<scalar_t, acc_t>)(
            x, soft.data_ptr<acc_t>(), L, part_pi.data_ptr<double>());
        DS_LAUNCH_CHECK();
      });
  DS_LAUNCH(1, kThreads, stream, stats_finish)(part.data_ptr<double>(), part_pi.data_ptr<double>(),
                                               blocks, pb.E, stats.data_ptr<double>());
  DS_LAUNCH_CHECK();
  return stats;
}

// ---------------------------------------------------------------------------
// loss_fused
// ---------------------------------------------------------------------------

// Gradient factors of a call, made on the device from the stats (no host sync):
// [seg, collab, gate, coh_0, coh_1, coh_2, bal_0 .. bal_E].
constexpr int kCoefHead = 6;

__global__ void loss_prepare(const double* __restrict__ stats, int64_t n_stats, int64_t E,
                             LossParams prm, const double* __restrict__ low,
                             const double* __restrict__ high, double* __restrict__ coef) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const GradScales g = grad_scales(stats, E, prm);
  coef[0] = g.seg;
  coef[1] = g.collab;
  coef[2] = g.gate;
  for (int d = 0; d < kMaxSpatial; ++d) coef[3 + d] = g.coh[d];
  double* dS = coef + kCoefHead;
  balance_term(stats, n_stats, E, prm.balance, low, high, dS);
  for (int64_t k = 0; k <= E; ++k) dS[k] *= prm.lambda_balance * prm.balance_grad_scale;
}

// The coherence maps of a pixel: D = sum_{j<E} pi_j (router) and s = sigmoid(a) (gate).
template <typename acc_t>
struct Maps {
  acc_t D, s;
};
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Maps<acc_t> maps_of(const Routing<scalar_t, acc_t>& r, acc_t a) {
  return {r.experts / r.sum, sigmoid(a)};
}

// Coherence at pixel (b, p), whose maps are mp, in gather form: each neighbour's maps
// are recomputed here from its logits (by the function that gave mp, so both pixels
// of a pair see the same values), instead of being read from maps that a pass before
// this one wrote. Adds to gD / gS the derivatives with respect to D_p / s_p of both
// pairs of every axis (scaled by coh[d]) and to val the penalties of the forward
// pairs (router axes at val[0..2], gate axes at val[3..5]).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void coherence_at(const scalar_t* x, const LabelPtr& tgt,
                                             const Layout& L, int64_t b, int64_t p, int maps,
                                             bool l2, const acc_t* coh, Maps<acc_t> mp, acc_t& gD,
                                             acc_t& gS, double* val) {
  // A rolled loop (the neighbour's softmax is inlined once, not six times), and no
  // index into coh or val that depends on d: they stay in registers, not local memory.
#pragma unroll 1
  for (int d = 0; d < L.nd; ++d) {
    const int64_t c = axis_coord(L, p, d);
    const acc_t cd = d == 0 ? coh[0] : (d == 1 ? coh[1] : coh[2]);
    for (int dir = -1; dir <= 1; dir += 2) {
      if (dir < 0 ? c == 0 : c == L.S[d] - 1) continue;  // no neighbour inside the volume
      const int64_t q = p + dir * L.st[d];
      if (load_label(tgt, b * L.tb + q * L.tp) == L.ignore) continue;  // the pair does not count
      const scalar_t* xq = x + b * L.xb + L.K * L.xc + q * L.xp;
      const Maps<acc_t> mq = maps_of<scalar_t, acc_t>(routing<scalar_t, acc_t>(xq, L.xc, L.E),
                                                      static_cast<acc_t>(xq[(L.E + 1) * L.xc]));
      double pen_d = 0.0, pen_s = 0.0;
      if (maps & kMapRouter) {
        const acc_t diff = mp.D - mq.D;
        gD += cd * (l2 ? coh_drho<true>(diff) : coh_drho<false>(diff));
        pen_d = static_cast<double>(l2 ? coh_rho<true>(diff) : coh_rho<false>(diff));
      }
      if (maps & kMapGate) {
        const acc_t diff = mp.s - mq.s;
        gS += cd * (l2 ? coh_drho<true>(diff) : coh_drho<false>(diff));
        pen_s = static_cast<double>(l2 ? coh_rho<true>(diff) : coh_rho<false>(diff));
      }
      if (dir > 0) {  // the forward pair's penalty
        if (d == 0) {
          val[0] += pen_d;
          val[3] += pen_s;
        } else if (d == 1) {
          val[1] += pen_d;
          val[4] += pen_s;
        } else {
          val[2] += pen_d;
          val[5] += pen_s;
        }
      }
    }
  }
}

// At least 3 blocks an SM (37.5 % occupancy): ptxas (sm_90, CUDA 13.0) then keeps
// float32 at 80 registers with 56 bytes of spill stores; unbounded it takes 120
// registers (2 blocks an SM). Not yet measured on a GPU either way.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 3)
    loss_pixels(const scalar_t* __restrict__ x, LabelPtr tgt, LabelPtr lab,
                const acc_t* __restrict__ cw, Layout L, LossParams prm,
                const double* __restrict__ coef, scalar_t* __restrict__ g,
                double* __restrict__ part) {
  __shared__ double smem[kThreads / 32];
  const int64_t n = L.B * L.P, K = L.K, E = L.E;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool paper = prm.surrogate == kSurrogatePaper, ova = prm.surrogate == kSurrogateOva,
             l2 = prm.coherence == kCoherenceL2, benefit = prm.gate_target == kGateTargetBenefit;
  const acc_t seg_scale = static_cast<acc_t>(coef[0]), cc = static_cast<acc_t>(coef[1]),
              cg = static_cast<acc_t>(coef[2]);
  const acc_t coh[kMaxSpatial] = {static_cast<acc_t>(coef[3]), static_cast<acc_t>(coef[4]),
                                  static_cast<acc_t>(coef[5])};
  const double* bal = coef + kCoefHead;
  const acc_t gm = static_cast<acc_t>(prm.gate_mse), gsp = static_cast<acc_t>(prm.gate_sparsity),
              eps = static_cast<acc_t>(prm.paper_eps);
  // A thread's sums over its pixels, in double: a thread may visit thousands of pixels
  // (the grid is capped), too many to add up in float32 to 1e-6.
  double sums[kNumSums] = {0, 0, 0, 0, 0, 0, 0, 0, 0};

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t b = i / L.P, p = i - b * L.P;
    const scalar_t* px = x + b * L.xb + p * L.xp;
    scalar_t* pg = g != nullptr ? g + b * L.gb + p * L.gp : nullptr;
    const Target t = read_target(L, tgt, b, p);
    if (!t.valid) {
      if (pg != nullptr) {
        for (int64_t c = 0; c < L.C; ++c) pg[c * L.gc] = static_cast<scalar_t>(0);
      }
      continue;
    }
    const acc_t w = cw != nullptr ? cw[t.y] : acc_t(1);

    // segmentation
    acc_t c0;
    if (K == 1) {
      const acc_t z = static_cast<acc_t>(px[0]);
      const acc_t yv = static_cast<acc_t>(t.y);
      acc_t l, dl, s, ds;
      bce_with_logits(z, yv, l, dl, s, ds);
      sums[kSumSeg] += w * l;
      c0 = (z > acc_t(0)) == (t.y == 1) ? acc_t(1) : acc_t(0);
      if (pg != nullptr) pg[0] = static_cast<scalar_t>(seg_scale * w * dl);
    } else {
      acc_t mx = static_cast<acc_t>(px[0]);
      int64_t arg = 0;
      for (int64_t k = 1; k < K; ++k) {
        const acc_t v = static_cast<acc_t>(px[k * L.xc]);
        if (argmax_step(v, mx)) {
          mx = v;
          arg = k;
        }
      }
      acc_t sum = acc_t(0), zy = acc_t(0);
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = static_cast<acc_t>(px[k * L.xc]);
        sum += exp_nonpos(v - mx);
        if (k == t.y) zy = v;
      }
      sums[kSumSeg] += w * (log_pos(sum) - (zy - mx));
      c0 = arg == t.y ? acc_t(1) : acc_t(0);
      if (pg != nullptr) {
        const acc_t cf = seg_scale * w, inv = acc_t(1) / sum;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t pk = exp_nonpos(static_cast<acc_t>(px[k * L.xc]) - mx) * inv;
          pg[k * L.gc] = static_cast<scalar_t>(cf * (pk - (k == t.y ? acc_t(1) : acc_t(0))));
        }
      }
    }

    // routing, collab, balance
    const scalar_t* xr = px + K * L.xc;
    const Routing<scalar_t, acc_t> r = routing<scalar_t, acc_t>(xr, L.xc, E);
    const acc_t inv = acc_t(1) / r.sum, logsum = log_pos(r.sum);
    const acc_t D = r.experts * inv;
    const int64_t lbase = b * L.lb + p * L.lp;
    acc_t lcol = acc_t(0), acc = acc_t(0), bsum = acc_t(0);
    acc_t c_jhat = acc_t(0);  // the correctness of the expert jhat ("benefit" gate target)
    for (int64_t k = 0; k <= E; ++k) {
      const acc_t rk = static_cast<acc_t>(xr[k * L.xc]);
      const acc_t pk = exp_nonpos(rk - r.mx) * inv;
      acc_t ck = c0;
      if (k < E) {
        const int64_t m = load_label(lab, lbase + k * L.le);
        ck = (m != L.ignore && m == t.raw) ? acc_t(1) : acc_t(0);
        if (k == r.jhat) c_jhat = ck;
      }
      if (paper) {
        acc_t gk;
        lcol +=
            paper_channel(paper_base<acc_t>(k < E) + paper_slope<acc_t>(k < E) * ck, pk, eps, gk);
        acc += gk * pk;
      } else if (ova) {
        acc_t gk;
        lcol += ova_channel(rk, ck, gk);
      } else {
        lcol -= ck * ((rk - r.mx) - logsum);
        acc += ck;
      }
      bsum += static_cast<acc_t>(bal[k]) * pk;
    }
    sums[kSumCollab] += lcol;

    // gate
    const acc_t h = benefit ? gate_target_pixel<true>(false, c0, c_jhat)
                            : gate_target_pixel<false>(r.arg < E, c0, c_jhat);
    const acc_t a = static_cast<acc_t>(xr[(E + 1) * L.xc]);
    acc_t lg, dg, s, ds;
    gate_pixel(a, h, D, gm, gsp, lg, dg, s, ds);
    sums[kSumGate] += lg;

    // coherence
    acc_t gD = acc_t(0), gS = acc_t(0);
    if (prm.maps != 0) {
      coherence_at<scalar_t, acc_t>(x, tgt, L, b, p, prm.maps, l2, coh,
                                    maps_of<scalar_t, acc_t>(r, a), gD, gS, sums + kSumCoh);
    }

    // gradient of the routing and gate logits
    if (pg != nullptr) {
      pg[(K + E + 1) * L.gc] = static_cast<scalar_t>(cg * dg + gS * ds);
      const acc_t common = paper ? routing_common<kSurrogatePaper>(cc, acc, bsum, gD, D)
                                 : (ova ? routing_common<kSurrogateOva>(cc, acc, bsum, gD, D)
                                        : routing_common<kSurrogateSoftmax>(cc, acc, bsum, gD, D));
      for (int64_t k = 0; k <= E; ++k) {
        const acc_t rk = static_cast<acc_t>(xr[k * L.xc]);
        const acc_t pk = exp_nonpos(rk - r.mx) * inv;
        acc_t ck = c0;
        if (k < E) {
          const int64_t m = load_label(lab, lbase + k * L.le);
          ck = (m != L.ignore && m == t.raw) ? acc_t(1) : acc_t(0);
        }
        const acc_t expert = k < E ? acc_t(1) : acc_t(0);
        const acc_t bk = static_cast<acc_t>(bal[k]);
        acc_t gk;
        if (paper) {
          const acc_t cf = paper_base<acc_t>(k < E) + paper_slope<acc_t>(k < E) * ck;
          gk = routing_grad<kSurrogatePaper>(pk, common, bk, gD, expert, cc, ck, cf / (pk + eps));
        } else if (ova) {
          acc_t g_ova;
          ova_channel(rk, ck, g_ova);
          gk = routing_grad<kSurrogateOva>(pk, common, bk, gD, expert, cc, ck, g_ova);
        } else {
          gk = routing_grad<kSurrogateSoftmax>(pk, common, bk, gD, expert, cc, ck, acc_t(0));
        }
        pg[(K + k) * L.gc] = static_cast<scalar_t>(gk);
      }
    }
  }
  for (int s = 0; s < kNumSums; ++s) {
    const double v = block_sum(sums[s], smem);
    if (threadIdx.x == 0) part[blockIdx.x * kNumSums + s] = v;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_finish(const double* __restrict__ part, int64_t nblocks, const double* __restrict__ stats,
                int64_t n_stats, int64_t E, int nd, LossParams prm, const double* __restrict__ low,
                const double* __restrict__ high, acc_t* __restrict__ terms) {
  __shared__ double smem[kThreads / 32];
  __shared__ double sums[kNumSums];
  for (int s = 0; s < kNumSums; ++s) {
    double v = 0.0;
    for (int64_t blk = threadIdx.x; blk < nblocks; blk += blockDim.x) v += part[blk * kNumSums + s];
    v = block_sum(v, smem);
    if (threadIdx.x == 0) sums[s] = v;
  }
  if (threadIdx.x == 0) {
    double out[kTermsLen];
    assemble_terms(sums, stats, n_stats, E, nd, prm, low, high, out);
    for (int k = 0; k < kTermsLen; ++k) terms[k] = static_cast<acc_t>(out[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> loss_fused_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& expert_labels,
    const c10::optional<at::Tensor>& class_weight, const at::Tensor& stats,
    const c10::optional<at::Tensor>& balance_low, const c10::optional<at::Tensor>& balance_high,
    int64_t num_classes, int64_t num_experts, int64_t ignore_index, c10::ArrayRef<double> fparams,
    c10::ArrayRef<int64_t> iparams, bool compute_grad) {
  const char* op = "deferredseg::loss_fused (CUDA kernel)";
  TORCH_CHECK(DS_ON_DEVICE(logits), op, ": logits must be a CUDA tensor");
  DS_DEVICE_GUARD(logits);
  const LossCall call =
      prepare_fused(op, logits, target, expert_labels, class_weight, stats, balance_low,
                    balance_high, num_classes, num_experts, ignore_index, fparams, iparams,
                    /*check_experts_supported=*/false);
  const LossProblem& pb = call.pb;
  const LossParams& prm = call.prm;
  const at::Tensor &st = call.stats, &low = call.low, &high = call.high, &cw = call.cw;
  const int64_t E = pb.E, n = pb.B * pb.P;
  const at::ScalarType acc = call.acc;
  GradOut gout;
  if (compute_grad) gout = make_grad_out(logits, pb);
  const Layout L = make_layout(pb, compute_grad ? &gout.flat : nullptr);
  const int64_t blocks = n > 0 ? blocks_for(n) : 0;
  auto dopt = logits.options().dtype(at::kDouble);
  at::Tensor coef = at::empty({kCoefHead + E + 1}, dopt);
  at::Tensor part = at::empty({std::max<int64_t>(blocks, 1) * kNumSums}, dopt);
  at::Tensor terms = at::empty({kTermsLen}, logits.options().dtype(acc));
  cudaStream_t stream = DS_CURRENT_STREAM();
  const LabelPtr tl = label_ptr(pb.target), ll = label_ptr(pb.labels);

  DS_LAUNCH(1, 32, stream, loss_prepare)(st.data_ptr<double>(), st.numel(), E, prm,
                                         low.data_ptr<double>(), high.data_ptr<double>(),
                                         coef.data_ptr<double>());
  DS_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "loss_fused_cuda", [&] {
        using acc_t = typename AccType<scalar_t>::type;
        if (n > 0) {
          DS_LAUNCH(blocks, kThreads, stream, loss_pixels<scalar_t, acc_t>)(
              pb.x.data_ptr<scalar_t>(), tl, ll, cw.defined() ? cw.data_ptr<acc_t>() : nullptr, L,
              prm, coef.data_ptr<double>(), compute_grad ? gout.flat.data_ptr<scalar_t>() : nullptr,
              part.data_ptr<double>());
          DS_LAUNCH_CHECK();
        }
        DS_LAUNCH(1, kThreads, stream, loss_finish<acc_t>)(
            part.data_ptr<double>(), blocks, st.data_ptr<double>(), st.numel(), E, pb.nd, prm,
            low.data_ptr<double>(), high.data_ptr<double>(), terms.data_ptr<acc_t>());
        DS_LAUNCH_CHECK();
      });
  at::Tensor grad = compute_grad ? finish_grad(gout) : at::empty({0}, logits.options());
  return {terms, grad};
}

}  // namespace cuda_loss

#ifndef DS_CUDA_EMULATION  // the emulation registers its own ops (tests/cuda_emu)
TORCH_LIBRARY_IMPL(deferredseg, CUDA, m) {
  m.impl("loss_stats", &cuda_loss::loss_stats_cuda);
  m.impl("loss_fused", &cuda_loss::loss_fused_cuda);
}
#endif

}  // namespace deferredseg
