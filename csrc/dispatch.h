// Dtypes of the kernels: dispatch for label tensors (uint8, int32, int64), in the style of
// AT_DISPATCH, and the label and accumulation dtypes that the loss and route ops share.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#define DS_DISPATCH_LABEL_TYPES(TYPE, NAME, ...)                                        \
  [&] {                                                                                 \
    switch (TYPE) {                                                                     \
      case at::kByte: {                                                                 \
        using label_t = uint8_t;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::kInt: {                                                                  \
        using label_t = int32_t;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::kLong: {                                                                 \
        using label_t = int64_t;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      default:                                                                          \
        TORCH_CHECK(false, NAME, ": labels must be uint8, int32 or int64, got ", TYPE); \
    }                                                                                   \
  }()

// acc_t: the accumulation type of a logits dtype (double for double, float otherwise).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Whether a tensor of this dtype holds labels (target, expert labels): uint8, int32 or int64,
// the dtypes DS_DISPATCH_LABEL_TYPES handles.
inline bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kInt || t == at::kLong;
}

// The accumulation dtype of a logits dtype, AccType's as a ScalarType: float64 for float64
// logits, float32 for the others.
inline at::ScalarType acc_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}
