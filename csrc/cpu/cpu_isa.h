// Which instruction set the CPU kernels run: chosen once from what the CPU reports (as oneDNN and
// ONNX Runtime do), so one build runs on any x86-64 CPU and uses AVX2/AVX-512 where they exist.
// HRNET_FAST_CPU_ISA=base|avx2|avx512 (read once, on first use) or torch.ops.hrnet_fast.cpu_isa(use)
// forces one; a variant this CPU or this build cannot run is refused with the reason.
#pragma once

#include <cstdint>

#include "cpu/winograd_isa.h"

namespace hrnet_fast {

enum class CpuIsa { base = 0, avx2 = 1, avx512 = 2 };

// The variant in use (the best one this CPU and build support, unless forced).
CpuIsa active_cpu_isa();

// The Winograd task functions of `isa` (never null for a variant active_cpu_isa() can return).
WinogradKernels winograd_kernels(CpuIsa isa);

// U = G w G^T of a whole dense weight w (IHWO or panel-major), packed [(m+2)^2][ceil(cout/16)][cin][16]
// into u with positions us floats apart, in the active variant, across the threads
// (csrc/cpu/winograd_weight.cpp).
void winograd_transform_all(const DenseWeight& w, int64_t cin, int64_t cout, int m, float* u, int64_t us);

}  // namespace hrnet_fast
