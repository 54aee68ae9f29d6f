// The gradient buffer of large inputs of the CPU loss kernel. Every training step asks for a new
// logits-sized gradient; for a buffer of several MiB the C library hands the pages
// back to the system when it is freed, and the next step pays a page fault per 4 KiB
// page touched (on a 2-core VM, more than the kernel itself). So the CPU kernel keeps
// one buffer (the last one, when large) and reuses it as soon as nothing else holds
// its storage: no tensor, view or storage object of the caller's may still point at
// it. Each call returns a new tensor over that storage. `deferredseg_kernels.empty_cache()`
// frees it; DEFERREDSEG_CPU_GRAD_CACHE=0 turns the reuse off.
#include "grad_cache.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace deferredseg {
namespace cpu_loss {
namespace {

// The cache keeps gradients of kStreamBytes (grad_cache.h) to this many bytes.
constexpr int64_t kGradCacheMaxBytes = int64_t(256) << 20;

struct GradCache {
  std::mutex mu;
  at::Tensor t;
};
GradCache& grad_cache() {
  static GradCache* c = new GradCache();  // never destroyed: no teardown-order issues at exit
  return *c;
}
bool grad_cache_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("DEFERREDSEG_CPU_GRAD_CACHE");
    return !(env != nullptr && std::string(env) == "0");
  }();
  return on;
}

}  // namespace

at::Tensor grad_buffer(const at::Tensor& logits) {
  const int64_t bytes = logits.numel() * static_cast<int64_t>(logits.element_size());
  if (bytes < kStreamBytes || bytes > kGradCacheMaxBytes ||
      !logits.is_non_overlapping_and_dense() || !grad_cache_enabled()) {
    return at::Tensor();  // make_grad_out allocates
  }
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const bool reusable = c.t.defined() && c.t.storage().use_count() == 1 &&
                        c.t.scalar_type() == logits.scalar_type() &&
                        c.t.sizes().equals(logits.sizes()) &&
                        c.t.strides().equals(logits.strides());
  if (!reusable) {
    c.t = at::Tensor();  // release the old one first: no two buffers alive at once
    c.t = at::empty_like(logits);
  }
  return at::empty({0}, logits.options())
      .set_(c.t.storage(), c.t.storage_offset(), c.t.sizes(), c.t.strides());
}

int64_t empty_cpu_cache() {
  GradCache& c = grad_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int64_t bytes = c.t.defined() ? static_cast<int64_t>(c.t.storage().nbytes()) : 0;
  c.t = at::Tensor();
  return bytes;
}

}  // namespace cpu_loss
}  // namespace deferredseg
