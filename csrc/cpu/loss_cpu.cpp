// CPU kernels of `deferredseg::loss_stats` and `deferredseg::loss_fused`
// (docs/objective.md section 3; the contract of both ops is documented in
// deferredseg_kernels/ops/fused.py).
//
// Work unit: a tile of kTile consecutive pixels of one batch element. A tile is
// loaded into structure-of-arrays buffers (one row of kTile values a channel,
// converted to the accumulation type) and every step is a loop over the pixels
// of a row, so the loops vectorise; the per-pixel formulas are those of
// loss_pixel.h, shared with the CUDA kernels.
//
// Each op is one parallel pass over the tiles. loss_fused needs, for the
// coherence term, the maps D and s and the valid mask at the neighbours of each
// pixel; every thread computes them tile by tile into its own window buffer,
// just ahead of the tile being processed (the neighbours along the first axis
// are prod(S[1:]) pixels away), so they are computed from data that is in cache
// anyway and the window stays in cache until it is read. The routing softmax a
// map tile computes is kept (RoutingRing) for the tile's own main pass.
//
// Determinism: tiles are fixed by the shape alone, and every value a tile
// produces is a function of the tile (a map tile is always computed as a whole
// tile, whichever thread computes it). Each tile writes its partial sums to its
// own row; the rows are added in tile order in double. Results do not depend on
// the number of threads or on their timing.
//
// Instruction sets: on x86-64 the kernels are compiled three times (baseline,
// x86-64-v3 = AVX2 + FMA, x86-64-v4 = AVX-512) and the best one the CPU supports
// runs; the environment variable DEFERREDSEG_CPU_ISA=base|v3|v4 caps the choice
// (read once; used by the tests to check every variant).
//
// The headers next to this file hold the steps (inlined into their callers, so that
// the per-ISA `target` attributes reach every step); the AVX2 and AVX-512 entry points
// of the tile computations are compiled in loss_tile_v3.cpp and loss_tile_v4.cpp, the
// rest here:
//   isa.h         compiler settings, instruction-set and fast-path dispatch
//   geometry.h    the tiling of the pixels and the neighbour masks
//   tile.h        a tile's options and buffers, and the per-thread stores
//   tile_steps.h  routing softmax, stats, maps and gate term of a tile
//   loss_tile.h   coherence and every term of a tile; the per-ISA entry points
//   tile_io.h     loads, stores and prefetch of a tile
// and here the workers (the tiles of one thread) and the op entry points. The
// cached gradient buffer is grad_cache.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

// isa.h first: it includes loss_pixel.h under the kernels' floating-point setting.
#include "isa.h"

#define DS_TILE_ENTRIES_BASE  // this unit defines the baseline entry points of loss_tile.h

#include "../common.h"
#include "../dispatch.h"  // AccType
#include "../loss.h"
#include "geometry.h"
#include "grad_cache.h"
#include "loss_tile.h"
#include "tile.h"
#include "tile_io.h"
#include "tile_steps.h"

