// The direct convolution's per-ISA part: y = act(conv(x, W) + bias + residual) in NHWC as a GEMM of
// output pixels, with the Winograd kernel's micro-kernel (winograd_core.h, included before this file
// under the same HF_ISA_NS) and the epilogue in one pass over the output. Output pixel p's row of A is
// its receptive field, [kh][kw][C_in] floats (a 1x1 stride-1 conv's is x's own row, read in place;
// others are gathered, 6 rows at a time, into the thread's buffer, zeros where the window leaves the
// image); W is read as [kh * kw * C_in][C_out] rows (the weight stored HWIO), 16 or 32 columns a call.
#pragma once

#ifndef HF_ISA_NS
#error "include conv_gemm_core.h through csrc/cpu/isa/winograd_variant.h"
#endif

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {

// act(acc + bias + residual) of `rows` rows of `n` channels from the micro-kernel's block c (rows ldc
// floats apart) into y (rows `cout` floats apart, like the residual's). 8 lanes at a time; the last
// vector of a channel count that is not a multiple of 8 partial.
inline void conv_gemm_epilogue(const float* c, int64_t ldc, int rows, int n, const float* bias, const float* residual,
                               float* y, int64_t cout, bool relu) {
  for (int r = 0; r < rows; ++r) {
    for (int q = 0; q < n; q += 8) {
      const int lanes = std::min(8, n - q);
      vf8 val = load8(c + r * ldc + q);
      if (lanes == 8) {
        if (bias) val += load8(bias + q);
        if (residual) val += load8(residual + r * cout + q);
        if (relu) val = val < 0.f ? vf8{} : val;  // torch.relu keeps NaN: v < 0 is false for NaN
        std::memcpy(y + r * cout + q, &val, sizeof(val));
      } else {
        if (bias) val += load_n(bias + q, lanes);
        if (residual) val += load_n(residual + r * cout + q, lanes);
        if (relu) val = val < 0.f ? vf8{} : val;
        store_n(y + r * cout + q, val, lanes);
      }
    }
  }
}

// A's rows for output pixels [r, r + rows) (rows <= kMr; the rest zero) into a [kMr][K] buffer.
inline void conv_gemm_gather(const ConvGemmTask& t, int64_t r, int rows, float* a) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t k = g.kh * g.kw * g.cin;
  for (int i = 0; i < kMr; ++i) {
    float* row = a + i * k;
    if (i >= rows) {
      std::memset(row, 0, sizeof(float) * k);
      continue;
    }
    const int64_t p = r + i, img = p / (g.ho * g.wo), oy = p / g.wo % g.ho, ox = p % g.wo;
    const float* base = t.x + img * g.h * g.w * g.cin;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.stride - g.pad + ky;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.stride - g.pad + kx;
        float* dst = row + (ky * g.kw + kx) * g.cin;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w)
          std::memset(dst, 0, sizeof(float) * g.cin);
        else
          std::memcpy(dst, base + (iy * g.w + ix) * g.cin, sizeof(float) * g.cin);
      }
    }
  }
}

// How many groups of kMr rows ahead conv_gemm_rows prefetches the residual and output lines.
constexpr int64_t kPrefetchGroups = 2;

// Output rows (pixels) [r0, r1). Per group of kMr rows, every panel (pair) of the weight in turn: the
// group's A (kMr x K) stays in L1 while the weight streams from L2.
void conv_gemm_rows(const ConvGemmTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t panels = (g.cout + kNr - 1) / kNr, k = g.kh * g.kw * g.cin;
  const bool in_place = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
  alignas(64) float cbuf[kMr * kNr * 2];
  for (int64_t r = t.r0; r < t.r1; r += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, t.r1 - r));
    const float* a = t.x + r * g.cin;
    if (!in_place || rows < kMr) {
      conv_gemm_gather(t, r, rows, t.abuf);
      a = t.abuf;
    }
    const float* res = t.residual ? t.residual + r * g.cout : nullptr;
    float* y = t.y + r * g.cout;
    // the residual and output lines of the group kPrefetchGroups ahead, a share before each GEMM: the
    // epilogue reads and writes them pixel by pixel and otherwise waited for them
    const int64_t ahead = r + kPrefetchGroups * kMr;
    const int64_t pf_lines = ahead < t.r1 ? (std::min<int64_t>(kMr, t.r1 - ahead) * g.cout * 4 + 63) / 64 : 0;
    const int64_t calls = (panels + kGemmPanels - 1) / kGemmPanels, per = (pf_lines + calls - 1) / calls;
    const char* pf_res = t.residual ? reinterpret_cast<const char*>(t.residual + ahead * g.cout) : nullptr;
    const char* pf_y = reinterpret_cast<const char*>(t.y + ahead * g.cout);
    int64_t issued = 0;
    for (int64_t j = 0; j < panels; ++j) {
      for (const int64_t end = std::min(pf_lines, issued + per); issued < end; ++issued) {
        if (pf_res) __builtin_prefetch(pf_res + issued * 64, 0, 2);
        __builtin_prefetch(pf_y + issued * 64, 1, 2);
      }
      const float* b = t.w + j * kNr;
      const bool pair = kGemmPanels == 2 && j + 1 < panels;
      int64_t ldc = kNr;
      if constexpr (kGemmPanels == 1) {
        micro_6xn<vgemm, 2>(a, k, {b, b + 8}, cbuf, ldc, k, nullptr, 0, 0, 1, t.ldw);
      } else if (pair) {
        ldc = 2 * kNr;
        micro_6xn<vgemm, 2>(a, k, {b, b + kNr}, cbuf, ldc, k, nullptr, 0, 0, 1, t.ldw);
      } else {
        micro_6xn<vgemm, 1>(a, k, {b}, cbuf, ldc, k, nullptr, 0, 0, 1, t.ldw);
      }
      const int64_t c0 = j * kNr;
      const int n = static_cast<int>(std::min<int64_t>(ldc, g.cout - c0));
      conv_gemm_epilogue(cbuf, ldc, rows, n, t.bias ? t.bias + c0 : nullptr, res ? res + c0 : nullptr, y + c0, g.cout,
                         t.relu);
      j += pair;
    }
  }
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
