// CUDA kernels of `deferredseg::loss_fused` (docs/objective.md section 3; the contract is
// documented in deferredseg_kernels/ops/fused.py): every term and, when asked, the
// gradient, in one pass over the logits. The shared device code is loss_device.h.
//
//   loss_prepare   gradient factors and balance coefficients (from stats)
//   loss_pixels    every term and the gradient of each pixel; the coherence in gather
//                  form (each pixel recomputes D and s of its neighbours from their
//                  logits, as the Triton kernel does), so the logits are read in one pass
//   loss_finish    the terms
#include "loss_device.h"

namespace deferredseg {
namespace cuda_loss {

// The gradient factors of a call, made on the device from the stats (no host sync), at
// these indices of one double buffer: the scale of each term's per-pixel gradient
// (GradScales of loss_pixel.h: seg, collab, gate, then coherence per axis), then the
// balance coefficient of every routing channel k = 0 .. E.
constexpr int kScaleSeg = 0;
constexpr int kScaleCollab = 1;
constexpr int kScaleGate = 2;
constexpr int kScaleCoherence = 3;                           // + spatial axis d
constexpr int kBalanceCoef = kScaleCoherence + kMaxSpatial;  // + routing channel k

__global__ void loss_prepare(const double* __restrict__ stats, int64_t n_stats, int64_t E,
                             LossParams params, const double* __restrict__ low,
                             const double* __restrict__ high, double* __restrict__ factors) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const GradScales g = grad_scales(stats, E, params);
  factors[kScaleSeg] = g.seg;
  factors[kScaleCollab] = g.collab;
  factors[kScaleGate] = g.gate;
  for (int d = 0; d < kMaxSpatial; ++d) factors[kScaleCoherence + d] = g.coh[d];
  double* dS = factors + kBalanceCoef;
  balance_term(stats, n_stats, E, params.balance, low, high, dS);
  for (int64_t k = 0; k <= E; ++k) dS[k] *= params.lambda_balance * params.balance_grad_scale;
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
// pairs of every axis (scaled by coherence_scale[d]) and to val the penalties of the forward
// pairs (router axes at val[0..2], gate axes at val[3..5]).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void coherence_at(const scalar_t* x, const LabelPtr& tgt,
                                             const Layout& L, int64_t b, int64_t p, int maps,
                                             bool l2, const acc_t* coherence_scale, Maps<acc_t> mp,
                                             acc_t& gD, acc_t& gS, double* val) {
  // A rolled loop (the neighbour's softmax is inlined once, not six times), and no
  // index into coherence_scale or val that depends on d: they stay in registers, not local memory.
#pragma unroll 1
  for (int d = 0; d < L.nd; ++d) {
    const int64_t c = axis_coord(L, p, d);
    const acc_t cd =
        d == 0 ? coherence_scale[0] : (d == 1 ? coherence_scale[1] : coherence_scale[2]);
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
                const acc_t* __restrict__ cw, Layout L, LossParams params,
                const double* __restrict__ factors, scalar_t* __restrict__ g,
                double* __restrict__ part) {
  __shared__ double smem[kThreads / 32];
  const int64_t n = L.B * L.P, K = L.K, E = L.E;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool paper = params.surrogate == kSurrogatePaper, ova = params.surrogate == kSurrogateOva,
             l2 = params.coherence == kCoherenceL2,
             benefit = params.gate_target == kGateTargetBenefit;
  const acc_t seg_scale = static_cast<acc_t>(factors[kScaleSeg]);
  const acc_t collab_scale = static_cast<acc_t>(factors[kScaleCollab]);
  const acc_t gate_scale = static_cast<acc_t>(factors[kScaleGate]);
  const acc_t coherence_scale[kMaxSpatial] = {static_cast<acc_t>(factors[kScaleCoherence]),
                                              static_cast<acc_t>(factors[kScaleCoherence + 1]),
                                              static_cast<acc_t>(factors[kScaleCoherence + 2])};
  const double* balance_coef = factors + kBalanceCoef;
  const acc_t gate_mse = static_cast<acc_t>(params.gate_mse);
  const acc_t gate_sparsity = static_cast<acc_t>(params.gate_sparsity);
  const acc_t paper_eps = static_cast<acc_t>(params.paper_eps);
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
        lcol += paper_channel(paper_base<acc_t>(k < E) + paper_slope<acc_t>(k < E) * ck, pk,
                              paper_eps, gk);
        acc += gk * pk;
      } else if (ova) {
        acc_t gk;
        lcol += ova_channel(rk, ck, gk);
      } else {
        lcol -= ck * ((rk - r.mx) - logsum);
        acc += ck;
      }
      bsum += static_cast<acc_t>(balance_coef[k]) * pk;
    }
    sums[kSumCollab] += lcol;

    // gate
    const acc_t h = benefit ? gate_target_pixel<true>(false, c0, c_jhat)
                            : gate_target_pixel<false>(r.arg < E, c0, c_jhat);
    const acc_t a = static_cast<acc_t>(xr[(E + 1) * L.xc]);
    acc_t lg, dg, s, ds;
    gate_pixel(a, h, D, gate_mse, gate_sparsity, lg, dg, s, ds);
    sums[kSumGate] += lg;

