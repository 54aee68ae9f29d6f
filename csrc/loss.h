// Shared host-side code of the fused loss ops `deferredseg::loss_stats` and
// `deferredseg::loss_fused` (docs/objective.md section 3; contract in
// deferredseg_kernels/ops/fused.py), used by the CPU and the CUDA kernels alike: the
// prologue of each op (prepare_stats, prepare_fused: argument checks, the flattened
// (B, C, P) views the kernels read, the decoding of fparams / iparams and the vectors of
// the options), the strides and label pointers the kernels are given, and the gradient
// buffer.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "dispatch.h"  // is_label_dtype, acc_dtype
#include "loss_pixel.h"

namespace deferredseg {

// The tensors a loss kernel reads, with the spatial dims flattened: `x` is the
// packed logits as (B, C, P), `target` (B, P), `labels` the expert labels
// (B, E, P); each a view when the strides allow it, one contiguous copy otherwise.
// Pixel p has the neighbour p +/- st[d] along spatial axis d (st[d] = prod S[d+1:]).
struct LossProblem {
  at::Tensor x, target, labels;
  int64_t B = 0, C = 0, P = 0, K = 0, E = 0, num_labels = 0, ignore_index = 0;
  int nd = 0;                                 // spatial dims (1 to 3)
  int64_t S[loss::kMaxSpatial] = {1, 1, 1};   // spatial sizes
  int64_t st[loss::kMaxSpatial] = {0, 0, 0};  // flattened strides of the spatial axes
};

inline LossProblem prepare_loss(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                const at::Tensor& expert_labels, int64_t num_classes,
                                int64_t num_experts, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() >= 3 && logits.dim() <= 5, op,
              ": logits must have shape (B, C, *S) with 1 to 3 spatial dims, got ", logits.sizes());
  TORCH_CHECK(num_classes >= 1 && num_experts >= 1 && num_experts <= 127, op,
              ": need num_classes >= 1 and 1 <= num_experts <= 127, got ", num_classes, " and ",
              num_experts);
  TORCH_CHECK(logits.size(1) == num_classes + num_experts + 2, op, ": logits must have ",
              num_classes + num_experts + 2, " channels, got ", logits.size(1));
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": logits must be float32, float64, float16 or bfloat16, got ", dt);
  LossProblem pb;
  pb.K = num_classes;
  pb.E = num_experts;
  pb.num_labels = num_classes >= 2 ? num_classes : 2;
  pb.ignore_index = ignore_index;
  pb.B = logits.size(0);
  pb.C = logits.size(1);
  pb.nd = static_cast<int>(logits.dim()) - 2;
  std::vector<int64_t> spatial;
  for (int d = 0; d < pb.nd; ++d) {
    pb.S[d] = logits.size(d + 2);
    spatial.push_back(pb.S[d]);
  }
  int64_t stride = 1;
  for (int d = pb.nd - 1; d >= 0; --d) {
    pb.st[d] = stride;
    stride *= pb.S[d];
  }
  pb.P = stride;

  TORCH_CHECK(is_label_dtype(target.scalar_type()), op,
              ": target must be uint8, int32 or int64, got ", target.scalar_type());
  TORCH_CHECK(is_label_dtype(expert_labels.scalar_type()), op,
              ": expert_labels must be uint8, int32 or int64, got ", expert_labels.scalar_type());
  TORCH_CHECK(target.device() == logits.device() && expert_labels.device() == logits.device(), op,
              ": target and expert_labels must be on the device of logits (", logits.device(),
              "), got ", target.device(), " and ", expert_labels.device());
  std::vector<int64_t> want_t{pb.B};
  want_t.insert(want_t.end(), spatial.begin(), spatial.end());
  std::vector<int64_t> want_t1{pb.B, 1};
  want_t1.insert(want_t1.end(), spatial.begin(), spatial.end());
  std::vector<int64_t> want_l{pb.B, pb.E};
  want_l.insert(want_l.end(), spatial.begin(), spatial.end());
  at::Tensor t = target;
  if (t.sizes() == at::IntArrayRef(want_t1)) t = t.squeeze(1);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want_t), op, ": target must have shape ",
              at::IntArrayRef(want_t), " or ", at::IntArrayRef(want_t1), ", got ", target.sizes());
  TORCH_CHECK(expert_labels.sizes() == at::IntArrayRef(want_l), op,
              ": expert_labels must have shape ", at::IntArrayRef(want_l), ", got ",
              expert_labels.sizes());

  pb.x = logits.flatten(2);  // a view whenever the spatial strides can be merged
  pb.target = t.reshape({pb.B, pb.P});
  pb.labels = expert_labels.reshape({pb.B, pb.E, pb.P});
  return pb;
}

