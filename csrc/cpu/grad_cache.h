// The CPU kernels' cached gradient buffer (grad_cache.cpp): the buffer loss_fused
// writes a large gradient into, and the op that frees it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace deferredseg {
namespace cpu_loss {

// A gradient at least this large is written with non-temporal stores (see stream_row
// in tile_io.h): it would not stay in a core's cache anyway. The cache keeps only
// gradients of this size or more.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// The gradient tensor for `logits` to write: a new tensor over the cached buffer
// (reused when nothing else holds it), or undefined when the cache does not apply
// (make_grad_out of loss.h then allocates).
at::Tensor grad_buffer(const at::Tensor& logits);

// The op `deferredseg::empty_cpu_cache` (kEmptyCpuCacheSchema of schemas.h): frees
// the cached buffer; returns the bytes released.
int64_t empty_cpu_cache();

}  // namespace cpu_loss
}  // namespace deferredseg
