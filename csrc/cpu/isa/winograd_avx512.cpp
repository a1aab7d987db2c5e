// The Winograd kernel built for AVX-512 (F, VL, BW, DQ) + FMA (csrc/cpu/isa/winograd_variant.h): the
// same 8-wide GEMM as the AVX2 variant, with the EVEX encodings and 32 vector registers, and the
// filter transform 16 lanes wide.
#define HF_ISA_NS isa_avx512
#define HF_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#define HF_ISA_ENTRY winograd_kernels_avx512
#define HF_FILTER_LANES 16  // 32 registers: the filter transform takes whole 64-byte lines
#include "cpu/isa/winograd_variant.h"
