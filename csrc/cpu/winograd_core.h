// The Winograd kernel's per-ISA part: input transform, the 6x16 GEMM micro-kernel, output transform
// with the epilogue, and one task of them. Included once by each csrc/cpu/isa/winograd_<isa>.cpp
// with HF_ISA_NS naming a namespace of its own and the instruction set enabled around the include,
// so every function here (and every template it instantiates, winograd.h's included) exists once per
// ISA under its own name: nothing compiled for AVX2 can be merged into code the baseline runs.
// Torch-free on purpose, for the same reason (torch's inline functions would be compiled per ISA too).
#pragma once

#ifndef HF_ISA_NS
#error "define HF_ISA_NS (the variant's namespace) before including winograd_core.h"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/winograd_isa.h"
#include "kernels/winograd.h"

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {  // internal to each variant's file: called directly, never through the PLT

// 8 floats: GCC/Clang vector extensions compile to AVX2 (and FMA under -mfma) where available and
// to correct scalar or SSE code elsewhere. vf8u is the unaligned-access alias for load8; the
// transforms take vf8 pointers (a template drops the alias's alignment), so the V and Mt buffers, and
// x where it is read as vectors in place (C_in a multiple of 8), are kept 32-byte aligned.
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4)));

inline vf8 load8(const float* p) { return *reinterpret_cast<const vf8u*>(p); }
// The first n < 8 lanes, for a channel count that is not a multiple of 8 (the rest read as 0).
inline vf8 load_n(const float* p, int n) {
  vf8 v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
inline void store_n(float* p, vf8 v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
// The filter transform's vector: 16 floats, one cache line, where the variant has 32 vector
// registers of 16 (AVX-512 defines HF_FILTER_LANES 16); else 8, twice per line: a tile's 9 taps at 16
// lanes would take 18 of AVX2's 16 registers (that way its transform ran 1.8x slower).
#ifndef HF_FILTER_LANES
#define HF_FILTER_LANES 8
#endif
constexpr int kFilterLanes = HF_FILTER_LANES;
typedef float vfl __attribute__((vector_size(kFilterLanes * 4)));
typedef float vflu __attribute__((vector_size(kFilterLanes * 4), aligned(4)));
inline vfl load_fl(const float* p, int n) {
  if (n == kFilterLanes) return *reinterpret_cast<const vflu*>(p);
  vfl v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

// Two-source shuffles with constant lane lists, as x86 compilers map them onto its in-lane unpacks and
// 128-bit lane shuffles.
#if defined(__clang__)
#define HF_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int vfl_index __attribute__((vector_size(kFilterLanes * 4)));
#define HF_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vfl_index{__VA_ARGS__})
#endif

// r[0..L) (L = kFilterLanes vectors of L) transposed in place, the usual way: interleave pairs of rows
// by 32-bit then 64-bit elements within each 128-bit lane, then gather 128-bit lanes (one round at 8
// lanes, two at 16). Only in-lane unpacks and lane shuffles: a first version interleaving whole rows
// (log2 L rounds of cross-lane two-source permutes) made the OIHW filter transform of W32's 256-channel
// 8x6 conv ~1.04x slower than reading panel-major.
inline void transpose_fl(vfl* r) {
  constexpr int L = kFilterLanes;
  vfl t[L], u[L];
  for (int p = 0; p < L / 2; ++p) {
#if HF_FILTER_LANES == 16
    t[2 * p] = HF_SHUFFLE(r[2 * p], r[2 * p + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29);
    t[2 * p + 1] = HF_SHUFFLE(r[2 * p], r[2 * p + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
#else
    t[2 * p] = HF_SHUFFLE(r[2 * p], r[2 * p + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * p + 1] = HF_SHUFFLE(r[2 * p], r[2 * p + 1], 2, 10, 3, 11, 6, 14, 7, 15);
#endif
  }
  // u[4g + s], 128-bit lane q: column 4q + s of rows 4g .. 4g + 3
  for (int g = 0; g < L / 4; ++g) {
    for (int h = 0; h < 2; ++h) {
      const vfl a = t[4 * g + h], b = t[4 * g + h + 2];
#if HF_FILTER_LANES == 16
      u[4 * g + 2 * h] = HF_SHUFFLE(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
      u[4 * g + 2 * h + 1] = HF_SHUFFLE(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
#else
      u[4 * g + 2 * h] = HF_SHUFFLE(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * g + 2 * h + 1] = HF_SHUFFLE(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
#endif
    }
  }
  for (int s = 0; s < 4; ++s) {
#if HF_FILTER_LANES == 16
    // lanes 0 and 2, or 1 and 3, of each source
#define HF_EVEN(a, b) HF_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
#define HF_ODD(a, b) HF_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)
    const vfl a = HF_EVEN(u[s], u[4 + s]), b = HF_ODD(u[s], u[4 + s]);
    const vfl c = HF_EVEN(u[8 + s], u[12 + s]), d = HF_ODD(u[8 + s], u[12 + s]);
    r[s] = HF_EVEN(a, c), r[8 + s] = HF_ODD(a, c), r[4 + s] = HF_EVEN(b, d), r[12 + s] = HF_ODD(b, d);
#undef HF_EVEN
#undef HF_ODD
#else
    r[s] = HF_SHUFFLE(u[s], u[4 + s], 0, 1, 2, 3, 8, 9, 10, 11);
    r[4 + s] = HF_SHUFFLE(u[s], u[4 + s], 4, 5, 6, 7, 12, 13, 14, 15);
#endif
  }
}

// The GEMM's vector width: 16 lanes where the variant has 512-bit registers (AVX-512 defines
// HF_GEMM_LANES 16), whose FMAs do twice the work of two 8-lane ones on CPUs with two 512-bit FMA
// units (Intel's server cores); else 8.
#ifndef HF_GEMM_LANES
#define HF_GEMM_LANES 8
#endif
#if HF_GEMM_LANES == 16
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));
inline vf16 load16(const float* p) { return *reinterpret_cast<const vf16u*>(p); }
typedef vf16 vgemm;
// Two panels a call where they pair: per k, 12 FMAs for 8 loads (6 broadcasts of A, 2 rows of B), so
// the FMAs rather than the loads set the pace; 12 accumulators of the 32 registers. The Winograd GEMMs
// take four where the driver says so (WinogradTask::group: where U is whole, csrc/cpu/conv3x3_winograd.cpp).
constexpr int kGemmPanels = 2;
#else
typedef vf8 vgemm;
constexpr int kGemmPanels = 1;
#endif

// The epilogue micro_6xn can apply as it stores C (kEpilogue): act(A B (+ C) + bias + residual), bias
// (null: none) per column, stored to `out` (null: C itself) with the residual's rows (null: none)
// ldo floats apart (ldc where out is null).
struct MicroEpilogue {
  const float* bias;
  const float* residual;
  bool relu;
  float* out = nullptr;
  int64_t ldo = 0;
};

// A micro-kernel's kMr x NV accumulators out of the registers: into C (rows ldc floats apart), or
// (kEpilogue) act(acc + bias + residual) through `epi` (MicroEpilogue).
template <typename V, int NV, bool kEpilogue>
__attribute__((always_inline)) inline void micro_store(const V (&acc)[kMr][NV], float* __restrict__ c, int64_t ldc,
                                                       const MicroEpilogue& epi) {
  constexpr int L = sizeof(V) / sizeof(float);
  if constexpr (kEpilogue) {
    float* const out = epi.out ? epi.out : c;
    const int64_t ldo = epi.out ? epi.ldo : ldc;
    V bv[NV] = {};
    if (epi.bias)
      for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], epi.bias + v * L, sizeof(V));
#pragma GCC unroll 6
    for (int r = 0; r < kMr; ++r)
      for (int v = 0; v < NV; ++v) {
        V val = acc[r][v];
        if (epi.bias) val += bv[v];  // not + 0: -0 stays -0, as the unfused epilogue leaves it
        if (epi.residual) {
          V rv;
          std::memcpy(&rv, epi.residual + r * ldo + v * L, sizeof(V));
          val += rv;
        }
        if (epi.relu) val = val < 0.f ? V{} : val;  // torch.relu keeps NaN: v < 0 is false for NaN
        std::memcpy(out + r * ldo + v * L, &val, sizeof(V));
      }
    return;
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMr; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(c + r * ldc + v * L, &acc[r][v], sizeof(V));
}

// C[6][NV * L] = A[6][k] * B, L the lanes of V: A rows at stride lda; vector v of B's row p at
// b[v] + p * ldb (ldb = kNr: a packed [k][16] panel is two 8-lane vectors b, b + 8, or one 16-lane
// one, and two panels are two 16-lane ones; a direct conv's weight is read in place, ldb = C_out);
// C rows at ldc, vector v at c + v * L. The micro-kernel of every variant: 6x16 as two 8-lane vectors
// (AVX2, 12 accumulators of 16 registers), 6x16 or 6x32 at 16 lanes. kAccumulate: C += A B (C's block
// read first). pf_n > 0: also prefetch into L2 (prefetcht1) pf_n rows of pf_lines 64-byte lines,
// pf_stride bytes apart from pf (a row's lines pf_line_stride bytes apart), spread evenly over the k
// loop, so that a stream from memory overlaps the FMAs (the next panel's dense weight: winograd_task).
// kEpilogue: store act(C + bias + residual) (MicroEpilogue) straight from the registers. kBStep > 0: B's vectors are kBStep floats apart in its
// rows (b[1..] unused: conv_gemm's adjacent panels).
template <typename V, int NV, bool kAccumulate = false, bool kEpilogue = false, int kBStep = 0>
inline void micro_6xn(const float* __restrict__ a, int64_t lda, const float* const (&b)[NV], float* __restrict__ c,
                      int64_t ldc, int64_t k, const char* pf = nullptr, int64_t pf_stride = 0, int64_t pf_n = 0,
                      int pf_lines = 1, int64_t ldb = kNr, const MicroEpilogue& epi = {},
                      int64_t pf_line_stride = 64) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[kMr][NV] = {};
  if constexpr (kAccumulate)  // C += A B
    for (int r = 0; r < kMr; ++r)
      for (int v = 0; v < NV; ++v) std::memcpy(&acc[r][v], c + r * ldc + v * L, sizeof(V));
  // The FMAs of k steps [p0, p1): nothing else in the loop, so its row pointers and counters stay in
  // registers (with the prefetch bookkeeping in the same loop, GCC kept A's row pointers in vector
  // registers and moved them back every step: 4 more instructions per 12 FMAs). Here, where a 512-bit
  // FMA takes both 256-bit units, the spare issue slots hid them (the whole W32 the same, old and new
  // builds in alternating processes); on cores with two 512-bit FMA units they compete with the FMAs.
  // Always inlined: GCC 12 left the lambda out of line where micro_6xn prefetches (called twice), and
  // there the accumulators it updates through the capture were stored to memory every step, 12 stores
  // per 12 FMAs. W32 on an Intel Xeon, builds in alternating processes: batch 1 1.01-1.02x, batch 8
  // 0.99-1.12x (three pairs each).
  auto steps = [&](int64_t p0, int64_t p1) __attribute__((always_inline)) {
    for (int64_t p = p0; p < p1; ++p) {
      V w[NV];
      for (int v = 0; v < NV; ++v)  // unaligned loads
        std::memcpy(&w[v], (kBStep > 0 ? b[0] + v * kBStep : b[v]) + p * ldb, sizeof(V));
#pragma GCC unroll 6
      for (int r = 0; r < kMr; ++r) {
        const float ar = a[r * lda + p];
        for (int v = 0; v < NV; ++v) acc[r][v] += ar * w[v];
      }
    }
  };
  if (pf_n <= 0) {
    steps(0, k);
  } else {  // one row of lines every `every` steps
    const int64_t every = std::max<int64_t>(1, k / pf_n);
    int64_t issued = 0;
    for (int64_t p0 = 0; p0 < k; p0 += every) {
      if (issued < pf_n) {
        for (int l = 0; l < pf_lines; ++l) __builtin_prefetch(pf + issued * pf_stride + l * pf_line_stride, 0, 2);
        ++issued;
      }
      steps(p0, std::min(k, p0 + every));
    }
  }
  micro_store<V, NV, kEpilogue>(acc, c, ldc, epi);
}

// Step 1 for tiles [t0, t0 + nt): V[p][i][c]. Tiles whose K x K patch lies inside the image are transformed
// straight from x; the others (the image's border tiles: a quarter of the tiles at 64x48, all of them
// at 8x6) through a local patch whose positions outside the image are zeroed once per tile, the rest
// copied per channel vector. Both 16 channels at a time where the variant is 16 lanes wide and the
// channels come in whole 16s (HRNet's all do), else 8 (the last vector of an odd count zero-filled).
template <int M, typename V>
void input_tiles(const float* x, const WinogradGeometry& g, int64_t t0, int64_t nt, int64_t ntp, float* v) {
  constexpr int K = Winograd<M>::kTile, L = sizeof(V) / sizeof(float);
  const int64_t plane = plane_stride(ntp * g.cinp) / L, col = g.cinp / L;
  const int64_t vecs = (g.cin + L - 1) / L;
  const bool whole = g.cin % L == 0;
  V* vv = reinterpret_cast<V*>(v);
  V t[K * K], patch[K * K];
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t tile = t0 + i;
    const int64_t img = tile / (g.tiles_h * g.tiles_w), rem = tile % (g.tiles_h * g.tiles_w);
    const int64_t y0 = (rem / g.tiles_w) * M - 1, x0 = (rem % g.tiles_w) * M - 1;  // padding 1
    const float* base = x + img * g.h * g.w * g.cin;
    // the patch rows [r0, r1) and columns [q0, q1) inside the image
    const int r0 = static_cast<int>(std::max<int64_t>(0, -y0)), r1 = static_cast<int>(std::min<int64_t>(K, g.h - y0));
    const int q0 = static_cast<int>(std::max<int64_t>(0, -x0)), q1 = static_cast<int>(std::min<int64_t>(K, g.w - x0));
    if (r0 == 0 && q0 == 0 && r1 == K && q1 == K && whole) {
      typedef float Vu __attribute__((vector_size(L * 4), aligned(4)));
      const Vu* xv = reinterpret_cast<const Vu*>(base + (y0 * g.w + x0) * g.cin);
      for (int64_t c = 0; c < vecs; ++c) winograd_input_tile<M>(xv + c, g.w * col, col, vv + i * col + c, plane, t);
      continue;
    }
    for (int p = 0; p < K * K; ++p) patch[p] = V{};
    for (int64_t c = 0; c < vecs; ++c) {
      const int lanes = static_cast<int>(std::min<int64_t>(L, g.cin - c * L));
      for (int r = r0; r < r1; ++r) {
        const float* px = base + ((y0 + r) * g.w + x0) * g.cin + c * L;
        for (int q = q0; q < q1; ++q) {
          if (lanes == L) {
            std::memcpy(&patch[r * K + q], px + q * g.cin, sizeof(V));
          } else {
            V val = {};
            for (int l = 0; l < lanes; ++l) val[l] = px[q * g.cin + l];
            patch[r * K + q] = val;
          }
        }
      }
      winograd_input_tile<M>(patch, K, 1, vv + i * col + c, plane, t);
    }
  }
}

// V's rows past nt (up to ntp, a multiple of kMr) are zeroed, and channels past cin.
template <int M>
void input_transform(const float* x, const WinogradGeometry& g, int64_t t0, int64_t nt, int64_t ntp, float* v) {
  constexpr int K = Winograd<M>::kTile;
#if HF_GEMM_LANES == 16
  if (g.cin % 16 == 0)
    input_tiles<M, vf16>(x, g, t0, nt, ntp, v);
  else
#endif
    input_tiles<M, vf8>(x, g, t0, nt, ntp, v);
  const int64_t plane = plane_stride(ntp * g.cinp);
  for (int64_t i = nt; i < ntp; ++i)
    for (int p = 0; p < K * K; ++p) std::memset(v + p * plane + i * g.cinp, 0, g.cinp * sizeof(float));
}

// Y = A^T Mt A of one tile for one channel vector (V: 8 or 16 lanes; Mt's (a, b) at m[(a * K + b) * vs]),
// then y = act(Y + bias + residual) stored row by row: Y's rows are made one at a time from t = A^T Mt
// (M x K) and stored at once, so no M x M array of outputs is live beside t (the version that kept
// one spilled registers to the stack at AVX-512's 32). kRes and kRelu are template parameters and
// full tiles (every tile of an image whose sides are multiples of M) take a fully unrolled path.
// y and residual point at the tile's first pixel; rows are `row` floats apart, pixels `pix`.
template <int M, bool kRes, bool kRelu, typename V>
inline void output_tile_store(const V* m, int64_t vs, V b, const float* residual, float* y, int64_t row, int64_t pix,
                              int rows, int cols) {
  constexpr int K = Winograd<M>::kTile;
  V t[M * K];
  for (int c = 0; c < K; ++c) Winograd<M>::output(m + c * vs, K * vs, t + c, K);  // t = A^T Mt
  auto store_row = [&](int r, int n) {
    V o[M];
    Winograd<M>::output(t + r * K, 1, o, 1);  // row r of t A
    for (int q = 0; q < n; ++q) {
      V val = o[q] + b;
      if constexpr (kRes) {
        V rv;
        std::memcpy(&rv, residual + r * row + q * pix, sizeof(V));
        val += rv;
      }
      if constexpr (kRelu) val = val < 0.f ? V{} : val;  // torch.relu keeps NaN: v < 0 is false for NaN
      std::memcpy(y + r * row + q * pix, &val, sizeof(V));
    }
  };
  if (rows == M && cols == M) {
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r) store_row(r, M);
  } else {
    for (int r = 0; r < rows; ++r) store_row(r, cols);
  }
}

// Step 3: y for tiles [t0, t0 + nt) and channel vectors [c0, c1) from Mt[p][i][o], with bias,
// residual (kRes) and ReLU (kRelu).
template <int M, bool kRes, bool kRelu>
void output_transform(const float* mt, const WinogradGeometry& g, int64_t t0, int64_t nt, int64_t ntp, int64_t c0,
                         int64_t c1, const float* bias, const float* residual, float* y) {
  const int64_t plane = plane_stride(ntp * g.coutp) / 8, col = g.coutp / 8;
  const vf8* mv = reinterpret_cast<const vf8*>(mt);
#if HF_GEMM_LANES == 16
  const bool wide = g.cout % 16 == 0 && c0 % 2 == 0 && c1 % 2 == 0;
#endif
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t tile = t0 + i;
    const int64_t img = tile / (g.tiles_h * g.tiles_w), rem = tile % (g.tiles_h * g.tiles_w);
    const int64_t y0 = (rem / g.tiles_w) * M, x0 = (rem % g.tiles_w) * M;
    const int rows = static_cast<int>(std::min<int64_t>(M, g.h - y0)), cols = static_cast<int>(std::min<int64_t>(M, g.w - x0));
    const int64_t offset = ((img * g.h + y0) * g.w + x0) * g.cout, row = g.w * g.cout;
    const float* res = kRes ? residual + offset : nullptr;
#if HF_GEMM_LANES == 16
    if (wide) {
      const vf16* mv16 = reinterpret_cast<const vf16*>(mt);
      for (int64_t c = c0 / 2; c < c1 / 2; ++c) {
        const vf16 b = bias ? load16(bias + c * 16) : vf16{};
        output_tile_store<M, kRes, kRelu>(mv16 + i * (col / 2) + c, plane / 2, b, kRes ? res + c * 16 : nullptr,
                                          y + offset + c * 16, row, g.cout, rows, cols);
      }
      continue;
    }
#endif
    for (int64_t c = c0; c < std::min(c1, (g.cout + 7) / 8); ++c) {  // vectors past cout: padding only
      const int lanes = static_cast<int>(std::min<int64_t>(8, g.cout - c * 8));
      const vf8 b = !bias ? vf8{} : lanes == 8 ? load8(bias + c * 8) : load_n(bias + c * 8, lanes);
      if (lanes == 8) {
        output_tile_store<M, kRes, kRelu>(mv + i * col + c, plane, b, kRes ? res + c * 8 : nullptr, y + offset + c * 8,
                                          row, g.cout, rows, cols);
        continue;
      }
      // a last partial vector: through a local tile, whose lanes past cout are not stored
      constexpr int K = Winograd<M>::kTile;
      vf8 t[M * K], out[M * M];
      winograd_output_tile<M>(mv + i * col + c, plane, out, rows, t);
      for (int r = 0; r < rows; ++r) {
        for (int q = 0; q < cols; ++q) {
          const int64_t at = offset + (r * g.w + q) * g.cout + c * 8;
          vf8 val = out[r * M + q] + b;
          if (kRes) val += load_n(residual + at, lanes);
          if (kRelu) val = val < 0.f ? vf8{} : val;
          store_n(y + at, val, lanes);
        }
      }
    }
  }
}

// How far ahead (input channels) the per-panel filter transform prefetches the dense weight into L2.
// There the weight is read once, panel by panel (9 lines at a stride of C_out floats per channel),
// from memory, and the lines two channels ahead that L1 can hold in flight do not cover the latency:
// W32's 256-channel 8x6 conv at batch 1, weights cold, took 610 us on one thread without it and 437
// with it (1.4x; 1.1-1.2x on two threads, 1.1-1.17x for the 128-channel 16x12 one), measured in turns
// in one process (README, "Where the time goes"). Into L1 instead (prefetcht0) gained nothing.
constexpr int64_t kFarPrefetch = 32;

// filter_panels (below) of an OIHW weight (w.o floats between output channels, a channel's 9 taps
// contiguous): a block of kFilterLanes input channels is 9 * kFilterLanes contiguous floats an output
// channel, read as 9 vectors for each of the part's kFilterLanes channels and transposed in registers,
// 9 blocks of L x L, into the (channel, tap) vectors across output channels the transform takes. A
// partial block (the last channels, or the last panel's channels past C_out) is gathered lane by lane.
// The same values, so the same U bits, as the other layouts.
template <int M>
void filter_panels_oihw(const DenseWeight& w, int64_t rows, int64_t cout, int64_t j0, int64_t j1, int64_t ci0,
                        int64_t ci1, float* u, int64_t us, int64_t far, int64_t row0) {
  constexpr int K = Winograd<M>::kTile, L = kFilterLanes, kParts = kNr / L;
  vfl taps[kParts][9 * L];  // taps[part][c * 9 + k]: tap k of channel ci + c, across the part's lanes
  vfl tile[kParts == 1 ? 1 : K * K * kParts];
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t ci = ci0; ci < ci1; ci += L) {
      const int nc = static_cast<int>(std::min<int64_t>(L, ci1 - ci));
      for (int part = 0; part < kParts; ++part) {
        const int64_t o0 = j * kNr + part * L;
        const int lanes = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(L, cout - o0)));
        const float* src = w.data + o0 * w.o + ci * 9;
        if (far && ci + far < ci1)  // `far` channels ahead into L2: each channel's run of the block there
          for (int l = 0; l < lanes; ++l)
            for (int b = 0; b < 9 * L * 4 + 64; b += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(src + l * w.o + far * 9) + b, 0, 2);
        vfl* t = taps[part];
        if (lanes == L && nc == L) {
          for (int v = 0; v < 9; ++v) {
            vfl r[L];
            for (int l = 0; l < L; ++l) r[l] = load_fl(src + l * w.o + v * L, L);
            transpose_fl(r);
            for (int l = 0; l < L; ++l) t[v * L + l] = r[l];
          }
        } else {
          for (int e = 0; e < 9 * nc; ++e) {
            vfl r = {};
            for (int l = 0; l < lanes; ++l) r[l] = src[l * w.o + e];
            t[e] = r;
          }
        }
      }
      for (int c = 0; c < nc; ++c) {
        vfl* out = reinterpret_cast<vfl*>(u + ((j - j0) * rows + ci + c - row0) * kNr);
        for (int part = 0; part < kParts; ++part) {
          if constexpr (kParts == 1)
            winograd_filter_tile<M>(taps[part] + c * 9, 3, 1, out, us / kFilterLanes);
          else
            winograd_filter_tile<M>(taps[part] + c * 9, 3, 1, tile + part, kParts);
        }
        if constexpr (kParts > 1)
          for (int p = 0; p < K * K; ++p)
            for (int part = 0; part < kParts; ++part) out[p * (us / kFilterLanes) + part] = tile[p * kParts + part];
      }
    }
  }
}