// Decodes fparams / iparams by the indices of contract.h (deferredseg_kernels/contract.py).
inline loss::LossParams parse_loss_params(const char* op, c10::ArrayRef<double> fparams,
                                          c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(fparams.size() == contract::kNumFParams, op, ": fparams must have ",
              contract::kNumFParams, " values, got ", fparams.size());
  TORCH_CHECK(
      iparams.size() == contract::kNumIParams || iparams.size() == contract::kNumIParams + 1, op,
      ": iparams must have ", contract::kNumIParams, " or ", contract::kNumIParams + 1,
      " values, got ", iparams.size());
  const int bad = contract::invalid_iparam(iparams.data());
  TORCH_CHECK(bad < 0, op, ": iparams[", bad, "] holds an unknown ", contract::iparam_name(bad),
              " code ", bad < 0 ? 0 : iparams[bad]);
  return contract::decode(fparams.data(), iparams.data(), static_cast<int64_t>(iparams.size()));
}

// Checks the stats vector handed to loss_fused: float64, E + 7 values (E + 8 under sync_balance).
inline void check_stats(const char* op, const at::Tensor& stats, const at::Tensor& logits,
                        int64_t E) {
  TORCH_CHECK(stats.dim() == 1 &&
                  (stats.numel() == loss::stats_len(E) || stats.numel() == loss::stats_len(E) + 1),
              op, ": stats must be a vector of ", loss::stats_len(E), " (or ",
              loss::stats_len(E) + 1, ") values, got shape ", stats.sizes());
  TORCH_CHECK(stats.device() == logits.device(), op, ": stats must be on ", logits.device(),
              ", got ", stats.device());
}

// balance_low / balance_high as E + 1 float64 values on the logits' device (zeros when absent:
// only "band" reads them, and the driver always passes them for "band").
inline at::Tensor band_vector(const char* op, const char* name, const c10::optional<at::Tensor>& v,
                              const at::Tensor& logits, int64_t E, bool required) {
  auto opts = logits.options().dtype(at::kDouble);
  if (!v.has_value()) {
    TORCH_CHECK(!required, op, ": ", name, " is required with balance='band'");
    return at::zeros({E + 1}, opts);
  }
  TORCH_CHECK(v->dim() == 1 && v->numel() == E + 1, op, ": ", name, " must have ", E + 1,
              " values, got shape ", v->sizes());
  return v->to(opts).contiguous();
}

// class_weight as K' values of `acc` dtype on the logits' device, or an undefined tensor.
inline at::Tensor class_weight_vector(const char* op, const c10::optional<at::Tensor>& w,
                                      const at::Tensor& logits, int64_t num_labels,
                                      at::ScalarType acc) {
  if (!w.has_value()) return at::Tensor();
  TORCH_CHECK(w->dim() == 1 && w->numel() == num_labels, op, ": class_weight must have ",
              num_labels, " values, got shape ", w->sizes());
  return w->to(logits.options().dtype(acc)).contiguous();
}

// The gradient buffer: its own memory, laid out as empty_like(logits) lays it out
// (grad_buffer of ops/fused.py: the logits' strides when they are dense), plus the
// (B, C, P) tensor a kernel writes.
// When the spatial dims of the buffer cannot be flattened as a view, the kernel
// writes a contiguous scratch tensor that finish_grad copies back.
struct GradOut {
  at::Tensor grad;  // returned
  at::Tensor flat;  // (B, C, P) written by the kernel
  bool copy_back = false;
};

// `buffer`: the gradient tensor to write (the CPU kernel's cached buffer), or
// undefined for a new one like `logits`.
inline GradOut make_grad_out(const at::Tensor& logits, const LossProblem& pb,
                             at::Tensor buffer = at::Tensor()) {
  GradOut g;
  g.grad = buffer.defined() ? buffer : at::empty_like(logits);  // preserve_format
  at::Tensor f = g.grad.flatten(2);
  if (f.is_alias_of(g.grad)) {
    g.flat = f;
  } else {
    g.flat = at::empty({pb.B, pb.C, pb.P}, logits.options());
    g.copy_back = true;
  }
  return g;
}

inline at::Tensor finish_grad(GradOut& g) {
  if (g.copy_back) g.grad.copy_(g.flat.view(g.grad.sizes()));
  return g.grad;
}

// A label tensor's data and its dtype as a code (0 uint8, 1 int32, 2 int64): the kernels
// are templated on the logits dtype only and switch on the code where they read labels.
struct LabelPtr {
  const void* p = nullptr;
  int kind = 2;
};

