// The Winograd kernel built for AVX-512 (F, VL, BW, DQ) + FMA: the same 8-wide code, with the EVEX encodings and 32 vector registers. Run only where
// csrc/cpu/cpu_isa.cpp finds the CPU supports it. The standard headers come first, outside the
// target region, so their inline functions keep the baseline ISA wherever the linker merges them.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/winograd_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HF_ISA_NS isa_avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#endif
#include "cpu/winograd_core.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace hrnet_fast {
WinogradKernels winograd_kernels_avx512() { return {&isa_avx512::winograd_task<2>, &isa_avx512::winograd_task<4>}; }
}  // namespace hrnet_fast
#else
namespace hrnet_fast {
WinogradKernels winograd_kernels_avx512() { return {nullptr, nullptr}; }
}  // namespace hrnet_fast
#endif
