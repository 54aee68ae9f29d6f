// Tile input and output of the CPU kernels: loads of the logits, target and expert
// labels of a tile by dtype and strides (with the label checks and the neighbour-pair
// counts done on the way), gradient stores (non-temporal for large gradients), and the
// software prefetch of the tiles ahead. Part of loss_cpu.cpp's translation unit (only
// it includes this file).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tile.h"

namespace deferredseg {
namespace cpu_loss {

DS_FP_REGION_BEGIN

// ---------------------------------------------------------------------------
// Loads and stores, by dtype and strides (the unit-stride paths vectorise).
// They are inlined into the per-ISA workers below.
// ---------------------------------------------------------------------------

// Non-temporal stores of a float row (the gradient of a large input goes straight
// to memory: it is not read again by this pass, and a normal store would first read
// every line it writes). Head and tail up to 64-byte alignment use normal stores.
#if DS_HAVE_STREAM
#define DS_STREAM_ROW(ATTR, NAME, VEC, WIDTH, STORE, LOAD)              \
  ATTR inline void NAME(float* dst, const float* src, int64_t n) {      \
    int64_t i = 0;                                                      \
    while (i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0) { \
      dst[i] = src[i];                                                  \
      ++i;                                                              \
    }                                                                   \
    for (; i + WIDTH <= n; i += WIDTH) STORE(dst + i, LOAD(src + i));   \
    for (; i < n; ++i) dst[i] = src[i];                                 \
  }
DS_STREAM_ROW(, stream_row_base, __m128, 4, _mm_stream_ps, _mm_loadu_ps)
#if DS_X86_VARIANTS
DS_STREAM_ROW(DS_TARGET_V3, stream_row_v3, __m256, 8, _mm256_stream_ps, _mm256_loadu_ps)
DS_STREAM_ROW(DS_TARGET_V4, stream_row_v4, __m512, 16, _mm512_stream_ps, _mm512_loadu_ps)
#endif
#endif

template <int ISA>
DS_INLINE void stream_row(float* dst, const float* src, int64_t n) {
#if DS_HAVE_STREAM
#if DS_X86_VARIANTS
  if (ISA == kIsaV4) return stream_row_v4(dst, src, n);
  if (ISA == kIsaV3) return stream_row_v3(dst, src, n);
#endif
  stream_row_base(dst, src, n);
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
#endif
}

inline void stream_fence() {
#if DS_HAVE_STREAM
  _mm_sfence();
#endif
}

// Rows c0 .. c0 + nc - 1 of the tile, x at (b, 0, p0).
template <typename scalar_t, typename T>
DS_INLINE void load_rows(const scalar_t* x, int64_t xc, int64_t xp, int64_t c0, int64_t nc,
                         int64_t n, T* out) {
  for (int64_t c = 0; c < nc; ++c) {
    const scalar_t* __restrict__ src = x + (c0 + c) * xc;
    T* __restrict__ dst = out + c * kTile;
    if (xp == 1) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i * xp]);
    }
  }
}

// `stream`: non-temporal stores (float rows of unit stride only; see stream_row).
template <int ISA, typename scalar_t, typename T>
DS_INLINE void store_rows(scalar_t* g, int64_t gc, int64_t gp, int64_t nc, int64_t n, const T* in,
                          bool stream) {
  for (int64_t c = 0; c < nc; ++c) {
    scalar_t* __restrict__ dst = g + c * gc;
    const T* __restrict__ src = in + c * kTile;
    if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
      if (stream && gp == 1) {
        stream_row<ISA>(dst, src, n);
        continue;
      }
    }
    if (gp == 1) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i * gp] = static_cast<scalar_t>(src[i]);
    }
  }
}

// A label that is not ignore_index and outside [0, nlab): a bad label.
DS_INLINE bool label_out_of_range(int64_t v, int64_t ignore, int64_t nlab) {
  // (v < 0) | (v >= nlab) as one unsigned comparison (nlab > 0)
  return (v != ignore) & (static_cast<uint64_t>(v) >= static_cast<uint64_t>(nlab));
}

// One target value: valid flag, the label (0 where not a valid in-range label, so
// it can index), the raw value; returns 1 for a label out of range that is not
// ignore_index.
template <typename T>
DS_INLINE int64_t target_at(int64_t v, int64_t ignore, int64_t nlab, int64_t i, T* valid, T* yf,
                            int32_t* y, int64_t* tv) {
  const bool ok = v != ignore;
  const bool in_range = (v >= 0) & (v < nlab);
  const int32_t lab = sel<int32_t>(ok & in_range, static_cast<int32_t>(v), 0);
  valid[i] = sel(ok, T(1), T(0));
  y[i] = lab;
  yf[i] = static_cast<T>(lab);
  tv[i] = v;
  return sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
}

// The target of a tile (t at (b, p0)); returns the number of bad labels.
template <typename label_t, typename T>
DS_INLINE int64_t load_target(const label_t* t, int64_t tp, int64_t n, int64_t ignore, int64_t nlab,
                              T* __restrict__ valid, T* __restrict__ yf, int32_t* __restrict__ y,
                              int64_t* __restrict__ tv) {
  int64_t bad = 0;
  if (tp == 1) {
    DS_SIMD_SUM(bad)
    for (int64_t i = 0; i < n; ++i)
      bad += target_at(static_cast<int64_t>(t[i]), ignore, nlab, i, valid, yf, y, tv);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      bad += target_at(static_cast<int64_t>(t[i * tp]), ignore, nlab, i, valid, yf, y, tv);
    }
  }
  return bad;
}

// The valid mask of a tile's target (unit stride; t at (b, p0)); returns the number
// of bad labels (counted in float, exact for a tile: one accumulation type keeps the
// loop vectorised).
template <typename label_t, typename T>
DS_INLINE int64_t load_valid(const label_t* t, int64_t n, int64_t ignore, int64_t nlab,
                             T* __restrict__ valid) {
  T bad = T(0);
  DS_SIMD_SUM(bad)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(t[i]);
    const bool ok = v != ignore;
    bad += sel(label_out_of_range(v, ignore, nlab), T(1), T(0));
    valid[i] = sel(ok, T(1), T(0));
  }
  return static_cast<int64_t>(bad);
}

// Expert correctness c_j = [m_j == y and m_j != ignore_index] (l at (b, 0, p0)),
// computed as [m_j == t] with t the raw target (tv): where t is a valid label this is
// the same, and where t is ignore_index the pixel is not valid and its c_j is never
// used (every term and gradient of the pixel is selected away).
// With count_bad, also returns the number of expert labels out of [0, nlab) that are
// not ignore_index, counted in the same loop (0 otherwise).
template <typename label_t, typename T>
DS_INLINE int64_t load_experts(const label_t* l, int64_t le, int64_t lp, int64_t E, int64_t n,
                               int64_t ignore, int64_t nlab, bool count_bad,
                               const int64_t* __restrict__ tv, T* ck) {
  int64_t bad = 0;
  for (int64_t j = 0; j < E; ++j) {
    const label_t* __restrict__ src = l + j * le;
    T* __restrict__ dst = ck + j * kTile;
    if (lp == 1 && count_bad) {
      DS_SIMD_SUM(bad)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i]);
        dst[i] = sel(v == tv[i], T(1), T(0));
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    } else if (lp == 1) {
      DS_SIMD
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i]);
        dst[i] = sel(v == tv[i], T(1), T(0));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i * lp]);
        dst[i] = sel(v == tv[i], T(1), T(0));
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    }
  }
  return count_bad ? bad : 0;
}

// Expert labels out of range that are not ignore_index.
template <typename label_t>
DS_INLINE int64_t count_bad_experts(const label_t* l, int64_t le, int64_t lp, int64_t E, int64_t n,
                                    int64_t ignore, int64_t nlab) {
  int64_t bad = 0;
  for (int64_t j = 0; j < E; ++j) {
    const label_t* __restrict__ src = l + j * le;
    if (lp == 1) {
      DS_SIMD_SUM(bad)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i]);
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(src[i * lp]);
        bad += sel<int64_t>(label_out_of_range(v, ignore, nlab), 1, 0);
      }
    }
  }
  return bad;
}

