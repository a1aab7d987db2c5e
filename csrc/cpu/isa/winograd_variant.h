// One instruction-set variant of the Winograd kernel, included by csrc/cpu/isa/winograd_<isa>.cpp after
// it defines HF_ISA_NS (the variant's namespace), HF_ISA_TARGET (the compiler's target string) and
// HF_ISA_ENTRY (the function that hands out its kernels). csrc/cpu/cpu_isa.cpp runs a variant only
// where the CPU supports it. The standard headers come first, outside the target region, so their
// inline functions keep the baseline ISA wherever the linker merges them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/winograd_isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HF_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define HF_TARGET_BEGIN(t) HF_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define HF_TARGET_END HF_PRAGMA(clang attribute pop)
#else
#define HF_TARGET_BEGIN(t) HF_PRAGMA(GCC push_options) HF_PRAGMA(GCC target(t))
#define HF_TARGET_END HF_PRAGMA(GCC pop_options)
#endif

HF_TARGET_BEGIN(HF_ISA_TARGET)
#include "cpu/winograd_core.h"
#include "cpu/conv_gemm_core.h"
#include "cpu/conv_few_cin_core.h"
#include "cpu/conv_gemm_cols_core.h"
#include "cpu/seg_head_core.h"
HF_TARGET_END

namespace hrnet_fast {
WinogradKernels HF_ISA_ENTRY() {
  using namespace HF_ISA_NS;
  return {&winograd_task<2>, &winograd_task<4>, &weight_transform<2>, &weight_transform<4>, kGemmPanels, &conv_gemm_rows,
          &conv_few_cin_rows, &conv_gemm_cols_gather, &conv_gemm_cols, &conv_gemm_cols_sum, &seg_head_rows};
}
}  // namespace hrnet_fast
#else
namespace hrnet_fast {
WinogradKernels HF_ISA_ENTRY() { return {nullptr, nullptr, nullptr, nullptr, 1, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}; }  // not an x86-64 build: no such variant
}  // namespace hrnet_fast
#endif
