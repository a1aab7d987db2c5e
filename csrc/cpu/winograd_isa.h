// What the Winograd driver (csrc/cpu/conv3x3_winograd.cpp, built for the baseline x86-64 ISA) and its
// per-ISA kernels (csrc/cpu/isa/winograd_<isa>.cpp) share: the problem's geometry, one task's
// arguments, and the per-ISA entry points. Plain data only: no ISA-specific code is in this header.
#pragma once

#include <cstdint>

namespace hrnet_fast {

constexpr int kMr = 6;   // micro-kernel rows (tiles)
constexpr int kNr = 16;  // micro-kernel columns (output channels): two vectors

// cin/cout: the conv's channels; cinp: V's row length (vectors of 8; the GEMM reads the first cin);
// coutp: the GEMM's N, padded to whole 16-wide panels with the transformed weight's zero columns.
struct WinogradGeometry {
  int64_t n, h, w, cin, cout, cinp, coutp, tiles_h, tiles_w, tiles;
};


// One task of the driver's split: tiles [t0, t0 + nt) (ntp: nt rounded up to kMr), output panels
// [j0, j1) of 16 channels, with the calling thread's V and Mt scratch. The weight is either the packed
// transformed U (positions u_stride floats apart), or (u null) the dense IHWO weight w, each panel transformed into ubuf
// ([K*K][cin][16]) as the task reaches it.
struct WinogradTask {
  const float* x;
  const float* u;
  int64_t u_stride;  // floats between u's positions
  const float* w;
  float* ubuf;
  const float* bias;
  const float* residual;
  bool relu;
  const WinogradGeometry* g;
  float* y;
  float* vbuf;
  float* mbuf;
  int64_t t0, nt, ntp, j0, j1;
};

using WinogradTaskFn = void (*)(const WinogradTask&);

// Floats between the K*K position planes of the kernel's scratch buffers (V, Mt, a U panel, a whole U
// transformed on the call), for planes of `floats` each: one cache line more. The transforms write
// (or read) one line in every plane per tile or channel, and planes are mostly a multiple of 4 KiB
// (64 channels x 16 tiles, ...): packed back to back, all K*K lines of a tile fall into one L1 set
// and evict each other. Unpadded, transforming W32's 64-channel weights on each call took 2.3x as
// long as the whole convolution with them transformed ahead.
constexpr int64_t plane_stride(int64_t floats) { return floats + 16; }
// The filter transform of input channels [ci0, ci1): (w [cin][3][3][cout], cin, cout, ci0, ci1, u, us),
// positions us floats apart in u.
using WinogradWeightFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

// Rows [r0, r1) of a 1x1 stride-1 conv in NHWC, y = act(x W^T + bias + residual): x [rows][cin],
// y and residual [rows][cout], wp the weight packed into 16-wide panels [coutp/16][cin][16] (the
// channels past cout zero). conv1x1_core.h.
struct Conv1x1Task {
  const float* x;
  const float* wp;
  const float* bias;
  const float* residual;
  float* y;
  int64_t cin, cout, coutp, r0, r1;
  bool relu;
};
using Conv1x1Fn = void (*)(const Conv1x1Task&);
// The widest C_in the 1x1 kernel takes (its short last group of rows is copied to the stack).
constexpr int64_t kConv1x1MaxCin = 1024;

// The task functions of one instruction set, for F(2x2) and F(4x4), and their filter transforms.
struct WinogradKernels {
  WinogradTaskFn m2, m4;
  WinogradWeightFn w2, w4;
  int gemm_panels;  // 16-wide panels per GEMM call (2 where the GEMM is 16 lanes): a task's U buffer holds as many
  Conv1x1Fn conv1x1;
};

// One per csrc/cpu/isa/winograd_<isa>.cpp; null members where the build has no such variant
// (the AVX2 and AVX-512 ones exist on x86-64 only).
WinogradKernels winograd_kernels_base();
WinogradKernels winograd_kernels_avx2();
WinogradKernels winograd_kernels_avx512();

}  // namespace hrnet_fast