// Valid pairs (p, p + s) of a tile along one axis: `next` is the target at p0 + s
// (t + s * tp), of which `avail` pixels exist in the batch element. One loop counts
// the pairs of every pixel with a valid pixel s further on (a 0/1 sum, exact in T for
// a tile; 64-bit labels and floats in one loop of one width); then the pixels with
// no neighbour along the axis (see pairs_past_edge) take theirs back.
template <typename label_t, typename T>
DS_INLINE int64_t count_pairs(const label_t* next, int64_t tp, int64_t n, int64_t avail,
                              int64_t ignore, const T* __restrict__ valid, T* __restrict__ both) {
  const int64_t m = std::min(n, avail);  // pixels past `avail` have no neighbour along this axis
  T cnt = T(0);
  if (tp == 1) {
    DS_SIMD_SUM(cnt)
    for (int64_t i = 0; i < m; ++i) {
      const T b = sel(static_cast<int64_t>(next[i]) != ignore, valid[i], T(0));
      both[i] = b;
      cnt += b;
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      const T b = sel(static_cast<int64_t>(next[i * tp]) != ignore, valid[i], T(0));
      both[i] = b;
      cnt += b;
    }
  }
  return static_cast<int64_t>(cnt);
}

// Label tensors are read through their dtype code (LabelPtr of loss.h: 0 uint8, 1 int32,
// 2 int64), switched once a tile row, so the workers are templated on the logits dtype
// only. The bytes of one label:
inline int64_t label_bytes(const LabelPtr& l) { return l.kind == 0 ? 1 : (l.kind == 1 ? 4 : 8); }

// Tiles ahead that the workers prefetch. A tile reads a kTile-pixel stretch of some
// 10 to 16 rows at once; each stretch is 1 to 2 KiB, so the rows cross a 4 KiB page
// (where the hardware prefetcher stops) every few tiles. Measured on the 2-core CI
// machine: 5 to 10 % faster than without, distances 1 to 4 alike.
constexpr int64_t kPrefetchTiles = 2;

// Software prefetch (into L2) of the rows a tile ahead will read, issued in parts
// between the steps of the tile being processed (see step). Issued as one burst (some
// 100 to 250 cache lines a tile), the prefetches fill the core's queue of outstanding
// misses and the core waits at the prefetch instructions; spread over the tile they
// overlap with its compute. Measured on the 2-core CI machine, interleaved in one
// process, right after the eager reference: 4 to 7 % faster; hot, unchanged.
class TilePrefetch {
 public:
  // Rows a plan holds; the rows of a tile past this many (more than some 30 channels
  // and expert labels) are left to the hardware prefetcher.
  static constexpr int kMaxRows = 32;
  // Issues what is left of the previous plan and starts a new, empty one.
  DS_INLINE void restart() {
    step(std::numeric_limits<int64_t>::max());
    nrows_ = cur_ = 0;
    off_ = lines_ = 0;
  }
  // Adds `nrows` rows of n elements of `bytes` each, rows `row_stride` elements apart,
  // from `base` + offset elements; unit stride only (else nothing).
  DS_INLINE void add(const void* base, int64_t bytes, int64_t offset, int64_t row_stride,
                     int64_t nrows, int64_t unit, int64_t n) {
    if (unit != 1 || base == nullptr || n <= 0) return;
    const char* p0 = static_cast<const char*>(base) + offset * bytes;
    for (int64_t r = 0; r < nrows && nrows_ < kMaxRows; ++r) {
      row_[nrows_] = p0 + r * row_stride * bytes;
      len_[nrows_++] = n * bytes;
      lines_ += (n * bytes + 63) / 64;
    }
  }
  // The share of the plan each of `parts` steps issues.
  DS_INLINE int64_t share(int64_t parts) const { return (lines_ + parts - 1) / parts; }
  // Issues the next `lines` cache lines of the plan.
  DS_INLINE void step(int64_t lines) {
    while (lines > 0 && cur_ < nrows_) {
      __builtin_prefetch(row_[cur_] + off_, 0, 2);
      --lines;
      off_ += 64;
      if (off_ >= len_[cur_]) {
        off_ = 0;
        ++cur_;
      }
    }
  }

