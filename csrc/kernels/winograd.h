// Winograd F(m x m, 3 x 3) transforms (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2015), for m = 2 (4x4 input tiles) and m = 4 (6x6 input tiles).
//
// A 3x3 stride-1 convolution computes each m x m output tile as
//   Y = A^T [ sum_c (G g_c G^T) .* (B^T d_c B) ] A
// so the 9 m^2 multiplies per (tile, channel pair) of direct convolution become (m+2)^2:
// 2.25x fewer for m = 2, 4x fewer for m = 4; the sum over c is (m+2)^2 independent GEMMs.
//
// The 1-D transforms below are written out by hand (rows of B^T and A^T) so no multiply by 0 or 1
// is left for the compiler to prove away (it may not, for floats, without -ffast-math). They are
// templated on the element type: a float, a GCC vector of 8 floats (csrc/cpu), or a CUDA float.
// The filter transform G (filter_row()) runs in float32 too, in the kernel's own arithmetic: ahead of
// time for weights that are kept transformed, and per call for those kept only dense.
//
// Instantiated per instruction set (csrc/cpu/winograd_core.h): the includer names the namespace the
// templates live in, HF_ISA_NS, so code built for AVX2 never shares a symbol with the baseline's.
#pragma once

#include <cstdint>

#include "kernels/hd.h"

#ifndef HF_ISA_NS
#error "define HF_ISA_NS (the instruction set's namespace) before including winograd.h"
#endif

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {  // internal to each variant's file: called directly, never through the PLT

template <int M>
struct Winograd;

// F(2x2, 3x3): interpolation points 0, 1, -1, infinity. Exact in float arithmetic up to rounding
// of a few additions; no multiplies at all in the data transforms.
template <>
struct Winograd<2> {
  static constexpr int kTile = 4;  // m + 2

  // r = B^T d (d: kTile values at stride `ds`; r: kTile values at stride `rs`)
  template <typename In, typename Out>
  HF_HD static void input(const In* d, int64_t ds, Out* r, int64_t rs) {
    const In d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds];
    r[0] = d0 - d2;
    r[rs] = d1 + d2;
    r[2 * rs] = d2 - d1;
    r[3 * rs] = d1 - d3;
  }

  // Row a of G g for g = (g0, g1, g2): G's rows (1, 0, 0), (1, 1, 1)/2, (1, -1, 1)/2, (0, 0, 1). One row
  // at a time (a a compile-time constant once unrolled), so a tile's transform keeps few values live.
  template <typename T>
  HF_HD static T filter_row(int a, T g0, T g1, T g2) {
    switch (a) {
      case 0: return g0;
      case 1: return (g0 + g2 + g1) * .5f;
      case 2: return (g0 + g2 - g1) * .5f;
      default: return g2;
    }
  }

  // o = A^T v (v: kTile values at stride `vs`; o: 2 values at stride `os`)
  template <typename In, typename Out>
  HF_HD static void output(const In* v, int64_t vs, Out* o, int64_t os) {
    const In v1 = v[vs], v2 = v[2 * vs];
    o[0] = v[0] + v1 + v2;
    o[os] = v1 - v2 - v[3 * vs];
  }
};

// F(4x4, 3x3): points 0, 1, -1, 2, -2, infinity (the usual choice: the smallest error for m = 4).
template <>
struct Winograd<4> {
  static constexpr int kTile = 6;