namespace deferredseg {
namespace cpu_loss {

using namespace loss;

constexpr int64_t kGrainTiles = 16;  // a thread takes at least this many tiles

DS_FP_REGION_BEGIN

// ---------------------------------------------------------------------------
// Workers: the tiles t0 .. t1 - 1 of one thread (per instruction set).
// ---------------------------------------------------------------------------

// The stats worker writes a tile's partial sums to its row of `part`, stats_len(E) values
// in the order of the stats vector (loss_pixel.h).
template <int ISA, typename scalar_t>
DS_INLINE void stats_worker_impl(const Inputs<scalar_t>& in, const Geometry& geo,
                                 const TileCtx<typename AccType<scalar_t>::type>& base,
                                 bool check_experts, int64_t t0, int64_t t1, double* part) {
  using T = typename AccType<scalar_t>::type;
  const int64_t E = base.E, K = base.K, width = stats_len(E);
  Workspace<T> ws(E + 1, E);
  TileCtx<T> c = base;
  ws.bind(c, E + 1, E);
  std::vector<T> out(static_cast<size_t>(stat_weight(E) + 1));  // S_0..S_E, N_V, W (stats_tile)
  c.out = out.data();
  // Logits of the accumulation type and unit pixel stride are read in place; without
  // class weights (which need the labels) a unit-stride target gives only its valid mask.
  const bool in_place = std::is_same<scalar_t, T>::value && in.xp == 1;
  const bool valid_only = base.cw == nullptr && in.tp == 1;
  TilePrefetch pf;
  int64_t part_lines = 0;  // the prefetch plan is issued in 3 parts a tile
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = geo.batch(t), p0 = geo.first(t), n = geo.count(t);
    pf.restart();
    if (t + kPrefetchTiles < t1) {
      const int64_t tn = t + kPrefetchTiles;
      const int64_t b1 = geo.batch(tn), q1 = geo.first(tn), n1 = geo.count(tn);
      pf.add(in.x, sizeof(scalar_t), b1 * in.xb + q1 * in.xp + K * in.xc, in.xc, E + 1, in.xp, n1);
      pf.add(in.t.p, label_bytes(in.t), b1 * in.tb + q1 * in.tp, 0, 1, in.tp, n1);
      if (geo.nd > 1 && q1 + geo.st[0] < geo.P) {  // the pairs along the first axis read it
        pf.add(in.t.p, label_bytes(in.t), b1 * in.tb + (q1 + geo.st[0]) * in.tp, 0, 1, in.tp,
               std::min(n1, geo.P - q1 - geo.st[0]));
      }
      part_lines = pf.share(3);
      pf.step(part_lines);
    }
    c.n = n;
    const int64_t toff = b * in.tb + p0 * in.tp;
    const scalar_t* x = in.x + b * in.xb + p0 * in.xp;
    int64_t bad = valid_only ? load_valid_at(in, toff, n, c.valid)
                             : load_target_at(in, toff, n, c.valid, c.yf, c.y, ws.tv());
    pf.step(part_lines);
    point_logits(c, in, x, K, E + 1, n, in_place);
    stats_tile<ISA>(c);
    pf.step(part_lines);
    if (check_experts) bad += count_bad_experts_at(in, b * in.lb + p0 * in.lp, E, n);
    double* row = part + t * width;
    for (int64_t s = 0; s <= stat_weight(E); ++s) row[s] = static_cast<double>(out[s]);
    row[stat_bad(E)] = static_cast<double>(bad);
    for (int d = 0; d < kMaxSpatial; ++d) {
      int64_t cnt = 0;
      if (d < geo.nd) {
        const int64_t s = geo.st[d];
        const int64_t m = std::max<int64_t>(0, std::min(n, geo.P - p0 - s));
        cnt = count_pairs_at(in, toff + s * in.tp, m, m, c.valid, c.acc);  // acc: free here
        cnt -= pairs_past_edge(geo, d, p0, m, c.acc);
      }
      row[stat_pairs(E, d)] = static_cast<double>(cnt);
    }
  }
}

template <int ISA, typename scalar_t>
DS_INLINE void fused_worker_impl(const Inputs<scalar_t>& in, const Geometry& geo,
                                 const TileCtx<typename AccType<scalar_t>::type>& base,
                                 bool check_experts, int64_t t0, int64_t t1, double* part,
                                 int64_t* bad) {
  using T = typename AccType<scalar_t>::type;
  const int64_t E = base.E, K = base.K, C = K + E + 2;
  Workspace<T> ws(C, E);
  TileCtx<T> c = base;
  ws.bind(c, C, E);
  T out[kNumSums];
  c.out = out;
  const bool maps = base.params.coherence_maps != 0;
  // Logits of the accumulation type and unit pixel stride are read in place.
  const bool in_place = std::is_same<scalar_t, T>::value && in.xp == 1;
  // The map window of this thread: 2 * ahead + 1 tiles are live at a time; the
  // slack makes the compaction (a memmove of the live tiles) rare.
  const int64_t live = 2 * geo.ahead + 1;
  MapWindow<T> win(maps ? std::min(geo.P, (3 * live + 1) * kTile) : 0, geo.pad,
                   (base.params.coherence_maps & kMapRouter) != 0,
                   (base.params.coherence_maps & kMapGate) != 0);
  RoutingRing<T> ring(maps ? geo.ahead + 1 : 0, E);
  NeighbourMasks<T> masks(geo, maps);
  T* own_p[kMaxSpatial];  // the tile's own mask rows (c.hp / c.hn may point elsewhere)
  T* own_n[kMaxSpatial];
  for (int d = 0; d < kMaxSpatial; ++d) {
    own_p[d] = c.hp[d];
    own_n[d] = c.hn[d];
  }
  int64_t* tv = ws.tv();             // the raw target of the tile (a ring slot with maps)
  int64_t cur_b = -1, next_map = 0;  // window: batch element, first tile not computed yet
  TilePrefetch pf;
  int64_t part_lines = 0;  // the prefetch plan is issued in 4 parts a tile
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = geo.batch(t), j = geo.index(t), p0 = geo.first(t), n = geo.count(t);
    pf.restart();
    if (t + kPrefetchTiles < t1) {
      // The map tile computed ahead reads the logits and target first; the main
      // pass of a tile reads the expert labels.
      const int64_t tm =
          maps ? std::min(t + kPrefetchTiles + geo.ahead, geo.tiles - 1) : t + kPrefetchTiles;
      const int64_t b1 = geo.batch(tm), q1 = geo.first(tm), n1 = geo.count(tm);
      pf.add(in.x, sizeof(scalar_t), b1 * in.xb + q1 * in.xp, in.xc, C, in.xp, n1);
      pf.add(in.t.p, label_bytes(in.t), b1 * in.tb + q1 * in.tp, 0, 1, in.tp, n1);
      const int64_t b2 = geo.batch(t + kPrefetchTiles), q2 = geo.first(t + kPrefetchTiles),
                    n2 = geo.count(t + kPrefetchTiles);
      pf.add(in.lab.p, label_bytes(in.lab), b2 * in.lb + q2 * in.lp, in.le, E, in.lp, n2);
      part_lines = pf.share(4);
      pf.step(part_lines);
    }
    if (maps) {
      if (b != cur_b) {
        cur_b = b;
        next_map = std::max<int64_t>(0, j - geo.ahead);
        win.reset(next_map * kTile);
      }
      const int64_t last = std::min(geo.tiles_per_batch - 1, j + geo.ahead);
      const int64_t keep = std::max<int64_t>(0, j - geo.ahead) * kTile;
      for (; next_map <= last; ++next_map) {
        const int64_t q0 = next_map * kTile, m = std::min(kTile, geo.P - q0);
        const int64_t id = b * geo.tiles_per_batch + next_map;
        win.fit(keep, q0, q0 + m);
        c.n = m;
        ring.tag[ring.point(c, id, tv)] = id;
        load_target_at(in, b * in.tb + q0 * in.tp, m, c.valid, c.yf, c.y, tv);
        point_logits(c, in, in.x + b * in.xb + q0 * in.xp, K, E + 2, m, in_place);
        c.vm_out = win.vm_at(q0);
        c.mapD = win.D_at(q0);
        c.mapS = win.S_at(q0);
        maps_tile<ISA>(c);
        pf.step(part_lines);
      }
      // The tile's routing, gate term and target, from when its map tile was made.
      TORCH_CHECK(ring.tag[ring.point(c, t, tv)] == t,
                  "deferredseg::loss_fused: routing ring out of step");
      c.routing_ready = true;
      point_masks(masks, geo, p0, n, c.hp, c.hn, own_p, own_n);
      c.vm = win.vm_at(p0);
      c.mapD = win.D_at(p0);
      c.mapS = win.S_at(p0);
    }
    c.n = n;
    if (!maps) load_target_at(in, b * in.tb + p0 * in.tp, n, c.valid, c.yf, c.y, tv);
    point_logits(c, in, in.x + b * in.xb + p0 * in.xp, 0, C, n, in_place);
    const int64_t bad_experts =
        load_experts_at(in, b * in.lb + p0 * in.lp, E, n, check_experts, tv, c.ck);
    if (check_experts) bad[t] = bad_experts;
    pf.step(part_lines);
    loss_tile<ISA>(c);
    pf.step(part_lines);
    if (in.g != nullptr)
      store_rows<ISA>(in.g + b * in.gb + p0 * in.gp, in.gc, in.gp, C, n, c.X, in.stream);
    double* row = part + t * kNumSums;
    for (int s = 0; s < kNumSums; ++s) row[s] = static_cast<double>(out[s]);
  }
  if (in.stream) stream_fence();
}