 private:
  const char* row_[kMaxRows];
  int64_t len_[kMaxRows];
  int nrows_ = 0, cur_ = 0;
  int64_t off_ = 0, lines_ = 0;
};

template <typename L>
DS_INLINE const L* label_at(const LabelPtr& l, int64_t offset) {
  return static_cast<const L*>(l.p) + offset;
}
#define DS_LABEL_SWITCH(LP, ...) \
  switch ((LP).kind) {           \
    case 0: {                    \
      using label_t = uint8_t;   \
      __VA_ARGS__;               \
      break;                     \
    }                            \
    case 1: {                    \
      using label_t = int32_t;   \
      __VA_ARGS__;               \
      break;                     \
    }                            \
    default: {                   \
      using label_t = int64_t;   \
      __VA_ARGS__;               \
      break;                     \
    }                            \
  }

template <typename scalar_t>
struct Inputs : LossStrides {
  const scalar_t* x;
  LabelPtr t;    // target
  LabelPtr lab;  // expert labels
  scalar_t* g;   // gradient (null: none)
  bool stream;   // write the gradient with non-temporal stores
};

// The loaders above for the label dtype of the inputs; offsets in elements.
template <typename scalar_t, typename T>
DS_INLINE int64_t load_target_at(const Inputs<scalar_t>& in, int64_t offset, int64_t n, T* valid,
                                 T* yf, int32_t* y, int64_t* tv) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.t, bad = load_target(label_at<label_t>(in.t, offset), in.tp, n, in.ignore,
                                          in.nlab, valid, yf, y, tv))
  return bad;
}
template <typename scalar_t, typename T>
DS_INLINE int64_t load_valid_at(const Inputs<scalar_t>& in, int64_t offset, int64_t n, T* valid) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.t,
                  bad = load_valid(label_at<label_t>(in.t, offset), n, in.ignore, in.nlab, valid))
  return bad;
}
template <typename scalar_t, typename T>
DS_INLINE int64_t load_experts_at(const Inputs<scalar_t>& in, int64_t offset, int64_t E, int64_t n,
                                  bool count_bad, const int64_t* tv, T* ck) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.lab, bad = load_experts(label_at<label_t>(in.lab, offset), in.le, in.lp, E, n,
                                             in.ignore, in.nlab, count_bad, tv, ck))
  return bad;
}
template <typename scalar_t>
DS_INLINE int64_t count_bad_experts_at(const Inputs<scalar_t>& in, int64_t offset, int64_t E,
                                       int64_t n) {
  int64_t bad = 0;
  DS_LABEL_SWITCH(in.lab, bad = count_bad_experts(label_at<label_t>(in.lab, offset), in.le, in.lp,
                                                  E, n, in.ignore, in.nlab))
  return bad;
}
template <typename scalar_t, typename T>
DS_INLINE int64_t count_pairs_at(const Inputs<scalar_t>& in, int64_t offset, int64_t n,
                                 int64_t avail, const T* valid, T* both) {
  int64_t cnt = 0;
  DS_LABEL_SWITCH(in.t, cnt = count_pairs(label_at<label_t>(in.t, offset), in.tp, n, avail,
                                          in.ignore, valid, both))
  return cnt;
}

// Points c.Xin at the logits rows c0 .. c0 + nc - 1 of the tile at x (the pixel at
// channel 0): the input itself when in_place (scalar_t is T, unit pixel stride),
// else a copy in X (converted to T).
template <typename scalar_t, typename T>
DS_INLINE void point_logits(TileCtx<T>& c, const Inputs<scalar_t>& in, const scalar_t* x,
                            int64_t c0, int64_t nc, int64_t n, bool in_place) {
  if constexpr (std::is_same<scalar_t, T>::value) {
    if (in_place) {
      c.Xin = x + c0 * in.xc;
      c.xs = in.xc;
      return;
    }
  }
  load_rows(x, in.xc, in.xp, c0, nc, n, c.X);
  c.Xin = c.X;
  c.xs = kTile;
}

DS_FP_REGION_END
}  // namespace cpu_loss
}  // namespace deferredseg
