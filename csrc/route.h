// Shared host-side code of the `deferredseg::route` op (SPEC section 4).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "route_pixel.h"

namespace deferredseg {

// The tensors a route kernel reads and writes, with the spatial dims flattened.
// `x` is the packed logits viewed as (B, C, P) (a view when the strides allow it,
// one contiguous copy otherwise); `labels` the expert labels as (B, E, P).
struct RouteProblem {
  at::Tensor x;
  at::Tensor labels;  // undefined when no expert labels were given
  int64_t B = 0, P = 0, K = 0, E = 0;
  at::Tensor assignment, defer_prob, model_pred, final_pred;

  RouteStrides strides() const {
    RouteStrides st{x.stride(0), x.stride(1), x.stride(2), 0, 0, 0};
    if (labels.defined()) {
      st.lb = labels.stride(0);
      st.le = labels.stride(1);
      st.lp = labels.stride(2);
    }
    return st;
  }
  // The expert labels' data, or nullptr when none were given.
  template <typename label_t>
  const label_t* labels_ptr() const {
    return labels.defined() ? labels.data_ptr<label_t>() : nullptr;
  }
};

inline bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kInt || t == at::kLong;
}

inline RouteProblem prepare_route(const at::Tensor& logits, int64_t num_classes, int64_t num_experts,
                                  const c10::optional<at::Tensor>& expert_labels) {
  TORCH_CHECK(logits.dim() >= 3 && logits.dim() <= 5,
              "deferredseg::route: logits must have shape (B, C, *S) with 1 to 3 spatial dims, got ",
              logits.sizes());
  TORCH_CHECK(num_classes >= 1 && num_experts >= 1 && num_experts <= 127,
              "deferredseg::route: need num_classes >= 1 and 1 <= num_experts <= 127, got ",
              num_classes, " and ", num_experts);
  TORCH_CHECK(logits.size(1) == num_classes + num_experts + 2, "deferredseg::route: logits must have ",
              num_classes + num_experts + 2, " channels, got ", logits.size(1));
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "deferredseg::route: logits must be floating point, got ", logits.scalar_type());
  RouteProblem pb;
  pb.K = num_classes;
  pb.E = num_experts;
  pb.B = logits.size(0);
  pb.x = logits.flatten(2);  // a view whenever the spatial strides can be merged
  pb.P = pb.x.size(2);
  std::vector<int64_t> out_shape{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) out_shape.push_back(logits.size(d));
  if (expert_labels.has_value()) {
    const at::Tensor& lab = *expert_labels;
    TORCH_CHECK(is_label_dtype(lab.scalar_type()),
                "deferredseg::route: expert_labels must be uint8, int32 or int64, got ", lab.scalar_type());
    TORCH_CHECK(lab.device() == logits.device(), "deferredseg::route: expert_labels on ", lab.device(),
                " but logits on ", logits.device());
    std::vector<int64_t> want{pb.B, pb.E};
    for (int64_t d = 2; d < logits.dim(); ++d) want.push_back(logits.size(d));
    TORCH_CHECK(lab.sizes() == at::IntArrayRef(want), "deferredseg::route: expert_labels must have shape ",
                at::IntArrayRef(want), ", got ", lab.sizes());
    pb.labels = lab.flatten(2);
  }
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  pb.assignment = at::empty(out_shape, logits.options().dtype(at::kChar));
  pb.defer_prob = at::empty(out_shape, logits.options().dtype(acc));
  pb.model_pred = at::empty(out_shape, logits.options().dtype(at::kLong));
  pb.final_pred = expert_labels.has_value() ? at::empty(out_shape, logits.options().dtype(at::kLong))
                                            : at::empty({0}, logits.options().dtype(at::kLong));
  return pb;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_outputs(const RouteProblem& pb) {
  return {pb.assignment, pb.defer_prob, pb.model_pred, pb.final_pred};
}

}  // namespace deferredseg
