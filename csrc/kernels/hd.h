// Host-device portability for kernel bodies shared by csrc/cpu and csrc/cuda.
#pragma once

#if defined(__CUDACC__)
#define HF_HD __host__ __device__ __forceinline__
#else
#define HF_HD inline
#endif
