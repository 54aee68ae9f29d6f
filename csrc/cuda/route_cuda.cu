// CUDA kernel of `deferredseg::route` (docs/objective.md section 4): one thread a pixel,
// grid-stride, int64 indexing, on the current stream.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "../dispatch.h"
#include "../route.h"
#include "../route_pixel.h"
#include "cuda_compat.h"

namespace deferredseg {
namespace {

constexpr int kRouteThreads = 256;
#ifdef DS_CUDA_EMU_MAX_BLOCKS
constexpr int64_t kRouteMaxBlocks = DS_CUDA_EMU_MAX_BLOCKS;  // see loss_device.h
#else
constexpr int64_t kRouteMaxBlocks = 65535LL * 32;
#endif

template <typename scalar_t, typename acc_t, typename label_t>
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                 RouteStrides st, int64_t B, int64_t P, RouteRule<acc_t> rule,
                 int8_t* __restrict__ assignment, acc_t* __restrict__ defer_prob,
                 int64_t* __restrict__ model_pred, int64_t* __restrict__ final_pred) {
  const int64_t n = B * P;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const int64_t b = i / P;
    route_pixel<scalar_t, acc_t, label_t>(x, labels, st, b, i - b * P, P, rule, assignment,
                                          defer_prob, model_pred, final_pred);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& logits, int64_t num_classes, int64_t num_experts, double decision_threshold,
    c10::string_view mode, const c10::optional<at::Tensor>& expert_labels,
    const c10::optional<at::Tensor>& expert_cost, c10::string_view scores) {
  TORCH_CHECK(DS_ON_DEVICE(logits),
              "deferredseg::route (CUDA kernel): logits must be a CUDA tensor");
  DS_DEVICE_GUARD(logits);
  RouteProblem pb =
      prepare_route(logits, num_classes, num_experts, expert_labels, mode, expert_cost, scores);
  const int64_t n = pb.B * pb.P;
  if (n == 0) return route_outputs(pb);
  const int64_t blocks =
      std::min<int64_t>((n + kRouteThreads - 1) / kRouteThreads, kRouteMaxBlocks);
  cudaStream_t stream = DS_CURRENT_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "route_cuda", [&] {
        using acc_t = typename AccType<scalar_t>::type;
        DS_DISPATCH_LABEL_TYPES(pb.label_type(), "deferredseg::route", [&] {
          const RouteStrides st = pb.strides();
          const label_t* labels = pb.labels_ptr<label_t>();
          DS_LAUNCH(blocks, kRouteThreads, stream, route_kernel<scalar_t, acc_t, label_t>)(
              pb.x.data_ptr<scalar_t>(), labels, st, pb.B, pb.P, pb.rule<acc_t>(decision_threshold),
              pb.assignment.data_ptr<int8_t>(), pb.defer_prob.data_ptr<acc_t>(),
              pb.model_pred.data_ptr<int64_t>(), pb.final_pred.data_ptr<int64_t>());
          DS_LAUNCH_CHECK();
        });
      });
  return route_outputs(pb);
}

}  // namespace

#ifndef DS_CUDA_EMULATION  // the emulation registers its own ops (tests/cuda_emu)
TORCH_LIBRARY_IMPL(deferredseg, CUDA, m) { m.impl("route", &route_cuda); }
#endif

}  // namespace deferredseg