  template <typename In, typename Out>
  HF_HD static void input(const In* d, int64_t ds, Out* r, int64_t rs) {
    const In d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds], d4 = d[4 * ds], d5 = d[5 * ds];
    const In a = d4 - d2 * 4.f, b = d3 - d1 * 4.f;  // shared by rows 1 and 2
    const In c = d4 - d2, e = (d3 - d1) * 2.f;      // shared by rows 3 and 4
    r[0] = d0 * 4.f - d2 * 5.f + d4;
    r[rs] = a + b;
    r[2 * rs] = a - b;
    r[3 * rs] = c + e;
    r[4 * rs] = c - e;
    r[5 * rs] = d1 * 4.f - d3 * 5.f + d5;
  }

  // Row a of G g: G's rows (1/4, 0, 0), -(1, 1, 1)/6, -(1, -1, 1)/6, (1, 2, 4)/24, (1, -2, 4)/24, (0, 0, 1)
  template <typename T>
  HF_HD static T filter_row(int a, T g0, T g1, T g2) {
    switch (a) {
      case 0: return g0 * .25f;
      case 1: return (g0 + g2 + g1) * (-1.f / 6.f);
      case 2: return (g0 + g2 - g1) * (-1.f / 6.f);
      case 3: return (g0 + g2 * 4.f) * (1.f / 24.f) + g1 * (1.f / 12.f);
      case 4: return (g0 + g2 * 4.f) * (1.f / 24.f) - g1 * (1.f / 12.f);
      default: return g2;
    }
  }

  template <typename In, typename Out>
  HF_HD static void output(const In* v, int64_t vs, Out* o, int64_t os) {
    const In v1 = v[vs], v2 = v[2 * vs], v3 = v[3 * vs], v4 = v[4 * vs];
    const In s12 = v1 + v2, d12 = v1 - v2, s34 = v3 + v4, d34 = v3 - v4;
    o[0] = v[0] + s12 + s34;
    o[os] = d12 + d34 * 2.f;
    o[2 * os] = s12 + s34 * 4.f;
    o[3 * os] = d12 + d34 * 8.f + v[5 * vs];
  }
};

// 2-D transforms of one tile, each as two passes of 1-D transforms through a kTile x kTile
// scratch `t`. Element (a, b) of V lives at v[(a * kTile + b) * vs]: a kernel writes V straight
// into its GEMM operand and reads Y's input straight out of the GEMM result.

// V = B^T D B; D's row r is d[r * row_stride + s * col_stride].
template <int M, typename In, typename Out, typename T>
HF_HD void winograd_input_tile(const In* d, int64_t row_stride, int64_t col_stride, Out* v, int64_t vs, T* t) {
  constexpr int K = Winograd<M>::kTile;
  for (int r = 0; r < K; ++r) Winograd<M>::input(d + r * row_stride, col_stride, t + r * K, 1);  // t = D B
  for (int b = 0; b < K; ++b) Winograd<M>::input(t + b, K, v + b * vs, K * vs);                  // V = B^T t
}

// U = G g G^T of one 3x3 filter; g's row r is g[r * row_stride + s * col_stride], U's element (a, b)
// goes to u[(a * kTile + b) * us]. Row a of G g (three values) is made and used before the next, so
// only g and three values are live, not G g's K x 3 (at 16 lanes a value, far past AVX2's 16
// registers): the AVX2 variant's F(2x2) transform measured 1.3x faster so, F(4x4) and AVX-512's the same.
template <int M, typename In, typename Out>
HF_HD void winograd_filter_tile(const In* g, int64_t row_stride, int64_t col_stride, Out* u, int64_t us) {
  using W = Winograd<M>;
  constexpr int K = W::kTile;
  const int64_t r1 = row_stride, r2 = 2 * row_stride, c1 = col_stride, c2 = 2 * col_stride;
#pragma GCC unroll 6
  for (int a = 0; a < K; ++a) {
    const In t0 = W::filter_row(a, g[0], g[r1], g[r2]);  // (G g)[a][0..2]
    const In t1 = W::filter_row(a, g[c1], g[r1 + c1], g[r2 + c1]);
    const In t2 = W::filter_row(a, g[c2], g[r1 + c2], g[r2 + c2]);
#pragma GCC unroll 6
    for (int b = 0; b < K; ++b) u[(a * K + b) * us] = W::filter_row(b, t0, t1, t2);  // U = (G g) G^T
  }
}

// Y = A^T V A for the first `rows` rows of Y (M x M, row-major in y).
template <int M, typename In, typename T>
HF_HD void winograd_output_tile(const In* v, int64_t vs, T* y, int rows, T* t) {
  constexpr int K = Winograd<M>::kTile;
  for (int b = 0; b < K; ++b) Winograd<M>::output(v + b * vs, K * vs, t + b, K);  // t = A^T V (M x K)
  for (int r = 0; r < rows; ++r) Winograd<M>::output(t + r * K, 1, y + r * M, 1);  // Y = t A
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
