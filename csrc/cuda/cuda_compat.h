// What the .cu files use of the CUDA runtime and of c10's CUDA layer, behind macros,
// so that the same source also builds as plain C++ against the CPU emulation in
// emulation.h (-DDS_CUDA_EMULATION; the test suite's check of the CUDA kernels).
//   DS_LAUNCH(grid, block, stream, kernel)(args...)   kernel<<<grid, block, 0, stream>>>(args...)
//   DS_LAUNCH_CHECK()          after a launch
//   DS_DEVICE_GUARD(t)         makes t's device current for the scope
//   DS_CURRENT_STREAM()        the current stream of that device
//   DS_ON_DEVICE(t)            t lives where the kernels run (CUDA; CPU when emulated)
#pragma once

#ifdef DS_CUDA_EMULATION
#include "emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define DS_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#define DS_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define DS_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard ds_device_guard_((tensor).device())
#define DS_CURRENT_STREAM() c10::cuda::getCurrentCUDAStream().stream()
#define DS_ON_DEVICE(tensor) (tensor).is_cuda()
#endif
