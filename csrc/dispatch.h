// Dtype dispatch for label tensors (uint8, int32, int64), in the style of AT_DISPATCH.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#define DS_DISPATCH_LABEL_TYPES(TYPE, NAME, ...)                                    \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      case at::kByte: {                                                              \
        using label_t = uint8_t;                                                     \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case at::kInt: {                                                               \
        using label_t = int32_t;                                                     \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case at::kLong: {                                                              \
        using label_t = int64_t;                                                     \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      default:                                                                       \
        TORCH_CHECK(false, NAME, ": labels must be uint8, int32 or int64, got ", TYPE); \
    }                                                                                \
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