    // coherence
    acc_t gD = acc_t(0), gS = acc_t(0);
    if (params.coherence_maps != 0) {
      coherence_at<scalar_t, acc_t>(x, tgt, L, b, p, params.coherence_maps, l2, coherence_scale,
                                    maps_of<scalar_t, acc_t>(r, a), gD, gS, sums + kSumCoh);
    }

    // gradient of the routing and gate logits
    if (pg != nullptr) {
      pg[(K + E + 1) * L.gc] = static_cast<scalar_t>(gate_scale * dg + gS * ds);
      const acc_t common =
          paper ? routing_common<kSurrogatePaper>(collab_scale, acc, bsum, gD, D)
                : (ova ? routing_common<kSurrogateOva>(collab_scale, acc, bsum, gD, D)
                       : routing_common<kSurrogateSoftmax>(collab_scale, acc, bsum, gD, D));
      for (int64_t k = 0; k <= E; ++k) {
        const acc_t rk = static_cast<acc_t>(xr[k * L.xc]);
        const acc_t pk = exp_nonpos(rk - r.mx) * inv;
        acc_t ck = c0;
        if (k < E) {
          const int64_t m = load_label(lab, lbase + k * L.le);
          ck = (m != L.ignore && m == t.raw) ? acc_t(1) : acc_t(0);
        }
        const acc_t expert = k < E ? acc_t(1) : acc_t(0);
        const acc_t bk = static_cast<acc_t>(balance_coef[k]);
        acc_t gk;
        if (paper) {
          const acc_t cf = paper_base<acc_t>(k < E) + paper_slope<acc_t>(k < E) * ck;
          gk = routing_grad<kSurrogatePaper>(pk, common, bk, gD, expert, collab_scale, ck,
                                             cf / (pk + paper_eps));
        } else if (ova) {
          acc_t g_ova;
          ova_channel(rk, ck, g_ova);
          gk = routing_grad<kSurrogateOva>(pk, common, bk, gD, expert, collab_scale, ck, g_ova);
        } else {
          gk = routing_grad<kSurrogateSoftmax>(pk, common, bk, gD, expert, collab_scale, ck,
                                               acc_t(0));
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
                int64_t n_stats, int64_t E, int nd, LossParams params,
                const double* __restrict__ low, const double* __restrict__ high,
                acc_t* __restrict__ terms) {
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
    assemble_terms(sums, stats, n_stats, E, nd, params, low, high, out);
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
  const LossParams& params = call.params;
  const at::Tensor &st = call.stats, &low = call.low, &high = call.high, &cw = call.cw;
  const int64_t E = pb.E, n = pb.B * pb.P;
  const at::ScalarType acc = call.acc;
  GradOut gout;
  if (compute_grad) gout = make_grad_out(logits, pb);
  const Layout L = make_layout(pb, compute_grad ? &gout.flat : nullptr);
  const int64_t blocks = n > 0 ? blocks_for(n) : 0;
  auto dopt = logits.options().dtype(at::kDouble);
  at::Tensor factors = at::empty({kBalanceCoef + E + 1}, dopt);
  at::Tensor part = at::empty({std::max<int64_t>(blocks, 1) * kNumSums}, dopt);
  at::Tensor terms = at::empty({kTermsLen}, logits.options().dtype(acc));
  cudaStream_t stream = DS_CURRENT_STREAM();
  const LabelPtr tl = label_ptr(pb.target), ll = label_ptr(pb.labels);

  DS_LAUNCH(1, 32, stream, loss_prepare)(st.data_ptr<double>(), st.numel(), E, params,
                                         low.data_ptr<double>(), high.data_ptr<double>(),
                                         factors.data_ptr<double>());
  DS_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "loss_fused_cuda", [&] {
        using acc_t = typename AccType<scalar_t>::type;
        if (n > 0) {
          DS_LAUNCH(blocks, kThreads, stream, loss_pixels<scalar_t, acc_t>)(
              pb.x.data_ptr<scalar_t>(), tl, ll, cw.defined() ? cw.data_ptr<acc_t>() : nullptr, L,
              params, factors.data_ptr<double>(),
              compute_grad ? gout.flat.data_ptr<scalar_t>() : nullptr, part.data_ptr<double>());
          DS_LAUNCH_CHECK();
        }
        DS_LAUNCH(1, kThreads, stream, loss_finish<acc_t>)(
            part.data_ptr<double>(), blocks, st.data_ptr<double>(), st.numel(), E, pb.nd, params,
            low.data_ptr<double>(), high.data_ptr<double>(), terms.data_ptr<acc_t>());
        DS_LAUNCH_CHECK();
      });
  at::Tensor grad = compute_grad ? finish_grad(gout) : at::empty({0}, logits.options());
  return {terms, grad};
}

}  // namespace cuda_loss

#ifndef DS_CUDA_EMULATION  // the emulation registers its own ops (tests/cuda_emu)
TORCH_LIBRARY_IMPL(deferredseg, CUDA, m) { m.impl("loss_fused", &cuda_loss::loss_fused_cuda); }
#endif

}  // namespace deferredseg
