// The per-pixel routing rule (SPEC section 4), shared by the CPU and CUDA kernels.
#pragma once

#include "common.h"

namespace deferredseg {

// Strides of the flattened (B, C, P) logits and (B, E, P) expert labels.
struct RouteStrides {
  int64_t xb, xc, xp;
  int64_t lb, le, lp;
};

// Routes pixel (b, p). `thr` is logit(threshold) rounded to acc_t, so "gate" mode
// decides sigmoid(a) > threshold as a > thr without depending on a sigmoid's rounding.
template <typename scalar_t, typename acc_t, typename label_t>
DS_HOST_DEVICE void route_pixel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels,
                                const RouteStrides& st, int64_t b, int64_t p, int64_t P, int64_t K,
                                int64_t E, acc_t thr, bool router_mode, int8_t* assignment,
                                acc_t* defer_prob, int64_t* model_pred, int64_t* final_pred) {
  const scalar_t* px = x + b * st.xb + p * st.xp;
  const int64_t out = b * P + p;
  int64_t pred;
  if (K >= 2) {
    pred = strided_argmax<acc_t>(px, st.xc, K);
  } else {
    pred = static_cast<acc_t>(px[0]) > acc_t(0) ? 1 : 0;
  }
  const scalar_t* pr = px + K * st.xc;
  const int64_t chosen = strided_argmax<acc_t>(pr, st.xc, E);
  bool defer;
  acc_t prob;
  if (router_mode) {
    defer = strided_argmax<acc_t>(pr, st.xc, E + 1) < E;
    acc_t mx = static_cast<acc_t>(pr[0]);
    for (int64_t k = 1; k <= E; ++k) {
      acc_t v = static_cast<acc_t>(pr[k * st.xc]);
      mx = v > mx ? v : mx;
    }
    acc_t experts = 0, total = 0;
    for (int64_t k = 0; k <= E; ++k) {
      acc_t e = ds_exp(static_cast<acc_t>(pr[k * st.xc]) - mx);
      total += e;
      if (k < E) experts += e;
    }
    prob = experts / total;
  } else {
    const acc_t a = static_cast<acc_t>(px[(K + E + 1) * st.xc]);
    defer = a > thr;
    prob = acc_t(1) / (acc_t(1) + ds_exp(-a));
  }
  assignment[out] = defer ? static_cast<int8_t>(chosen) : int8_t(-1);
  defer_prob[out] = prob;
  model_pred[out] = pred;
  if (labels != nullptr) {
    final_pred[out] = defer ? static_cast<int64_t>(labels[b * st.lb + chosen * st.le + p * st.lp]) : pred;
  }
}

}  // namespace deferredseg
