// The Winograd kernel built for AVX2 + FMA (csrc/cpu/isa/winograd_variant.h).
#define HF_ISA_NS isa_avx2
#define HF_ISA_TARGET "avx2,fma,f16c"
#define HF_ISA_ENTRY winograd_kernels_avx2
#include "cpu/isa/winograd_variant.h"