// The per-ISA copies of the workers and the dispatch between them.
#define DS_WORKER_VARIANTS(NAME, PARAMS, ARGS) \
  template <typename scalar_t>                 \
  void NAME##_base PARAMS {                    \
    NAME##_impl<kIsaBase> ARGS;                \
  }                                            \
  DS_WORKER_X86(NAME, PARAMS, ARGS)            \
  template <typename scalar_t>                 \
  void NAME PARAMS {                           \
    DS_WORKER_X86_DISPATCH(NAME, ARGS)         \
    NAME##_base ARGS;                          \
  }
#if DS_X86_VARIANTS
#define DS_WORKER_X86(NAME, PARAMS, ARGS) \
  template <typename scalar_t>            \
  DS_TARGET_V3 void NAME##_v3 PARAMS {    \
    NAME##_impl<kIsaV3> ARGS;             \
  }                                       \
  template <typename scalar_t>            \
  DS_TARGET_V4 void NAME##_v4 PARAMS {    \
    NAME##_impl<kIsaV4> ARGS;             \
  }
#define DS_WORKER_X86_DISPATCH(NAME, ARGS)                \
  if constexpr (!std::is_same<scalar_t, double>::value) { \
    switch (cpu_isa()) {                                  \
      case kIsaV4:                                        \
        return NAME##_v4 ARGS;                            \
      case kIsaV3:                                        \
        return NAME##_v3 ARGS;                            \
      default:                                            \
        break;                                            \
    }                                                     \
  }
