// Host-device portability for kernel bodies shared by csrc/cpu and csrc/cuda.
#pragma once

#include <cstdint>

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

// Launch shape of the elementwise kernels (fuse_multi_res, conv_bias_act's epilogue): 256 threads a
// block, enough blocks to cover `units` up to kElementwiseMaxBlocks (enough to fill any current GPU);
// their grid-stride loops cover the rest.
constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 8192;
inline int64_t elementwise_blocks(int64_t units) {
  const int64_t blocks = (units + kElementwiseThreads - 1) / kElementwiseThreads;
  return blocks < 1 ? 1 : (blocks > kElementwiseMaxBlocks ? kElementwiseMaxBlocks : blocks);
}

// Which path of an elementwise kernel runs: `vector` (one thread per 16 bytes of channels, NHWC) or one
// element a thread; `wide` (64-bit index math) or 32-bit; `units` is what the grid covers.
struct ElementwisePlan {
  bool vector, wide;
  int64_t units;
};

// Whether the 32-bit index math could overflow: offsets reach the largest tensor's size plus one grid stride.
inline bool needs_wide_indices(int64_t largest_numel) {
  return largest_numel + kElementwiseMaxBlocks * kElementwiseThreads >= (int64_t{1} << 31);
}

// Whether `p` can be read as Vec16 (null counts as aligned: an absent input is never read).
inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }
