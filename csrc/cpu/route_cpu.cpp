// CPU kernel of `deferredseg::route` (docs/objective.md section 4), parallel over pixels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../route.h"
#include "../route_pixel.h"

namespace deferredseg {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& logits, int64_t num_classes, int64_t num_experts, double decision_threshold,
    c10::string_view mode, const c10::optional<at::Tensor>& expert_labels,
    const c10::optional<at::Tensor>& expert_cost, c10::string_view scores) {
  TORCH_CHECK(logits.device().is_cpu(),
              "deferredseg::route (CPU kernel): logits must be on the CPU");
  RouteProblem pb =
      prepare_route(logits, num_classes, num_experts, expert_labels, mode, expert_cost, scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    DS_DISPATCH_LABEL_TYPES(pb.label_type(), "deferredseg::route", [&] {
      const RouteStrides st = pb.strides();
      const label_t* labels = pb.labels_ptr<label_t>();
      const scalar_t* x = pb.x.data_ptr<scalar_t>();
      int8_t* assignment = pb.assignment.data_ptr<int8_t>();
      acc_t* defer_prob = pb.defer_prob.data_ptr<acc_t>();
      int64_t* model_pred = pb.model_pred.data_ptr<int64_t>();
      int64_t* final_pred = pb.final_pred.data_ptr<int64_t>();
      const RouteRule<acc_t> rule = pb.rule<acc_t>(decision_threshold);
      const int64_t P = pb.P;
      at::parallel_for(0, pb.B * P, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / P;
          route_pixel<scalar_t, acc_t, label_t>(x, labels, st, b, i - b * P, P, rule, assignment,
                                                defer_prob, model_pred, final_pred);
        }
      });
    });
  });
  return route_outputs(pb);
}

}  // namespace

TORCH_LIBRARY_IMPL(deferredseg, CPU, m) { m.impl("route", &route_cpu); }

}  // namespace deferredseg