#else
#define DS_WORKER_X86(NAME, PARAMS, ARGS)
#define DS_WORKER_X86_DISPATCH(NAME, ARGS)
#endif

#define DS_STATS_PARAMS                                                                   \
  (const Inputs<scalar_t>& in, const Geometry& geo,                                       \
   const TileCtx<typename AccType<scalar_t>::type>& base, bool check_experts, int64_t t0, \
   int64_t t1, double* part)
#define DS_FUSED_PARAMS                                                                   \
  (const Inputs<scalar_t>& in, const Geometry& geo,                                       \
   const TileCtx<typename AccType<scalar_t>::type>& base, bool check_experts, int64_t t0, \
   int64_t t1, double* part, int64_t* bad)
DS_WORKER_VARIANTS(stats_worker, DS_STATS_PARAMS, (in, geo, base, check_experts, t0, t1, part))
DS_WORKER_VARIANTS(fused_worker, DS_FUSED_PARAMS, (in, geo, base, check_experts, t0, t1, part, bad))

DS_FP_REGION_END

// Adds the rows of `part` (tiles x width) in tile order.
inline std::vector<double> sum_rows(const std::vector<double>& part, int64_t tiles, int64_t width) {
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t s = 0; s < width; ++s) total[s] += part[t * width + s];
  }
  return total;
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const LossProblem& pb, GradOut* grad) {
  Inputs<scalar_t> in{};
  static_cast<LossStrides&>(in) = loss_strides(pb, grad != nullptr ? &grad->flat : nullptr);
  in.x = pb.x.data_ptr<scalar_t>();
  in.t = label_ptr(pb.target);
  in.lab = label_ptr(pb.labels);
  if (grad != nullptr) {
    in.g = grad->flat.data_ptr<scalar_t>();
    in.stream = grad->flat.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  }
  return in;
}

// Runs the body with scalar_t = the logits dtype.
#define DS_DISPATCH_LOSS(PB, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (PB).x.scalar_type(), NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------
// loss_stats
// ---------------------------------------------------------------------------
at::Tensor loss_stats_cpu(const at::Tensor& logits, const at::Tensor& target,
                          const at::Tensor& expert_labels,
                          const c10::optional<at::Tensor>& class_weight, int64_t num_classes,
                          int64_t num_experts, int64_t ignore_index, bool check_expert_labels) {
  const char* op = "deferredseg::loss_stats (CPU kernel)";
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU");
  const LossCall call = prepare_stats(op, logits, target, expert_labels, class_weight, num_classes,
                                      num_experts, ignore_index);
  const LossProblem& pb = call.pb;
  const at::Tensor& cw = call.cw;
  const Geometry geo(pb);
  const int64_t E = pb.E;
  at::Tensor stats = at::zeros({stats_len(E)}, logits.options().dtype(at::kDouble));
  if (geo.tiles == 0) return stats;
  const int64_t width = stats_len(E);  // a tile's row: its share of every stat
  std::vector<double> part(static_cast<size_t>(geo.tiles * width), 0.0);
  DS_DISPATCH_LOSS(pb, "loss_stats_cpu", [&] {
    using T = typename AccType<scalar_t>::type;
    TileCtx<T> base;
    base.K = pb.K;
    base.E = E;
    base.nd = pb.nd;
    base.cw = cw.defined() ? cw.data_ptr<T>() : nullptr;
    base.fast = std::is_same<T, float>::value && E <= kFastMaxExperts && cpu_fast_paths();
    const auto in = make_inputs<scalar_t>(pb, nullptr);
    at::parallel_for(0, geo.tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
      stats_worker<scalar_t>(in, geo, base, check_expert_labels, t0, t1, part.data());
    });
  });
  const std::vector<double> tot = sum_rows(part, geo.tiles, width);
  std::copy(tot.begin(), tot.end(), stats.data_ptr<double>());
  return stats;
}

// ---------------------------------------------------------------------------
// loss_fused
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& expert_labels,
    const c10::optional<at::Tensor>& class_weight, const at::Tensor& stats,
    const c10::optional<at::Tensor>& balance_low, const c10::optional<at::Tensor>& balance_high,
    int64_t num_classes, int64_t num_experts, int64_t ignore_index, c10::ArrayRef<double> fparams,
    c10::ArrayRef<int64_t> iparams, bool compute_grad) {
  const char* op = "deferredseg::loss_fused (CPU kernel)";
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU");
  const LossCall call =
      prepare_fused(op, logits, target, expert_labels, class_weight, stats, balance_low,
                    balance_high, num_classes, num_experts, ignore_index, fparams, iparams,
                    /*check_experts_supported=*/true);
  const LossProblem& pb = call.pb;
  const LossParams& params = call.params;
  const at::Tensor &low = call.low, &high = call.high, &cw = call.cw;
  const Geometry geo(pb);
  const int64_t E = pb.E;
  const double* sv = call.stats.data_ptr<double>();
  const int64_t n_stats = call.stats.numel();

  // Gradient factors from the stats (double, then the accumulation type).
  std::vector<double> dS(static_cast<size_t>(E + 1), 0.0);
  balance_term(sv, n_stats, E, params.balance, low.data_ptr<double>(), high.data_ptr<double>(),
               dS.data());
  const GradScales scales = grad_scales(sv, E, params);

  GradOut gout;
  if (compute_grad) gout = make_grad_out(logits, pb, grad_buffer(logits));
  std::vector<double> part(static_cast<size_t>(geo.tiles * kNumSums), 0.0);
  std::vector<int64_t> bad(params.check_experts ? static_cast<size_t>(geo.tiles) : 0, 0);

  if (geo.tiles > 0) {
    DS_DISPATCH_LOSS(pb, "loss_fused_cpu", [&] {
      using T = typename AccType<scalar_t>::type;
      std::vector<T> bal(static_cast<size_t>(E + 1));
      for (int64_t k = 0; k <= E; ++k)
        bal[k] = static_cast<T>(params.lambda_balance * params.balance_grad_scale * dS[k]);
      TileCtx<T> base;
      base.K = pb.K;
      base.E = E;
      base.nd = pb.nd;
      for (int d = 0; d < kMaxSpatial; ++d) {
        base.st[d] = pb.st[d];
        base.scale_coh[d] = static_cast<T>(scales.coh[d]);
      }
      base.params = params;
      base.grad = compute_grad;
      base.scale_seg = static_cast<T>(scales.seg);
      base.scale_collab = static_cast<T>(scales.collab);
      base.scale_gate = static_cast<T>(scales.gate);
      base.bal = bal.data();
      base.cw = cw.defined() ? cw.data_ptr<T>() : nullptr;
      base.fast = std::is_same<T, float>::value && E <= kFastMaxExperts && cpu_fast_paths();
      const auto in = make_inputs<scalar_t>(pb, compute_grad ? &gout : nullptr);
      at::parallel_for(0, geo.tiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
        fused_worker<scalar_t>(in, geo, base, params.check_experts, t0, t1, part.data(),
                               bad.data());
      });
    });
  }
  if (params.check_experts) {
    int64_t n_bad = 0;
    for (const int64_t v : bad) n_bad += v;
    TORCH_CHECK_VALUE(n_bad == 0, "expert_labels must hold labels in [0, ", pb.num_labels,
                      ") or ignore_index=", pb.ignore_index, ", got ", n_bad, " value(s) outside");
  }
  const std::vector<double> sums = sum_rows(part, geo.tiles, kNumSums);
  double terms_d[kTermsLen];
  assemble_terms(sums.data(), sv, n_stats, E, pb.nd, params, low.data_ptr<double>(),
                 high.data_ptr<double>(), terms_d);
  at::Tensor terms = at::empty({kTermsLen}, logits.options().dtype(at::kDouble));
  std::copy(terms_d, terms_d + kTermsLen, terms.data_ptr<double>());
  terms = terms.to(call.acc);
  at::Tensor grad = compute_grad ? finish_grad(gout) : at::empty({0}, logits.options());
  return {terms, grad};
}

}  // namespace cpu_loss

TORCH_LIBRARY_IMPL(deferredseg, CPU, m) {
  m.impl("loss_stats", &cpu_loss::loss_stats_cpu);
  m.impl("loss_fused", &cpu_loss::loss_fused_cpu);
}

}  // namespace deferredseg