// U = G w G^T of output panels [j0, j1) and input channels [ci0, ci1) of a dense weight w
// (channels past cout zero), into u: the 16 floats of (p, j, ci) at
// u + p * us + ((j - j0) * rows + ci - row0) * 16 (rows: u's channels a panel, from channel row0;
// C_in and 0 for a whole U). Each (channel, panel) is 9 loads of one 64-byte line (a panel's lines are
// one stream: at a stride of cout floats in IHWO, back to back panel-major) and the transform
// kFilterLanes wide. A whole line is stored at once: straight from the transform at 16 lanes, else through a local tile,
// because U's rows of positions may be a multiple of 4 KiB apart and a line written in halves would
// be evicted between them by the other positions' lines. `far`: prefetch distance into L2, in
// channels (0: none; kFarPrefetch where the weight comes from memory once per call).
template <int M>
void filter_panels(const DenseWeight& w, int64_t rows, int64_t cout, int64_t j0, int64_t j1, int64_t ci0,
                   int64_t ci1, float* u, int64_t us, int64_t far = 0, int64_t row0 = 0) {
  if (!w.lines_hold_panels()) return filter_panels_oihw<M>(w, rows, cout, j0, j1, ci0, ci1, u, us, far, row0);
  constexpr int K = Winograd<M>::kTile, kParts = kNr / kFilterLanes;
  vfl g[9], tile[kParts == 1 ? 1 : K * K * kParts];
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t ci = ci0; ci < ci1; ++ci) {
      const float* row = w.data + ci * w.ci + j * w.j;
      if (ci + 2 < ci1)  // two channels ahead: 18 lines in flight
        for (int k = 0; k < 9; ++k) __builtin_prefetch(row + 2 * w.ci + k * w.k);
      if (far && ci + far < ci1)  // and `far` channels ahead into L2 (prefetcht1)
        for (int k = 0; k < 9; ++k) __builtin_prefetch(row + far * w.ci + k * w.k, 0, 2);
      vfl* out = reinterpret_cast<vfl*>(u + ((j - j0) * rows + ci - row0) * kNr);
      for (int part = 0; part < kParts; ++part) {
        const int o = part * kFilterLanes;
        const int lanes = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kFilterLanes, cout - j * kNr - o)));
        for (int k = 0; k < 9; ++k) g[k] = load_fl(row + k * w.k + o, lanes);
        if constexpr (kParts == 1)
          winograd_filter_tile<M>(g, 3, 1, out, us / kFilterLanes);
        else
          winograd_filter_tile<M>(g, 3, 1, tile + part, kParts);
      }
      if constexpr (kParts > 1)
        for (int p = 0; p < K * K; ++p)
          for (int part = 0; part < kParts; ++part) out[p * (us / kFilterLanes) + part] = tile[p * kParts + part];
    }
  }
}

