// The Winograd kernel built for AVX-512 (F, VL, BW, DQ) + FMA (csrc/cpu/isa/winograd_variant.h): the
// GEMM and the filter transform 16 lanes wide, with the EVEX encodings and 32 vector registers; the
// input and output transforms 8 wide, as in the AVX2 variant.
#define HF_ISA_NS isa_avx512
#define HF_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#define HF_ISA_ENTRY winograd_kernels_avx512
#define HF_FILTER_LANES 16  // 32 registers: the filter transform takes whole 64-byte lines
#define HF_GEMM_LANES 16    // 6x32 micro-kernel: two 16-wide panels a call (winograd_core.h)
#include "cpu/isa/winograd_variant.h"
