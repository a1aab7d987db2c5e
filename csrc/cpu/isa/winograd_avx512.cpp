// The Winograd kernel built for AVX-512 (F, VL, BW, DQ) + FMA (csrc/cpu/isa/winograd_variant.h): the
// same 8-wide code as the AVX2 variant, with the EVEX encodings and 32 vector registers.
#define HF_ISA_NS isa_avx512
#define HF_ISA_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"
#define HF_ISA_ENTRY winograd_kernels_avx512
#include "cpu/isa/winograd_variant.h"