// The whole packed U [K*K][coutp/16][cin][16] for input channels [ci0, ci1), positions `us` floats
// apart (at least coutp * cin; see plane_stride).
template <int M>
void weight_transform(const DenseWeight& w, int64_t cin, int64_t cout, int64_t ci0, int64_t ci1, float* u,
                      int64_t us) {
  filter_panels<M>(w, cin, cout, 0, (cout + kNr - 1) / kNr, ci0, ci1, u, us);
}

// The 64-byte lines of [begin, end) into L2 at once (prefetcht1, or prefetchw where they will be written).
inline void prefetch_lines(const float* begin, const float* end, bool write = false) {
  const char* p = reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(begin) & ~std::uintptr_t(63));
  if (write)
    for (; p < reinterpret_cast<const char*>(end); p += 64) __builtin_prefetch(p, 1, 2);
  else
    for (; p < reinterpret_cast<const char*>(end); p += 64) __builtin_prefetch(p, 0, 2);
}

// The same, a share at a time: `steps` calls of step() cover the range.
struct RangePrefetch {
  const char* p = nullptr;
  int64_t lines = 0, per = 0, done = 0;
  bool write = false;
  void plan(const float* begin, const float* end, int64_t steps, bool for_write = false) {
    const auto a = reinterpret_cast<std::uintptr_t>(begin) & ~std::uintptr_t(63);
    p = reinterpret_cast<const char*>(a);
    lines = static_cast<int64_t>((reinterpret_cast<std::uintptr_t>(end) - a + 63) / 64);
    per = (lines + steps - 1) / std::max<int64_t>(1, steps);
    write = for_write;
  }
  void step() {
    const int64_t end = std::min(lines, done + per);
    if (write)
      for (; done < end; ++done) __builtin_prefetch(p + done * 64, 1, 2);
    else
      for (; done < end; ++done) __builtin_prefetch(p + done * 64, 0, 2);
  }
};

