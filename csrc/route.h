// Shared host-side code of the `deferredseg::route` op (docs/objective.md section 4).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <vector>

#include "dispatch.h"  // is_label_dtype, acc_dtype
#include "route_pixel.h"

namespace deferredseg {

// The tensors a route kernel reads and writes, with the spatial dims flattened.
// `x` is the packed logits viewed as (B, C, P) (a view when the strides allow it,
// one contiguous copy otherwise); `labels` the expert labels as (B, E, P).
struct RouteProblem {
  at::Tensor x;
  at::Tensor labels;  // undefined when no expert labels were given
  at::Tensor cost;    // E expert costs (accumulation dtype, logits' device), or undefined
  int64_t B = 0, P = 0, K = 0, E = 0;
  int32_t mode = kRouteGate;
  bool sigmoid_scores = false;
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
  // The per-call rule of route_pixel; `decision_threshold` as the op receives it.
  template <typename acc_t>
  RouteRule<acc_t> rule(double decision_threshold) const {
    return RouteRule<acc_t>{K,
                            E,
                            static_cast<acc_t>(decision_threshold),
                            mode,
                            sigmoid_scores,
                            cost.defined() ? cost.data_ptr<acc_t>() : nullptr};
  }
  // The dtype to dispatch the expert labels on (int64, unused, when none were given).
  at::ScalarType label_type() const { return labels.defined() ? labels.scalar_type() : at::kLong; }
  // The expert labels' data, or nullptr when none were given.
  template <typename label_t>
  const label_t* labels_ptr() const {
    return labels.defined() ? labels.data_ptr<label_t>() : nullptr;
  }
};

inline int32_t parse_route_mode(c10::string_view mode) {
  if (mode == "gate") return kRouteGate;
  if (mode == "router") return kRouteRouter;
  if (mode == "gain") return kRouteGain;
  TORCH_CHECK(false, "deferredseg::route: mode must be one of 'gate', 'router', 'gain', got '",
              mode, "'");
  return kRouteGate;
}

inline bool parse_route_scores(c10::string_view scores) {
  TORCH_CHECK(scores == "softmax" || scores == "sigmoid",
              "deferredseg::route: scores must be 'softmax' or 'sigmoid', got '", scores, "'");
  return scores == "sigmoid";
}

// `expert_cost` must already be finite and >= 0 (the Python API checks the values);
// here it is checked for shape and converted to the accumulation dtype on the logits' device.
inline RouteProblem prepare_route(const at::Tensor& logits, int64_t num_classes,
                                  int64_t num_experts,
                                  const c10::optional<at::Tensor>& expert_labels,
                                  c10::string_view mode,
                                  const c10::optional<at::Tensor>& expert_cost,
                                  c10::string_view scores) {
  TORCH_CHECK(
      logits.dim() >= 3 && logits.dim() <= 5,
      "deferredseg::route: logits must have shape (B, C, *S) with 1 to 3 spatial dims, got ",
      logits.sizes());
  TORCH_CHECK(num_classes >= 1 && num_experts >= 1 && num_experts <= 127,
              "deferredseg::route: need num_classes >= 1 and 1 <= num_experts <= 127, got ",
              num_classes, " and ", num_experts);
  TORCH_CHECK(logits.size(1) == num_classes + num_experts + 2,
              "deferredseg::route: logits must have ", num_classes + num_experts + 2,
              " channels, got ", logits.size(1));
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
                "deferredseg::route: expert_labels must be uint8, int32 or int64, got ",
                lab.scalar_type());
    TORCH_CHECK(lab.device() == logits.device(), "deferredseg::route: expert_labels on ",
                lab.device(), " but logits on ", logits.device());
    std::vector<int64_t> want{pb.B, pb.E};
    for (int64_t d = 2; d < logits.dim(); ++d) want.push_back(logits.size(d));
    TORCH_CHECK(lab.sizes() == at::IntArrayRef(want),
                "deferredseg::route: expert_labels must have shape ", at::IntArrayRef(want),
                ", got ", lab.sizes());
    pb.labels = lab.flatten(2);
  }
  const at::ScalarType acc = acc_dtype(logits.scalar_type());
  pb.mode = parse_route_mode(mode);
  pb.sigmoid_scores = parse_route_scores(scores);
  if (expert_cost.has_value()) {
    const at::Tensor& c = *expert_cost;
    TORCH_CHECK(c.dim() == 1 && c.numel() == pb.E,
                "deferredseg::route: expert_cost must have shape (", pb.E, "), got ", c.sizes());
    TORCH_CHECK(at::isFloatingType(c.scalar_type()),
                "deferredseg::route: expert_cost must be floating point, got ", c.scalar_type());
    pb.cost = c.to(logits.device(), acc).contiguous();
  }
  pb.assignment = at::empty(out_shape, logits.options().dtype(at::kChar));
  pb.defer_prob = at::empty(out_shape, logits.options().dtype(acc));
  pb.model_pred = at::empty(out_shape, logits.options().dtype(at::kLong));
  pb.final_pred = expert_labels.has_value()
                      ? at::empty(out_shape, logits.options().dtype(at::kLong))
                      : at::empty({0}, logits.options().dtype(at::kLong));
  return pb;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_outputs(
    const RouteProblem& pb) {
  return {pb.assignment, pb.defer_prob, pb.model_pred, pb.final_pred};
}

}  // namespace deferredseg
