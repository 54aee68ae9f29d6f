// The schemas of the `deferredseg` ops, in one place: csrc/deferredseg.cpp defines the
// ops with them, and the test build of the CUDA kernels on the CPU emulation
// (tests/cuda_emu) defines its copies of the ops with the same ones.
#pragma once

namespace deferredseg {

// docs/objective.md section 4. decision_threshold: logit(threshold) in modes "gate" and
// "router" (unused there), the threshold itself in mode "gain"; mode: "gate", "router" or
// "gain"; expert_cost: None or the E expert costs (1-D, converted to the accumulation dtype
// on the logits' device); scores: "softmax" or "sigmoid". final is empty (shape (0,)) when
// expert_labels is None.
constexpr const char* kRouteSchema =
    "route(Tensor logits, int num_classes, int num_experts, float decision_threshold, str mode, "
    "Tensor? expert_labels, Tensor? expert_cost, str scores) -> (Tensor assignment, Tensor "
    "defer_prob, "
    "Tensor model_pred, Tensor final)";

// docs/objective.md section 3, fused. The contract of both ops (layout of `stats`, `fparams`,
// `iparams`, `terms`) is documented in deferredseg_kernels/ops/fused.py.
constexpr const char* kLossStatsSchema =
    "loss_stats(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
    "int num_classes, int num_experts, int ignore_index, bool check_expert_labels) -> Tensor";
constexpr const char* kLossFusedSchema =
    "loss_fused(Tensor logits, Tensor target, Tensor expert_labels, Tensor? class_weight, "
    "Tensor stats, Tensor? balance_low, Tensor? balance_high, int num_classes, int num_experts, "
    "int ignore_index, float[] fparams, int[] iparams, bool compute_grad) -> (Tensor terms, Tensor "
    "grad)";

// Frees the CPU loss kernel's cached gradient buffer (csrc/cpu/grad_cache.cpp); returns the
// bytes released. Defined with its kernel, for every device: it touches no tensor argument.
constexpr const char* kEmptyCpuCacheSchema = "empty_cpu_cache() -> int";

}  // namespace deferredseg
