// Helpers shared by the CPU and CUDA kernels of deferredseg.
//
// The per-pixel decisions (argmax with PyTorch's NaN and tie rules) live here once,
// as host/device inline functions, so the CPU and CUDA kernels cannot drift apart.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DS_HOST_DEVICE inline
#endif

namespace deferredseg {

// exp in the accumulation type, without silently widening float to double on the host.
DS_HOST_DEVICE float ds_exp(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
DS_HOST_DEVICE double ds_exp(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// True when `v` should replace `best` in an argmax scan that visits channels in
// increasing order. Matches torch.argmax: the first maximum wins ties, and a NaN
// counts as larger than every number (the first NaN wins).
template <typename T>
DS_HOST_DEVICE bool argmax_takes(T v, T best) {
  // Once `best` is NaN nothing replaces it; otherwise a NaN or a strictly larger value does.
  return !(best != best) && ((v != v) || v > best);
}

// Argmax over `n` values read at base[0], base[stride], ... converted to `acc_t`.
template <typename acc_t, typename scalar_t>
DS_HOST_DEVICE int64_t strided_argmax(const scalar_t* base, int64_t stride, int64_t n) {
  acc_t best = static_cast<acc_t>(base[0]);
  int64_t idx = 0;
  for (int64_t k = 1; k < n; ++k) {
    acc_t v = static_cast<acc_t>(base[k * stride]);
    if (argmax_takes(v, best)) {
      best = v;
      idx = k;
    }
  }
  return idx;
}

}  // namespace deferredseg
