// The Winograd kernel for the baseline ISA (x86-64: SSE2; elsewhere, whatever the compiler targets).
// vf8 (32 bytes) passed by value without AVX has another calling convention than with it: GCC warns,
// but every such function is internal to this file's namespace, so no call crosses the two ABIs.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define HF_ISA_NS isa_base
#include "cpu/winograd_core.h"
#include "cpu/conv_gemm_core.h"
#include "cpu/conv_few_cin_core.h"
#include "cpu/conv_gemm_cols_core.h"
#include "cpu/seg_head_core.h"

namespace hrnet_fast {
WinogradKernels winograd_kernels_base() {
  using namespace isa_base;
  return {&winograd_task<2>, &winograd_task<4>, &weight_transform<2>, &weight_transform<4>, kGemmPanels, &conv_gemm_rows,
          &conv_few_cin_rows, &conv_gemm_cols_gather, &conv_gemm_cols, &conv_gemm_cols_sum, &seg_head_rows};
}
}  // namespace hrnet_fast
