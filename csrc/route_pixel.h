// The per-pixel routing rule (docs/objective.md section 4), shared by the CPU and CUDA kernels.
#pragma once

#include "common.h"

namespace deferredseg {

// Strides of the flattened (B, C, P) logits and (B, E, P) expert labels.
struct RouteStrides {
  int64_t xb, xc, xp;
  int64_t lb, le, lp;
};

// The routing modes, as the op's `mode` string names them.
enum RouteMode : int32_t { kRouteGate = 0, kRouteRouter = 1, kRouteGain = 2 };

// What one route call decides with, the same for every pixel.
template <typename acc_t>
struct RouteRule {
  int64_t K, E;
  // Mode "gate": logit(threshold) rounded to acc_t, so sigmoid(a) > threshold is decided
  // as a > thr without depending on a sigmoid's rounding. Mode "gain": the threshold
  // itself. Mode "router": unused.
  acc_t thr;
  int32_t mode;         // a RouteMode
  bool sigmoid_scores;  // q_k = sigmoid(r_k); else q = softmax(r)
  const acc_t* cost;    // E expert costs, or nullptr (no costs)
};

// q_k, the correctness estimate of option k, from the routing logits `pr` (stride `xc`);
// `mx` and `total` are the softmax's max and sum of exp(r - mx) (unused for sigmoid).
template <typename acc_t, typename scalar_t>
DS_HOST_DEVICE acc_t route_score(const scalar_t* pr, int64_t xc, int64_t k, bool sigmoid_scores,
                                 acc_t mx, acc_t total) {
  const acc_t v = static_cast<acc_t>(pr[k * xc]);
  return sigmoid_scores ? acc_t(1) / (acc_t(1) + ds_exp(-v)) : ds_exp(v - mx) / total;
}

// Routes pixel (b, p). The chosen expert is argmax_{j<E} r_j without costs (the same
// bits on every backend), argmax_{j<E} (q_j - cost_j) with costs (first maximum; a NaN
// wins). The gain g = (q_jhat - cost_jhat) - q_E is computed only where it is used.
template <typename scalar_t, typename acc_t, typename label_t>
DS_HOST_DEVICE void route_pixel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                                const RouteStrides& st, int64_t b, int64_t p, int64_t P,
                                const RouteRule<acc_t>& rule, int8_t* assignment, acc_t* defer_prob,
                                int64_t* model_pred, int64_t* final_pred) {
  const int64_t K = rule.K, E = rule.E;
  const scalar_t* px = x + b * st.xb + p * st.xp;
  const int64_t out = b * P + p;
  int64_t pred;
  if (K >= 2) {
    pred = strided_argmax<acc_t>(px, st.xc, K);
  } else {
    pred = static_cast<acc_t>(px[0]) > acc_t(0) ? 1 : 0;
  }
  const scalar_t* pr = px + K * st.xc;
  const bool need_gain = rule.cost != nullptr || rule.mode == kRouteGain;
  const bool need_softmax = rule.mode == kRouteRouter || (need_gain && !rule.sigmoid_scores);
  // The router softmax: its max, its sum and the experts' share of it (D = experts / total).
  acc_t mx = 0, experts = 0, total = 1;
  if (need_softmax) {
    mx = static_cast<acc_t>(pr[0]);
    for (int64_t k = 1; k <= E; ++k) {
      acc_t v = static_cast<acc_t>(pr[k * st.xc]);
      mx = v > mx ? v : mx;
    }
    total = 0;
    for (int64_t k = 0; k <= E; ++k) {
      acc_t e = ds_exp(static_cast<acc_t>(pr[k * st.xc]) - mx);
      total += e;
      if (k < E) experts += e;
    }
  }
  int64_t chosen;
  acc_t gain = 0;
  if (rule.cost == nullptr) {
    chosen = strided_argmax<acc_t>(pr, st.xc, E);
    if (need_gain) {
      gain = route_score<acc_t>(pr, st.xc, chosen, rule.sigmoid_scores, mx, total) -
             route_score<acc_t>(pr, st.xc, E, rule.sigmoid_scores, mx, total);
    }
  } else {
    acc_t best = route_score<acc_t>(pr, st.xc, 0, rule.sigmoid_scores, mx, total) - rule.cost[0];
    chosen = 0;
    for (int64_t j = 1; j < E; ++j) {
      const acc_t v =
          route_score<acc_t>(pr, st.xc, j, rule.sigmoid_scores, mx, total) - rule.cost[j];
      if (argmax_takes(v, best)) {
        best = v;
        chosen = j;
      }
    }
    gain = best - route_score<acc_t>(pr, st.xc, E, rule.sigmoid_scores, mx, total);
  }
  bool defer;
  acc_t prob;
  if (rule.mode == kRouteRouter) {
    // Without costs: the router's argmax over all E + 1 options is an expert.
    // With costs: g >= 0 (ties go to the expert, as argmax's ties do).
    defer = rule.cost == nullptr ? strided_argmax<acc_t>(pr, st.xc, E + 1) < E : gain >= acc_t(0);
    prob = experts / total;
  } else if (rule.mode == kRouteGain) {
    defer = gain > rule.thr;
    prob = gain;
  } else {
    const acc_t a = static_cast<acc_t>(px[(K + E + 1) * st.xc]);
    defer = a > rule.thr;
    prob = acc_t(1) / (acc_t(1) + ds_exp(-a));
  }
  assignment[out] = defer ? static_cast<int8_t>(chosen) : int8_t(-1);
  defer_prob[out] = prob;
  model_pred[out] = pred;
  if (labels != nullptr) {
    final_pred[out] =
        defer ? static_cast<int64_t>(labels[b * st.lb + chosen * st.le + p * st.lp]) : pred;
  }
}

}  // namespace deferredseg
