// Device code shared by the CUDA kernels of `deferredseg::loss_stats`
// (loss_stats_cuda.cu) and `deferredseg::loss_fused` (loss_fused_cuda.cu), docs/objective.md
// section 3; the contract of both ops is documented in deferredseg_kernels/ops/fused.py.
//
// One thread a pixel (grid-stride over a grid whose size depends on the pixel count
// only), int64 indexing, coalesced loads along the pixels, on the current stream.
// The per-pixel math is loss_pixel.h, shared with the CPU kernels.
//
// Reductions are two-stage and deterministic: every block writes its partial sums
// (a fixed shuffle / shared-memory tree in double) to its own row of a buffer, and
// one block adds the rows in a fixed order. No atomics.
//
// Here: the launch geometry, label reads, the call's layout, the block sum, the
// target of a pixel and its routing softmax.
#pragma once

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

}  // namespace cuda_loss
}  // namespace deferredseg
