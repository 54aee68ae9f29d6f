// How the CPU loss kernels are compiled and which compiled variant runs: the
// instruction sets (baseline, x86-64-v3, x86-64-v4) and the unrolled paths for few
// experts, the vectorisation and inlining macros, and the floating-point setting the
// kernel code is built with. Part of loss_cpu.cpp's translation unit (only it includes
// this file, and the headers next to it), so the per-ISA `target` attributes apply.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DS_HAVE_STREAM 1
#else
#define DS_HAVE_STREAM 0
#endif

// The kernel code is built with -fno-trapping-math (GCC): it never reads the
// floating-point exception flags, and without it GCC does not if-convert a select
// whose operand it has sunk into a branch, so the loops over pixels would stay
// scalar. The option changes no value (it is not -ffast-math).
#if defined(__GNUC__) && !defined(__clang__)
#define DS_FP_REGION_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define DS_FP_REGION_END _Pragma("GCC pop_options")
#else
#define DS_FP_REGION_BEGIN
#define DS_FP_REGION_END
#endif

// The per-pixel math, built under that setting (the kernels inline it into their loops;
// included here, before anything else of the kernels includes it).
DS_FP_REGION_BEGIN
#include "../loss_pixel.h"
DS_FP_REGION_END

#define DS_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
#define DS_SIMD DS_PRAGMA(omp simd)
#define DS_SIMD_SUM(...) DS_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define DS_SIMD DS_PRAGMA(GCC ivdep)
#define DS_SIMD_SUM(...)
#endif

#if defined(__GNUC__)
#define DS_INLINE inline __attribute__((always_inline))
#else
#define DS_INLINE inline
#endif

// Per-ISA variants (x86-64 Linux with GCC >= 12; elsewhere, or when the build defines
// DS_NO_ISA_VARIANTS (setup.py: DS_CPU_ISA_VARIANTS=0), only the baseline).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12 && !defined(DS_NO_ISA_VARIANTS)
#define DS_X86_VARIANTS 1
#define DS_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define DS_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define DS_X86_VARIANTS 0
#endif

namespace deferredseg {
namespace cpu_loss {

enum Isa { kIsaBase = 0, kIsaV3 = 1, kIsaV4 = 2 };

// The instruction set the kernels use: the best the CPU has, capped by DEFERREDSEG_CPU_ISA.
inline int cpu_isa() {
  static const int isa = [] {
    int best = kIsaBase;
#if DS_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      best = kIsaV4;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      best = kIsaV3;
    }
#endif
    const char* env = std::getenv("DEFERREDSEG_CPU_ISA");
    if (env != nullptr) {
      const std::string v(env);
      const int cap = v == "base" ? kIsaBase : v == "v3" ? kIsaV3 : kIsaV4;
      best = std::min(best, cap);
    }
    return best;
  }();
  return isa;
}

// Experts up to this many take the unrolled paths below (one loop over the pixels of a
// tile instead of O(E) loops); DEFERREDSEG_CPU_GENERIC=1 (read once) sends every E
// to the generic path, so that the tests can check both.
constexpr int64_t kFastMaxExperts = 4;
inline bool cpu_fast_paths() {
  static const bool fast = [] {
    const char* env = std::getenv("DEFERREDSEG_CPU_GENERIC");
    return !(env != nullptr && std::string(env) == "1");
  }();
  return fast;
}

}  // namespace cpu_loss
}  // namespace deferredseg
