// The 1x1 convolution's per-ISA part: y = act(x W^T + bias + residual) over rows of NHWC pixels, with
// the Winograd kernel's GEMM micro-kernel (winograd_core.h, included before this file under the same
// HF_ISA_NS) and the epilogue in one pass over the output. A 1x1 stride-1 conv in NHWC is a plain GEMM:
// x's pixels are A's rows (C_in floats each), the output's pixels C's rows.
#pragma once

#ifndef HF_ISA_NS
#error "include conv1x1_core.h through csrc/cpu/isa/winograd_variant.h"
#endif

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {

// act(acc + bias + residual) of `rows` rows of `n` channels from the micro-kernel's block c (rows ldc
// floats apart) into y (rows `cout` floats apart, like the residual's). 8 lanes at a time; the last
// vector of a channel count that is not a multiple of 8 partial.
inline void conv1x1_epilogue(const float* c, int64_t ldc, int rows, int n, const float* bias, const float* residual,
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

// Rows [r0, r1) of the output. Per group of kMr rows, every panel (pair) of the packed weight in turn:
// the group's A (kMr x C_in) stays in L1 while the weight streams from L2. A last group of fewer rows
// runs through a zero-padded copy of its A.
constexpr int64_t kPrefetchGroups = 2;

void conv1x1_rows(const Conv1x1Task& t) {
  const int64_t panels = t.coutp / kNr, cin = t.cin;
  alignas(64) float cbuf[kMr * kNr * 2];
  float tail[kMr * kConv1x1MaxCin];  // a last short group's rows, zero-padded
  for (int64_t r = t.r0; r < t.r1; r += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, t.r1 - r));
    const float* a = t.x + r * cin;
    if (rows < kMr) {
      std::memset(tail, 0, sizeof(float) * kMr * cin);
      std::memcpy(tail, a, sizeof(float) * rows * cin);
      a = tail;
    }
    const float* res = t.residual ? t.residual + r * t.cout : nullptr;
    float* y = t.y + r * t.cout;
    // the residual and output lines of the group kPrefetchGroups ahead, a share before each GEMM
    const int64_t ahead = r + kPrefetchGroups * kMr;
    const int64_t pf_lines = ahead < t.r1 ? (std::min<int64_t>(kMr, t.r1 - ahead) * t.cout * 4 + 63) / 64 : 0;
    const int64_t calls = (panels + kGemmPanels - 1) / kGemmPanels, per = (pf_lines + calls - 1) / calls;
    const char* pf_res = t.residual ? reinterpret_cast<const char*>(t.residual + ahead * t.cout) : nullptr;
    const char* pf_y = reinterpret_cast<const char*>(t.y + ahead * t.cout);
    int64_t issued = 0;
    for (int64_t j = 0; j < panels; ++j) {
      for (const int64_t end = std::min(pf_lines, issued + per); issued < end; ++issued) {
        if (pf_res) __builtin_prefetch(pf_res + issued * 64, 0, 2);
        __builtin_prefetch(pf_y + issued * 64, 1, 2);
      }
      const float* b = t.wp + j * cin * kNr;
      const bool pair = kGemmPanels == 2 && j + 1 < panels;
      int64_t ldc = kNr;
      if constexpr (kGemmPanels == 1) {
        micro_6xn<vgemm, 2>(a, cin, {b, b + 8}, cbuf, ldc, cin);
      } else if (pair) {
        ldc = 2 * kNr;
        micro_6xn<vgemm, 2>(a, cin, {b, b + cin * kNr}, cbuf, ldc, cin);
      } else {
        micro_6xn<vgemm, 1>(a, cin, {b}, cbuf, ldc, cin);
      }
      const int64_t c0 = j * kNr;
      const int n = static_cast<int>(std::min<int64_t>(ldc, t.cout - c0));
      conv1x1_epilogue(cbuf, ldc, rows, n, t.bias ? t.bias + c0 : nullptr, res ? res + c0 : nullptr, y + c0, t.cout,
                       t.relu);
      j += pair;
    }
  }
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
