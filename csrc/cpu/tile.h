// The buffers the CPU kernels work in: a tile's options and arrays (TileCtx), the
// per-thread memory behind them (Workspace), and the per-thread stores that outlive a
// tile (RoutingRing, MapWindow). Part of loss_cpu.cpp's translation unit (only it
// includes this file).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "geometry.h"
#include "isa.h"

namespace deferredseg {
namespace cpu_loss {

DS_FP_REGION_BEGIN

// ---------------------------------------------------------------------------
// A tile's buffers and options. Arrays are kTile long; X, ck and pi hold one
// kTile row a channel.
// ---------------------------------------------------------------------------
template <typename T>
struct TileCtx {
  // options (constant over the tiles of a call)
  int64_t K = 1, E = 1;
  int nd = 1;
  int64_t st[kMaxSpatial] = {0, 0, 0};
  // The call's options as decoded from fparams / iparams (contract.h): the steps read
  // every option from here, converting a float option to T where they use it.
  LossParams params{};
  bool grad = false;
  // rb, ri, rs, rinv, D, pi and lgate, dgate, dsa already hold this tile's routing and gate
  // term (computed by maps_tile), valid / yf / y its target
  bool routing_ready = false;
  bool fast = false;  // E <= kFastMaxExperts, float accumulation: the unrolled paths
  T scale_seg = 0, scale_collab = 0, scale_gate = 0;
  T scale_coh[kMaxSpatial] = {0, 0, 0};
  const T* bal = nullptr;  // E + 1 balance coefficients lambda_balance * scale * dBAL/dS_k
  const T* cw = nullptr;   // class weights (K' values) or null
  bool benefit() const { return params.gate_target == kGateTargetBenefit; }  // else "router"
  bool l2() const { return params.coherence == kCoherenceL2; }               // else "l1"

  // the tile
  int64_t n = 0;
  // logits in (stats: the E + 1 routing channels; maps: routing + gate), gradient out
  T* X = nullptr;
  // The logits of the tile as X holds them (same rows), xs apart: X itself (xs = kTile)
  // after load_rows, or the input tensor, read in place (float or double logits of
  // unit pixel stride). Logits are read from Xin, gradients written to X.
  const T* Xin = nullptr;
  int64_t xs = kTile;
  T* ck = nullptr;  // c_k: expert j correct (rows 0..E-1), model correct c0 (row E)
  T* pi = nullptr;  // routing probabilities
  // One row each (bound by Workspace::bind, or by RoutingRing::point for those it keeps):
  T* valid;   // 1 where the target is not ignore_index, else 0
  T* yf;      // the label y as T (0 where it is not a valid label in range)
  T* w;       // the class weight of y (1 without class weights)
  T* zb;      // K > 1: the max of the class logits; benefit_target: scratch
  T* zs;      // K > 1: the sum of exps of the class logits, then its inverse
  T* zy;      // K > 1: the logit of class y
  T* rb;      // the max of the E + 1 routing logits
  T* rs;      // the sum of exps of the routing logits (shifted by rb)
  T* rinv;    // 1 / rs
  T* rlog;    // log(rs) (the softmax surrogate)
  T* D;       // D = sum_{j<E} pi_j, the router's map
  T* lseg;    // w l_seg of a valid pixel (else 0)
  T* lcol;    // l_collab of the pixel
  T* lgate;   // l_gate of the pixel
  T* dgate;   // d l_gate / d a (a: the gate logit)
  T* dsa;     // ds/da, s = sigmoid(a)
  T* acc;     // collab: Ctot (softmax) or sum_k g_k pi_k (paper); K > 1 first the seg gradient
              // factor; the stats worker's scratch
  T* bsum;    // sum_k bal_k pi_k (balance)
  T* common;  // the part of the routing-logit gradient shared by the channels (routing_common)
  T* gD;      // d coherence / d D, from both pairs of every axis
  T* gS;      // d coherence / d s, likewise
  T* tg = nullptr;  // the gate's target with gate_target "benefit" (benefit_target)
  // The tile's neighbour masks (point_masks): 1 where p - st[d] (hp), p + st[d] (hn) is in
  // the volume.
  T* hp[kMaxSpatial];
  T* hn[kMaxSpatial];
  int32_t* y;   // the label (0 where it is not a valid label in range), an index
  int32_t* zi;  // K > 1: the argmax of the class logits; benefit_target: jhat
  int32_t* ri;  // the argmax of the E + 1 routing logits (E: the model)

  // per-pixel buffers at the tile's first pixel (padded: p - pad .. p + pad readable)
  const T* vm = nullptr;  // valid mask (0 / 1)
  T* vm_out = nullptr;    // maps: the valid mask written
  T* mapD = nullptr;      // D (router map)
  T* mapS = nullptr;      // s = sigmoid(a) (gate map)

  // The tile's partial sums (accumulation type): stats_tile, S_0..S_E, N_V, W at their
  // places in the stats vector; loss_tile, the kNumSums per-pixel sums.
  T* out = nullptr;
};

// The buffers of one thread, bound to a TileCtx.
template <typename T>
struct Workspace {
  static constexpr int kNamed = 22;
  std::vector<T> f;
  std::vector<int32_t> i32;
  std::vector<int64_t> i64;

  Workspace(int64_t C, int64_t E) {
    f.resize(static_cast<size_t>((C + 2 * (E + 1) + kNamed + 2 * kMaxSpatial) * kTile + 64));
    i32.resize(3 * kTile);
    i64.resize(kTile);
  }
  void bind(TileCtx<T>& c, int64_t C, int64_t E) {
    T* p = f.data();
    auto take = [&](int64_t rows) {
      T* r = p;
      p += rows * kTile;
      return r;
    };
    c.X = take(C);
    c.ck = take(E + 1);
    c.pi = take(E + 1);
    T** named[kNamed] = {&c.valid, &c.yf,   &c.w,      &c.zb,   &c.zs,   &c.zy,    &c.rb,    &c.rs,
                         &c.rinv,  &c.rlog, &c.D,      &c.lseg, &c.lcol, &c.lgate, &c.dgate, &c.dsa,
                         &c.acc,   &c.bsum, &c.common, &c.gD,   &c.gS,   &c.tg};
    for (T** q : named) *q = take(1);
    for (int d = 0; d < kMaxSpatial; ++d) {
      c.hp[d] = take(1);
      c.hn[d] = take(1);
    }
    c.y = i32.data();
    c.zi = i32.data() + kTile;
    c.ri = i32.data() + 2 * kTile;
  }
  int64_t* tv() { return i64.data(); }
};

// The routing results (softmax, argmax, D), gate terms and loaded target of the last
// `slots` map tiles of a thread:
// the main pass of a tile takes them from here instead of recomputing them. A tile's
// map tile is always computed by the thread that runs its main pass, before it and
// by the same function, so this changes no value (and no bit).
template <typename T>
struct RoutingRing {
  // rows a slot besides pi's E + 1: rb, rs, rinv, D, lgate, dgate, dsa, valid, yf
  static constexpr int kRows = 9;
  int64_t slots = 0, E = 0;
  std::vector<T> f;
  std::vector<int32_t> i32;  // ri, y
  std::vector<int64_t> i64;  // tv: the raw target
  std::vector<int64_t> tag;
  RoutingRing(int64_t slots_, int64_t E_)
      : slots(slots_),
        E(E_),
        f(static_cast<size_t>(slots_ * (E_ + 1 + kRows) * kTile)),
        i32(static_cast<size_t>(slots_ * 2 * kTile)),
        i64(static_cast<size_t>(slots_ * kTile)),
        tag(static_cast<size_t>(slots_), -1) {}
  // Points the routing, gate and target arrays of c (and tv) at the slot of tile `id`.
  int64_t point(TileCtx<T>& c, int64_t id, int64_t*& tv) {
    const int64_t s = id % slots;
    T* base = f.data() + s * (E + 1 + kRows) * kTile;
    c.pi = base;
    T** rows[kRows] = {&c.rb, &c.rs, &c.rinv, &c.D, &c.lgate, &c.dgate, &c.dsa, &c.valid, &c.yf};
    for (int r = 0; r < kRows; ++r) *rows[r] = base + (E + 1 + r) * kTile;
    c.ri = i32.data() + 2 * s * kTile;
    c.y = c.ri + kTile;
    tv = i64.data() + s * kTile;
    return s;
  }
};

// The window of one thread over the per-pixel maps of one batch element: the valid
// mask, D and s of pixels [lo, lo + cap), stored with `pad` readable elements on both
// sides. It slides forward: when a new map tile does not fit, the tiles still needed
// (from `keep` on) move to the front. Reads that fall outside the volume or before
// `keep` only ever feed pairs that the neighbour masks leave out.
template <typename T>
struct MapWindow {
  int64_t cap = 0, pad = 0, lo = 0;
  std::vector<T> vm, D, S;
  MapWindow(int64_t cap_, int64_t pad_, bool with_d, bool with_s)
      : cap(cap_),
        pad(pad_),
        vm(static_cast<size_t>(cap_ + 2 * pad_), T(0)),
        D(with_d ? static_cast<size_t>(cap_ + 2 * pad_) : 0, T(0)),
        S(with_s ? static_cast<size_t>(cap_ + 2 * pad_) : 0, T(0)) {}
  int64_t at(int64_t p) const { return pad + p - lo; }
  T* vm_at(int64_t p) { return vm.data() + at(p); }
  T* D_at(int64_t p) { return D.empty() ? nullptr : D.data() + at(p); }
  T* S_at(int64_t p) { return S.empty() ? nullptr : S.data() + at(p); }
  void reset(int64_t first) { lo = first; }
  // Makes room for pixels up to `upto`, keeping those in [keep, done).
  void fit(int64_t keep, int64_t done, int64_t upto) {
    if (upto - lo <= cap) return;
    const int64_t shift = keep - lo, count = done - keep;
    if (count > 0) {
      std::memmove(vm.data() + pad, vm.data() + pad + shift,
                   static_cast<size_t>(count) * sizeof(T));
      if (!D.empty())
        std::memmove(D.data() + pad, D.data() + pad + shift,
                     static_cast<size_t>(count) * sizeof(T));
      if (!S.empty())
        std::memmove(S.data() + pad, S.data() + pad + shift,
                     static_cast<size_t>(count) * sizeof(T));
    }
    lo = keep;
  }
};

DS_FP_REGION_END
}  // namespace cpu_loss
}  // namespace deferredseg
