// A CPU emulation of the few CUDA features the kernels in this folder use, so that the
// .cu files, compiled as plain C++ with -DDS_CUDA_EMULATION, run on a machine without
// a GPU. The test suite builds them this way (tests/cuda_emu) and checks the CUDA
// kernels' indexing, reductions and formulas against the reference in CI, which has
// no GPU. It is not a general CUDA emulator, and it does not check the device's own
// math functions, its memory model or its speed.
//
// Model: a grid's blocks run one after another on the calling thread. The threads of
// a block are fibers (ucontext) on that same thread; a fiber runs until it reaches a
// barrier, so `__shared__` variables are plain statics, shared by the block's threads.
//   __syncthreads()        waits until every thread of the block that has not
//                          returned is waiting there;
//   __shfl_down_sync(...)  exchanges through a per-warp buffer between two waits of
//                          the warp's 32 threads (full mask only).
// A barrier that can never open (threads of a block waiting at different barriers,
// part of a warp in a shuffle) is CUDA's undefined behaviour; here it raises an error
// naming the kernel's block, instead of hanging.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace ds_emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

}  // namespace ds_emu

using ds_emu::dim3;
using cudaStream_t = void*;

// The built-in variables, set by the scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace ds_emu {

enum class State { Ready, WarpWait, BlockWait, Done };

constexpr size_t kStackBytes = size_t(256) << 10;
constexpr int kWarp = 32;

struct Fiber {
  ucontext_t ctx;
  State state = State::Ready;
  std::unique_ptr<char[]> stack;
};

// The block being run. One at a time in the process (launches hold a mutex).
struct Scheduler {
  std::vector<Fiber> fibers;
  ucontext_t main_ctx;
  int current = -1;
  const void* body = nullptr;           // the launch's kernel call (a lambda) ...
  void (*call)(const void*) = nullptr;  // ... which call(body) runs for the current thread
  std::vector<uint64_t> shuffle;        // a slot a thread, kWarp a warp
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

inline void fiber_entry() {
  Scheduler& s = sched();
  s.call(s.body);
  s.fibers[s.current].state = State::Done;
  swapcontext(&s.fibers[s.current].ctx, &s.main_ctx);
}

// Suspends the current thread until the scheduler releases the barrier it waits at.
inline void wait_at(State st) {
  Scheduler& s = sched();
  Fiber& f = s.fibers[s.current];
  f.state = st;
  swapcontext(&f.ctx, &s.main_ctx);
}

inline void set_thread(int t) {
  threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
}

// Runs every thread of the current block (blockIdx, blockDim set) to completion.
inline void run_block() {
  Scheduler& s = sched();
  const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  if (static_cast<int>(s.fibers.size()) < n) s.fibers.resize(n);
  s.shuffle.assign(static_cast<size_t>(n), 0);  // whole warps (launch checks)
  for (int t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
  }
  for (;;) {
    for (int t = 0; t < n; ++t) {
      if (s.fibers[t].state != State::Ready) continue;
      s.current = t;
      set_thread(t);
      swapcontext(&s.main_ctx, &s.fibers[t].ctx);
    }
    // Every thread now waits at a barrier or has returned.
    bool released = false, all_done = true;
    for (int w0 = 0; w0 < n; w0 += kWarp) {
      bool full = true;
      for (int t = w0; t < w0 + kWarp; ++t) full = full && s.fibers[t].state == State::WarpWait;
      if (full) {
        for (int t = w0; t < w0 + kWarp; ++t) s.fibers[t].state = State::Ready;
        released = true;
      }
    }
    if (released) continue;
    bool block_barrier = true;
    for (int t = 0; t < n; ++t) {
      const State st = s.fibers[t].state;
      all_done = all_done && st == State::Done;
      block_barrier = block_barrier && (st == State::Done || st == State::BlockWait);
    }
    if (all_done) return;
    if (!block_barrier) {
      throw std::runtime_error("CUDA emulation: block (" + std::to_string(blockIdx.x) + ", " +
                               std::to_string(blockIdx.y) +
                               ") deadlocked: its threads wait at "
                               "different barriers, or part of a warp waits in a shuffle");
    }
    for (int t = 0; t < n; ++t) {
      if (s.fibers[t].state == State::BlockWait) s.fibers[t].state = State::Ready;
    }
  }
}

template <typename F>
void call_thunk(const void* f) {
  (*static_cast<const F*>(f))();
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs kernel(args...) on every thread of a grid x block launch.
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, void (*kernel)(P...), A&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0) {
    throw std::runtime_error("CUDA emulation: a launch with an empty grid or block is invalid");
  }
  if ((block.x * block.y * block.z) % kWarp != 0 || block.x * block.y * block.z > 1024) {
    throw std::runtime_error("CUDA emulation: blocks must be whole warps and at most 1024 threads");
  }
  // The parameters, converted once as a launch does; each thread gets its own copies.
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  std::lock_guard<std::mutex> lock(launch_mutex());
  Scheduler& s = sched();
  s.body = &body;
  s.call = &call_thunk<decltype(body)>;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block();
      }
    }
  }
}

// DS_LAUNCH(grid, block, stream, kernel)(args...): the emulated
// `kernel<<<grid, block, 0, stream>>>(args...)`.
template <typename... P>
struct Launcher {
  dim3 grid, block;
  void (*kernel)(P...);
  Launcher(dim3 g, dim3 b, void (*k)(P...)) : grid(g), block(b), kernel(k) {}
  template <typename... A>
  void operator()(A&&... args) const {
    launch(grid, block, kernel, std::forward<A>(args)...);
  }
};
template <typename... P>
Launcher(dim3, dim3, void (*)(P...)) -> Launcher<P...>;

}  // namespace ds_emu

inline void __syncthreads() { ds_emu::wait_at(ds_emu::State::BlockWait); }

// Lane `lane + delta` of the warp's `v`, or the caller's own `v` past the warp's end.
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = ds_emu::kWarp) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(uint64_t),
                "CUDA emulation: shuffles of values up to 8 bytes");
  if (mask != 0xffffffffu || width != ds_emu::kWarp) {
    std::fprintf(stderr, "CUDA emulation: only full-warp shuffles are emulated\n");
    std::abort();  // cannot throw through a fiber
  }
  ds_emu::Scheduler& s = ds_emu::sched();
  const int t = s.current, lane = t % ds_emu::kWarp;
  uint64_t* slots = s.shuffle.data() + (t - lane);
  std::memcpy(&slots[lane], &v, sizeof(T));
  ds_emu::wait_at(ds_emu::State::WarpWait);
  T r = v;
  if (lane + static_cast<int>(delta) < ds_emu::kWarp)
    std::memcpy(&r, &slots[lane + delta], sizeof(T));
  ds_emu::wait_at(ds_emu::State::WarpWait);
  return r;
}

#define DS_LAUNCH(grid, block, stream, ...) ::ds_emu::Launcher(grid, block, __VA_ARGS__)
#define DS_LAUNCH_CHECK() \
  do {                    \
  } while (0)
#define DS_DEVICE_GUARD(tensor) \
  do {                          \
  } while (0)
#define DS_CURRENT_STREAM() static_cast<cudaStream_t>(nullptr)
#define DS_ON_DEVICE(tensor) (tensor).is_cpu()
