// The spatial layout of a loss call as the CPU kernels walk it: the tiling of the
// pixels, and the neighbour masks and pair counts that follow from the shape alone.
// Part of loss_cpu.cpp's translation unit (only it includes this file).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../loss.h"  // LossProblem
#include "isa.h"

namespace deferredseg {
namespace cpu_loss {

using namespace loss;

constexpr int64_t kTile = 256;  // pixels a tile

// Spatial layout: sizes, flattened strides and the tiling of the pixels.
struct Geometry {
  int nd = 1;
  int64_t S[kMaxSpatial] = {1, 1, 1};
  int64_t st[kMaxSpatial] = {1, 1, 1};
  int64_t B = 0, P = 0, tiles_per_batch = 0, tiles = 0;
  int64_t pad = 1;    // margin of the per-pixel window buffers: the largest stride
  int64_t ahead = 1;  // tiles a neighbour can be away: ceil(pad / kTile)

  explicit Geometry(const LossProblem& pb) : nd(pb.nd), B(pb.B), P(pb.P) {
    for (int d = 0; d < nd; ++d) {
      S[d] = pb.S[d];
      st[d] = pb.st[d];
      pad = std::max(pad, st[d]);
    }
    tiles_per_batch = (P + kTile - 1) / kTile;
    tiles = B * tiles_per_batch;
    ahead = (pad + kTile - 1) / kTile;
  }
  int64_t batch(int64_t t) const { return t / tiles_per_batch; }
  int64_t index(int64_t t) const { return t % tiles_per_batch; }
  int64_t first(int64_t t) const { return index(t) * kTile; }
  int64_t count(int64_t t) const { return std::min(kTile, P - first(t)); }
};

// Neighbour masks along axis d of the pixels p0 .. p0 + n - 1 of one batch element:
// hp[i] = 1 when pixel p0 + i has a neighbour at p - st[d] (its coordinate along d is
// > 0), hn[i] = 1 when it has one at p + st[d], else 0. Along d the coordinate
// repeats with period Q = S[d] * st[d]: coordinate 0 is the pixels [k Q, k Q + st[d]),
// coordinate S[d] - 1 the pixels [(k + 1) Q - st[d], (k + 1) Q). Inlined into the
// per-ISA workers, so the fills vectorise.
template <typename T>
DS_INLINE void zero_runs(T* m, int64_t p0, int64_t n, int64_t Q, int64_t off, int64_t len) {
  // runs [k Q + off, k Q + off + len) that end after p0: k >= ceil((p0 - off - len + 1) / Q)
  const int64_t x = p0 - off - len + 1;
  const int64_t k0 = x > 0 ? (x + Q - 1) / Q : 0;
  for (int64_t r = k0 * Q + off; r < p0 + n; r += Q) {
    const int64_t lo = std::max(r, p0), hi = std::min(r + len, p0 + n);
    for (int64_t i = lo; i < hi; ++i) m[i - p0] = T(0);
  }
}
template <typename T>
DS_INLINE void axis_masks(const Geometry& g, int d, int64_t p0, int64_t n, T* __restrict__ hp,
                          T* __restrict__ hn) {
  const int64_t s = g.st[d], Q = g.S[d] * s;
  DS_SIMD
  for (int64_t i = 0; i < n; ++i) {
    hp[i] = T(1);
    hn[i] = T(1);
  }
  zero_runs(hp, p0, n, Q, 0, s);
  zero_runs(hn, p0, n, Q, Q - s, s);
}

// The neighbour masks of a thread's tiles, axis by axis: an axis whose period Q is
// short gets a table over Q + kTile pixels (the masks of a tile at p0 are the table
// at p0 mod Q); on another axis a tile whose pixels all share one coordinate along it
// gets a row of ones or zeros; any other tile computes its masks into its own rows.
constexpr int64_t kMaskPeriodMax = 8192;
template <typename T>
struct NeighbourMasks {
  std::vector<T> tab[kMaxSpatial][2];
  std::vector<T> ones, zeros;
  NeighbourMasks(const Geometry& g, bool want) {
    if (!want) return;
    ones.assign(kTile, T(1));
    zeros.assign(kTile, T(0));
    for (int d = 0; d < g.nd; ++d) {
      const int64_t Q = g.S[d] * g.st[d];
      if (Q > kMaskPeriodMax) continue;
      tab[d][0].resize(static_cast<size_t>(Q + kTile));
      tab[d][1].resize(static_cast<size_t>(Q + kTile));
      axis_masks(g, d, 0, Q + kTile, tab[d][0].data(), tab[d][1].data());
    }
  }
};
// Points hp / hn (or computes them into the tile's rows own_p / own_n) for the tile
// at p0 of n pixels.
template <typename T>
DS_INLINE void point_masks(NeighbourMasks<T>& nm, const Geometry& g, int64_t p0, int64_t n, T** hp,
                           T** hn, T* const* own_p, T* const* own_n) {
  for (int d = 0; d < g.nd; ++d) {
    const int64_t s = g.st[d], Q = g.S[d] * s;
    if (!nm.tab[d][0].empty()) {
      hp[d] = nm.tab[d][0].data() + p0 % Q;
      hn[d] = nm.tab[d][1].data() + p0 % Q;
    } else if (p0 / s == (p0 + n - 1) / s) {
      const int64_t cd = (p0 / s) % g.S[d];
      hp[d] = cd > 0 ? nm.ones.data() : nm.zeros.data();
      hn[d] = cd < g.S[d] - 1 ? nm.ones.data() : nm.zeros.data();
    } else {
      hp[d] = own_p[d];
      hn[d] = own_n[d];
      axis_masks(g, d, p0, n, hp[d], hn[d]);
    }
  }
}

// The pairs that count_pairs counted for pixels p0 .. p0 + m - 1 (`both` at p0) whose
// coordinate along axis d is the last one: they have no neighbour at p + st[d] (the
// pixel there starts the next row / slab). Those pixels come in runs of st[d] every
// st[d - 1]; axis 0 has none (its last slab is past `avail`).
template <typename T>
DS_INLINE int64_t pairs_past_edge(const Geometry& g, int d, int64_t p0, int64_t m, const T* both) {
  if (d == 0) return 0;
  const int64_t run = g.st[d], period = g.st[d - 1], first = (g.S[d] - 1) * g.st[d];
  // Runs start at k * period + first; one reaches p0 when it starts after p0 - run.
  const int64_t need = p0 - first - run + 1;
  const int64_t k0 = need > 0 ? (need + period - 1) / period : 0;
  T cnt = T(0);
  for (int64_t r0 = k0 * period + first; r0 < p0 + m; r0 += period) {
    const int64_t lo = std::max(r0, p0), hi = std::min(r0 + run, p0 + m);
    for (int64_t p = lo; p < hi; ++p) cnt += both[p - p0];
  }
  return static_cast<int64_t>(cnt);
}

}  // namespace cpu_loss
}  // namespace deferredseg
