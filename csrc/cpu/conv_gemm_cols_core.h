// The direct convolution's per-ISA kernel for weight-bound convs (conv_gemm_cols): few output pixels
// against a large weight, as W32's 128 -> 256 stride-2 convs at batch 1 (48 pixels, a 1.2 MB weight
// that comes from memory once per forward). conv_gemm_rows runs a group of 6 pixels against all of the
// weight, reading it again for every group, and oneDNN's conv on its packed weight was bound by the
// latency of reading it: in W32's forward 282-291 us a call (2 threads of an Intel Xeon), against 160-210
// with its weight hot. Here the weight's rows [K][C_out] are split in two halves of K, each read once
// as one sequential stream (a thread's, on 2 threads), against every pixel: 167-179 us in the forward,
// about what it takes hot; at batch 8 (384 pixels) 1014-1041 against oneDNN's 1184-1231. The two
// partial sums are added and the epilogue applied after (conv_gemm_cols_sum). Always two halves and
// always added in the same order, so the bits do not depend on the thread count; more threads split
// the output channels as well. Every output pixel's window is gathered once first, into a buffer all
// threads read (conv_gemm_cols_gather). Included after winograd_core.h and conv_gemm_core.h under the
// same HF_ISA_NS.
#pragma once

#ifndef HF_ISA_NS
#error "include conv_gemm_cols_core.h through csrc/cpu/isa/winograd_variant.h"
#endif

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {

// Panels a GEMM call of conv_gemm_cols: the micro-kernel's widest block.
constexpr int64_t kColsUnit = kGemmPanels == 1 ? 1 : 4;
// Rows of the weight a step of conv_gemm_cols: a 64-column unit of them (16 KB) stays in L1 across the
// pixel groups, the groups' slices of A (kMr x 64 floats each) across the units.
constexpr int64_t kColsRows = 64;
// How far ahead (rows) the stream is prefetched into L2: 16-32 rows measured best for W32's 128 -> 256
// stride-2 conv at batch 1 (its weight evicted by a 256 MB read between calls), 0 and 64-256 rows slower.
constexpr int64_t kColsAhead = 32;

// Gathered windows of output pixels [t.r0, t.r1) (r0 a multiple of kMr) into t.abuf, pixel p's at
// t.abuf + p * K; a group's rows past the last pixel zero.
void conv_gemm_cols_gather(const ConvGemmTask& t) {
  const int64_t k = t.g->kh * t.g->kw * t.g->cin;
  for (int64_t r = t.r0; r < t.r1; r += kMr)
    conv_gemm_gather(t, r, static_cast<int>(std::min<int64_t>(kMr, t.r1 - r)), t.abuf + r * k);
}

// The partial sum over the weight's rows [t.k0, t.k1) for output panels [t.j0, t.j1) and every pixel
// group, from t.abuf (all pixels' windows, K floats each) into t.cbuf (rows of ldc = C_out rounded up
// to 16 floats, a row a pixel of the padded groups).
void conv_gemm_cols(const ConvGemmTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t k = g.kh * g.kw * g.cin, coutp = (g.cout + kNr - 1) / kNr * kNr;
  const int64_t groups = (g.n * g.ho * g.wo + kMr - 1) / kMr;
  const float* pf_begin = t.w + t.j0 * kNr;
  const int64_t pf_floats = (t.j1 - t.j0) * kNr;  // a row's columns of this task
  for (int64_t kc = t.k0; kc < t.k1; kc += kColsRows) {
    const int64_t kk = std::min(kColsRows, t.k1 - kc);
    // the rows kColsAhead on, a share before each GEMM call of this step
    const int64_t p0 = kc + kColsAhead, p1 = std::min(t.k1, p0 + kk);
    const int64_t calls = groups * ((t.j1 - t.j0 + kColsUnit - 1) / kColsUnit);
    const int64_t per = p1 > p0 ? (p1 - p0 + calls - 1) / calls : 0;
    int64_t next = p0;
    for (int64_t j = t.j0; j < t.j1;) {
      const int64_t nj = kGemmPanels == 1 ? 1 : j + 3 < t.j1 ? 4 : j + 1 < t.j1 ? 2 : 1;
      const float* b = t.w + kc * t.ldw + j * kNr;
      for (int64_t q = 0; q < groups; ++q) {
        for (const int64_t end = std::min(p1, next + per); next < end; ++next)
          prefetch_lines(pf_begin + next * t.ldw, pf_begin + next * t.ldw + pf_floats);
        const float* a = t.abuf + q * kMr * k + kc;
        float* c = t.cbuf + q * kMr * coutp + j * kNr;
        auto call = [&]<int NV, bool kAcc>() {
          if constexpr (kGemmPanels == 1)
            micro_6xn<vgemm, 2, kAcc, false, 8>(a, k, {b, b + 8}, c, coutp, kk, nullptr, 0, 0, 1, t.ldw);
          else
            micro_6xn<vgemm, NV, kAcc, false, kNr>(a, k, {b}, c, coutp, kk, nullptr, 0, 0, 1, t.ldw);
        };
        const bool acc = kc > t.k0;
        if (nj == 4)
          acc ? call.template operator()<4, true>() : call.template operator()<4, false>();
        else if (nj == 2)
          acc ? call.template operator()<2, true>() : call.template operator()<2, false>();
        else
          acc ? call.template operator()<1, true>() : call.template operator()<1, false>();
      }
      j += nj;
    }
  }
}

// Output pixels [t.r0, t.r1) (r0 a multiple of kMr): act(C0 + C1 + bias + residual), the two halves'
// partial sums at t.cbuf and t.cbuf + (padded pixels) x ldc, C0 + C1 formed in C0.
void conv_gemm_cols_sum(const ConvGemmTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t coutp = (g.cout + kNr - 1) / kNr * kNr;
  const int64_t half = (g.n * g.ho * g.wo + kMr - 1) / kMr * kMr * coutp;
  for (int64_t r = t.r0; r < t.r1; r += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, t.r1 - r));
    float* c0 = t.cbuf + r * coutp;
    const float* c1 = c0 + half;
    for (int64_t i = 0; i < rows * coutp; i += 8) {
      const vf8 s = load8(c0 + i) + load8(c1 + i);
      std::memcpy(c0 + i, &s, sizeof(s));
    }
    conv_gemm_store(t, c0, coutp, r, rows, 0, static_cast<int>(g.cout));
  }
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