template <int M>
void winograd_task(const WinogradTask& k) {
  constexpr int K = Winograd<M>::kTile;
  const WinogradGeometry& g = *k.g;
  input_transform<M>(k.x, g, k.t0, k.nt, k.ntp, k.vbuf);
  // While the GEMMs run (compute-bound), what the steps around them will read from L3 or memory
  // streams into L2: the residual and the output lines of this task's tiles, which the output
  // transform reads and writes pixel by pixel after the GEMMs and otherwise waited for (W32's
  // 32-channel 64x48 conv at batch 8 took 1.2x as long with its residual as without), and x's rows
  // of the next block of tiles, the next task's input transform (the same thread's, mostly: tasks
  // are handed out as contiguous ranges). Whole rows of pixels from the first tile's to the last's,
  // so a little more than the tiles; residual and output only where the task makes every output
  // channel (a share of them would fetch the other threads' lines too). W32 at batch 8, 2 threads:
  // the whole model 1.02-1.04x (paired, in one process); its 64-channel 32x24 conv 1.1-1.15x, the
  // 32-channel one 1.1-1.25x; batch 1 unchanged.
  RangePrefetch streams[3];
  {
    const int64_t per_img = g.tiles_h * g.tiles_w;
    auto img = [&](int64_t t) { return t / per_img; };
    auto row = [&](int64_t t) { return (t % per_img) / g.tiles_w * M; };  // the tile's first output row
    const int64_t first = k.t0, last = k.t0 + k.nt - 1;
    const int64_t begin = (img(first) * g.h + row(first)) * g.w * g.cout;
    const int64_t end = (img(last) * g.h + std::min<int64_t>(g.h, row(last) + M)) * g.w * g.cout;
    const int64_t passes = (k.j1 - k.j0 + kGemmPanels - 1) / kGemmPanels;  // the fewest gemms() passes
    const int64_t slices = k.u ? 1 : (g.cin + k.slice - 1) / k.slice;       // a pass a slice
    const int64_t steps = passes * slices * K * K * (k.ntp / kMr);
    if (k.j0 == 0 && k.j1 * kNr >= g.cout) {
      if (k.residual) streams[0].plan(k.residual + begin, k.residual + end, steps);
      streams[1].plan(k.y + begin, k.y + end, steps, true);
    }
    if (k.t0 + k.nt < g.tiles) {  // the next block's input rows, padding row included
      const int64_t nf = k.t0 + k.nt, nl = std::min(g.tiles, nf + k.nt) - 1;
      const int64_t r0 = std::max<int64_t>(0, row(nf) - 1), r1 = std::min<int64_t>(g.h, row(nl) + M + 1);
      streams[2].plan(k.x + (img(nf) * g.h + r0) * g.w * g.cin, k.x + (img(nl) * g.h + r1) * g.w * g.cin, steps);
    }
  }
  // micro_6xn on V's rows and Mt's, C = A B or (accumulate) C += A B
  // (pf: n rows of the weight's lines as pfl describes them)
  auto micro = [&]<int NV>(bool accumulate, const float* a, const float* const (&b)[NV], float* c, int64_t kn,
                           const char* pf, const WeightLines& pfl, int64_t n) {
    if (accumulate)
      micro_6xn<vgemm, NV, true>(a, g.cinp, b, c, g.coutp, kn, pf, pfl.row_bytes, n, pfl.lines, kNr, {}, pfl.line_bytes);
    else
      micro_6xn<vgemm, NV>(a, g.cinp, b, c, g.coutp, kn, pf, pfl.row_bytes, n, pfl.lines, kNr, {}, pfl.line_bytes);
  };
  // all K*K positions of panels [j, j + group) (group 1 to 4, at most k.group; panel j + q rows * kNr * q
  // floats after panel j)
  // pf: the dense weight's lines of the panels transformed next (DenseWeight::lines_of), prefetched into
  // L2 a few rows at a time during these GEMMs
  // k0, kn: the input channels [k0, k0 + kn) of a slice of U (rows a panel in panel0), added to C
  // where k0 > 0
  auto gemms = [&](int64_t j, const float* panel0, int64_t panel_stride, int group, int64_t k0, int64_t kn,
                   int64_t rows, const WeightLines& pf = {}) {
    const int64_t q = rows * kNr;  // floats between panels
    const int64_t pf_rows = pf.start ? pf.rows : 0;
    const int64_t calls = K * K * (k.ntp / kMr), per = (pf_rows + calls - 1) / calls;
    int64_t call = 0;
    for (int p = 0; p < K * K; ++p) {
      const float* vp = k.vbuf + p * plane_stride(k.ntp * g.cinp);
      float* mp = k.mbuf + p * plane_stride(k.ntp * g.coutp);
      const float* panel = panel0 + p * panel_stride;
      for (int64_t i = 0; i < k.ntp; i += kMr) {
        const float* a = vp + i * g.cinp + k0;
        float* c = mp + i * g.coutp + j * kNr;
        // this call's share of the rows
        const int64_t r0 = std::min(pf_rows, call++ * per), n = std::min(pf_rows, r0 + per) - r0;
        const char* pfc = pf_rows ? pf.start + r0 * pf.row_bytes : nullptr;
        for (RangePrefetch& s : streams) s.step();
        if constexpr (kGemmPanels == 1)  // 8 lanes: one panel as two vectors
          micro(k0 > 0, a, {panel, panel + 8}, c, kn, pfc, pf, n);
        else if (group == 4)
          micro(k0 > 0, a, {panel, panel + q, panel + 2 * q, panel + 3 * q}, c, kn, pfc, pf, n);
        else if (group == 3)
          micro(k0 > 0, a, {panel, panel + q, panel + 2 * q}, c, kn, pfc, pf, n);
        else if (group == 2)
          micro(k0 > 0, a, {panel, panel + q}, c, kn, pfc, pf, n);
        else
          micro(k0 > 0, a, {panel}, c, kn, pfc, pf, n);
      }
    }
  };
  // Two panels at a time where the GEMM is 16 lanes wide (kGemmPanels; the last may be alone), a dense
  // weight's too, though two whole F(4x4) panels of W32's 128 channels (590 KB) then share L2 with
  // V and Mt: on an Intel Xeon (2 MB L2) that 16x12 conv at batch 8 took 1.14x as long unpaired
  // (in turns in one process) and the whole W32 at batch 8 1.02-1.03x (15 and 14 of 16 forwards,
  // an A/A control copy 1.01-1.015x apart), batch 1 the same; on the AMD EPYC (1 MB L2) pairing them
  // or not measured the same within the noise of one whole-model run each.
  // (and up to four where k.group says so)
  const int most = kGemmPanels == 1 ? 1 : k.group;
  if (k.u) {
    for (int64_t j = k.j0; j < k.j1;) {
      const int group = static_cast<int>(std::min<int64_t>(most, k.j1 - j));
      gemms(j, k.u + j * g.cin * kNr, k.u_stride, group, 0, g.cin, g.cin);
      j += group;
    }
  } else {
    // Dense weight: transform panels into the thread's buffer (L2), a slice of k.slice input channels at
    // a time (the driver's choice), and use each slice at once, its GEMMs adding to Mt. Slice by slice,
    // all of this task's panels for each: a slice's rows of the weight ([C_in][3][3][C_out]) are then
    // read as one stream of this task's columns, where panels outer read each panel's 64-128 bytes of a
    // row 1 KB apart (256 channels), a pattern 2 threads of an Intel Xeon stream from memory at 13-14
    // GB/s against 21-25 (all the rows' columns in order). Mt's rows of all the task's panels (a slice
    // means a block of at most kSliceMtBytes) stay in L1 or L2 between slices; each output's sum is
    // taken in the same order either way. W32's 256-channel 8x6 conv at batch 1 (24 weights in turn,
    // cold), in turns with panels outer: 297 against 308 us (1.04x, 23 of 30), the 128-channel 16x12 one
    // 1.014x, the whole W32 at batch 1 1.008x (24 of 40): the transform and the GEMMs of 12 tiles, not
    // the stream, take most of such a conv's time.
    // The dense weight of the next panels (or slice) streams into L2 during the current GEMMs, not after
    // them in the transform: W32's 256-channel 8x6 conv at batch 1 (F(2x2), weights cold, 2 threads of
    // the AMD EPYC) took 262 instead of 313 us (1.21x; 1.17x on one thread), the whole model at batch 1
    // 1.02-1.03x (paired, 100 rounds); the 128-channel 16x12 one and batch 8, where the GEMMs outweigh
    // the weight, the same.
    const int64_t stride = plane_stride(most * k.slice * kNr);  // as the driver sized ubuf
    for (int64_t ci0 = 0; ci0 < g.cin; ci0 += k.slice) {
      const int64_t ci1 = std::min(g.cin, ci0 + k.slice), kn = ci1 - ci0;
      for (int64_t j = k.j0; j < k.j1;) {
        const int group = static_cast<int>(std::min<int64_t>(most, k.j1 - j));
        const int64_t next = j + group;
        filter_panels<M>(k.w, k.slice, g.cout, j, next, ci0, ci1, k.ubuf, stride, kFarPrefetch, ci0);
        if (next < k.j1)  // this slice's next panels
          gemms(j, k.ubuf, stride, group, ci0, kn, k.slice,
                k.w.lines_of(next, std::min<int64_t>(most, k.j1 - next), ci0, kn, g.cout));
        else if (ci1 < g.cin)  // the next slice's first panels
          gemms(j, k.ubuf, stride, group, ci0, kn, k.slice,
                k.w.lines_of(k.j0, std::min<int64_t>(most, k.j1 - k.j0), ci1, std::min(k.slice, g.cin - ci1), g.cout));
        else
          gemms(j, k.ubuf, stride, group, ci0, kn, k.slice);
        j = next;
      }
    }
  }
  const int64_t c0 = k.j0 * kNr / 8, c1 = k.j1 * kNr / 8;
  const auto out = k.residual ? (k.relu ? &output_transform<M, true, true> : &output_transform<M, true, false>)
                              : (k.relu ? &output_transform<M, false, true> : &output_transform<M, false, false>);
  out(k.mbuf, g, k.t0, k.nt, k.ntp, c0, c1, k.bias, k.residual, k.y);
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
