// CUDA kernels of `deferredseg::loss_stats` (docs/objective.md section 3; the contract is
// documented in deferredseg_kernels/ops/fused.py): one pass over the routing channels and
// the labels, reduced to the stats vector. The shared device code is loss_device.h.
//
//   stats_onepass  E + 1 <= 8: the whole vector's partial sums in one read of the routing
//                  channels and the target (valid count, class-weight sum, bad labels,
//                  neighbour pairs, sum_V pi_k)
//   more experts:  stats_pixels (counts; the softmax max and 1 / sum of each valid pixel),
//                  stats_pairs (neighbour pairs, from the valid mask), stats_pi (sum_V pi_k,
//                  one grid row per channel)
//   stats_finish   the stats vector
#include "loss_device.h"

namespace deferredseg {
namespace cuda_loss {

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

}  // namespace cuda_loss

#ifndef DS_CUDA_EMULATION  // the emulation registers its own ops (tests/cuda_emu)
TORCH_LIBRARY_IMPL(deferredseg, CUDA, m) { m.impl("loss_stats", &cuda_loss::loss_stats_cuda); }
#endif

}  // namespace deferredseg
