// The CUDA kernels of csrc/cuda, compiled as plain C++ against the CPU emulation of
// csrc/cuda/emulation.h and registered, for CPU tensors, as the ops
// `deferredseg_cuda_emu::{route, loss_stats, loss_fused}` with the schemas of the
// `deferredseg` ops. Built by tests/test_cuda_emulation.py with -DDS_CUDA_EMULATION
// and a small DS_CUDA_EMU_MAX_BLOCKS.
#include <torch/library.h>

#include "../../csrc/cuda/loss_fused_cuda.cu"
#include "../../csrc/cuda/loss_stats_cuda.cu"
#include "../../csrc/cuda/route_cuda.cu"
#include "../../csrc/schemas.h"

TORCH_LIBRARY(deferredseg_cuda_emu, m) {
  m.def(deferredseg::kRouteSchema, &deferredseg::route_cuda);
  m.def(deferredseg::kLossStatsSchema, &deferredseg::cuda_loss::loss_stats_cuda);
  m.def(deferredseg::kLossFusedSchema, &deferredseg::cuda_loss::loss_fused_cuda);
}
