// Host-device portability for kernel bodies shared by csrc/cpu and csrc/cuda.
#pragma once

#if defined(__CUDACC__)
#define HF_HD __host__ __device__ __forceinline__
#else
#define HF_HD inline
#endif

// 16 bytes of T: the unit of one vector load or store (4 float32, 8 half). Kernels read through it
// only where the address is 16-byte aligned, which the host code checks before choosing them.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kLen = 16 / static_cast<int>(sizeof(T));
  T v[kLen];
};