inline LabelPtr label_ptr(const at::Tensor& t) {
  TORCH_CHECK(is_label_dtype(t.scalar_type()), "labels must be uint8, int32 or int64, got ",
              t.scalar_type());
  LabelPtr l;
  l.p = t.data_ptr();
  l.kind = t.scalar_type() == at::kByte ? 0 : (t.scalar_type() == at::kInt ? 1 : 2);
  return l;
}

// The element strides of the (B, C, P) views of a LossProblem and of the gradient a kernel
// writes, with the label range: what a kernel needs besides its pointers and the shape.
struct LossStrides {
  int64_t xb = 0, xc = 0, xp = 0;  // logits (B, C, P)
  int64_t tb = 0, tp = 0;          // target (B, P)
  int64_t lb = 0, le = 0, lp = 0;  // expert labels (B, E, P)
  int64_t gb = 0, gc = 0, gp = 0;  // gradient (B, C, P); 0 without one
  int64_t ignore = 0, nlab = 0;    // ignore_index; labels are in [0, nlab)
};

// `grad_flat`: the (B, C, P) gradient the kernel writes (GradOut::flat), or null.
inline LossStrides loss_strides(const LossProblem& pb, const at::Tensor* grad_flat) {
  LossStrides s;
  s.xb = pb.x.stride(0);
  s.xc = pb.x.stride(1);
  s.xp = pb.x.stride(2);
  s.tb = pb.target.stride(0);
  s.tp = pb.target.stride(1);
  s.lb = pb.labels.stride(0);
  s.le = pb.labels.stride(1);
  s.lp = pb.labels.stride(2);
  if (grad_flat != nullptr) {
    s.gb = grad_flat->stride(0);
    s.gc = grad_flat->stride(1);
    s.gp = grad_flat->stride(2);
  }
  s.ignore = pb.ignore_index;
  s.nlab = pb.num_labels;
  return s;
}

// The arguments of one loss_stats or loss_fused call, checked and unpacked by the
// prologue both devices share (prepare_stats / prepare_fused). The device check (and
// guard) stays with each kernel.
struct LossCall {
  LossProblem pb;
  at::ScalarType acc = at::kFloat;  // the accumulation dtype
  at::Tensor cw;                    // class_weight_vector: K' values of acc, or undefined
  // loss_fused only:
  loss::LossParams params{};  // fparams / iparams, decoded
  at::Tensor stats;           // the stats vector as contiguous float64
  at::Tensor low, high;       // band_vector of balance_low / balance_high
};

inline LossCall prepare_stats(const char* op, const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& expert_labels,
                              const c10::optional<at::Tensor>& class_weight, int64_t num_classes,
                              int64_t num_experts, int64_t ignore_index) {
  LossCall c;
  c.pb = prepare_loss(op, logits, target, expert_labels, num_classes, num_experts, ignore_index);
  c.acc = acc_dtype(logits.scalar_type());
  c.cw = class_weight_vector(op, class_weight, logits, c.pb.num_labels, c.acc);
  return c;
}

// `check_experts_supported`: whether the kernel can check the expert labels in this pass
// (iparams[contract::kICheckExperts]); the CUDA kernel cannot (its loss_stats does).
inline LossCall prepare_fused(const char* op, const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& expert_labels,
                              const c10::optional<at::Tensor>& class_weight,
                              const at::Tensor& stats, const c10::optional<at::Tensor>& balance_low,
                              const c10::optional<at::Tensor>& balance_high, int64_t num_classes,
                              int64_t num_experts, int64_t ignore_index,
                              c10::ArrayRef<double> fparams, c10::ArrayRef<int64_t> iparams,
                              bool check_experts_supported) {
  LossCall c;
  c.pb = prepare_loss(op, logits, target, expert_labels, num_classes, num_experts, ignore_index);
  c.params = parse_loss_params(op, fparams, iparams);
  TORCH_CHECK(check_experts_supported || !c.params.check_experts, op, ": iparams[",
              contract::kICheckExperts,
              "] (check expert labels in the loss pass) is a CPU-kernel "
              "option; on CUDA the labels are checked by loss_stats");
  check_stats(op, stats, logits, c.pb.E);
  c.acc = acc_dtype(logits.scalar_type());
  c.stats = stats.to(at::kDouble).contiguous();
  const bool band = c.params.balance == loss::kBalanceBand;
  c.low = band_vector(op, "balance_low", balance_low, logits, c.pb.E, band);
  c.high = band_vector(op, "balance_high", balance_high, logits, c.pb.E, band);
  c.cw = class_weight_vector(op, class_weight, logits, c.pb.num_labels, c.acc);
  return c;
}

}  // namespace deferredseg
