// The x86-64-v4 (AVX-512) copies of the CPU loss kernels' tile computations: the entry
// points stats_tile_v4, maps_tile_v4 and loss_tile_v4 of loss_tile.h, compiled with
// that instruction set (every step they call is inlined into them). A translation unit of
// their own, so that a parallel build compiles them beside loss_cpu.cpp; nothing here on
// other targets or in a build with DS_NO_ISA_VARIANTS (isa.h).
#define DS_TILE_ENTRIES_V4

// isa.h first: it includes loss_pixel.h under the kernels' floating-point setting.
#include "isa.h"

#include "../loss.h"
#include "loss_tile.h"
