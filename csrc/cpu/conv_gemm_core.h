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

// act(acc + bias) of `rows` rows of `n` channels from C (rows ldc floats apart) into a planar y
// [n][C_out][ho * wo], the rows being output pixels p0.. (of any images); channel c of pixel p at
// y + (p / plane * cout + c) * plane + p % plane: a channel at a time, each image's pixels one run of
// stores. No residual: a planar output is a model's last conv's.
inline void conv_gemm_epilogue_planar(const float* c, int64_t ldc, int rows, int n, const float* bias, float* y,
                                      int64_t p0, int64_t plane, int64_t cout, bool relu) {
  for (int r0 = 0; r0 < rows;) {
    const int64_t p = p0 + r0;
    const int run = static_cast<int>(std::min<int64_t>(rows - r0, plane - p % plane));
    float* out = y + p / plane * cout * plane + p % plane;
    const float* cr = c + r0 * ldc;
    for (int q = 0; q < n; ++q) {
      const float b = bias ? bias[q] : 0.f;
      for (int r = 0; r < run; ++r) {
        const float v = cr[r * ldc + q] + b;
        out[q * plane + r] = relu && v < 0.f ? 0.f : v;  // torch.relu keeps NaN: v < 0 is false for NaN
      }
    }
    r0 += run;
  }
}

// The epilogue of output pixels [r, r + rows), channels [c0, c0 + n), from C into the task's y in its
// layout (conv_gemm_epilogue, or conv_gemm_epilogue_planar where y is planar).
inline void conv_gemm_store(const ConvGemmTask& t, const float* c, int64_t ldc, int64_t r, int rows, int64_t c0, int n) {
  const ConvGemmGeometry& g = *t.g;
  const float* bias = t.bias ? t.bias + c0 : nullptr;
  if (g.y_planar)
    conv_gemm_epilogue_planar(c, ldc, rows, n, bias, t.y + c0 * g.ho * g.wo, r, g.ho * g.wo, g.cout, t.relu);
  else
    conv_gemm_epilogue(c, ldc, rows, n, bias, t.residual ? t.residual + r * g.cout + c0 : nullptr,
                       t.y + r * g.cout + c0, g.cout, t.relu);
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
    const int64_t ix0 = ox * g.stride - g.pad;
    const bool inside_x = ix0 >= 0 && ix0 + g.kw <= g.w;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.stride - g.pad + ky;
      float* dst = row + ky * g.kw * g.cin;
      if (iy < 0 || iy >= g.h) {
        std::memset(dst, 0, sizeof(float) * g.kw * g.cin);
      } else if (inside_x) {  // the window's row is kw pixels side by side in x: one copy
        std::memcpy(dst, base + (iy * g.w + ix0) * g.cin, sizeof(float) * g.kw * g.cin);
      } else {
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ix0 + kx;
          if (ix < 0 || ix >= g.w)
            std::memset(dst + kx * g.cin, 0, sizeof(float) * g.cin);
          else
            std::memcpy(dst + kx * g.cin, base + (iy * g.w + ix) * g.cin, sizeof(float) * g.cin);
        }
      }
    }
  }
}

// How many groups of kMr rows ahead conv_gemm_rows prefetches the residual and output lines.
constexpr int64_t kPrefetchGroups = 2;

// K a GEMM call takes at most: a group's slice of gathered windows (kMr x kKc floats, 6 KiB) stays
// in L1 while every panel of the weight's rows [kc, kc + kKc) streams past it from L2.
constexpr int64_t kKc = 256;

// C[0:kMr][panels j0..] (+)= A[:, kc:kc+kk] W[kc:kc+kk, :] for every panel (pair), C rows ldc apart.
// The panels of a call are adjacent columns of W's rows, so micro_6xn is told so (kBStep): one pointer
// and constant offsets instead of a pointer a panel, which left GCC short of registers in its loop (a
// stride moved from a vector register and the loop bound compared on the stack every step). The 1x1
// convs alone 1.06-1.11x faster on one thread; W32 1.028x at batch 8, 1.016x at batch 1 (switched in
// one process, 12 and 30 rounds, the same bits).
// At 16 lanes, four panels a call while four remain: a 6x64 block, each broadcast of A feeding 4 FMAs
// instead of 2. On an Intel Xeon (two 512-bit FMA units) W32's 1x1 convs 1.02-1.28x faster alone, the
// whole W32 1.01x at batch 1 and 8 (20 of 30 and 12 of 16 forwards, switched in one process, an A/A
// control copy 1.002-1.005x apart).
// kEpilogue: C's last K slice, stored through `epi` (its bias, residual and out at column 0) to the
// output instead of C.
template <bool kAccumulate, bool kEpilogue = false>
inline void conv_gemm_panels(const float* a, int64_t lda, const float* w, int64_t ldw, int64_t kk, int64_t panels,
                             float* c, int64_t ldc, const MicroEpilogue& epi = {}) {
  for (int64_t j = 0; j < panels; ++j) {
    const float* b = w + j * kNr;
    float* cj = c + j * kNr;
    MicroEpilogue e = epi;
    if constexpr (kEpilogue) {
      const int64_t col = j * kNr;
      e = {epi.bias ? epi.bias + col : nullptr, epi.residual ? epi.residual + col : nullptr, epi.relu, epi.out + col,
           epi.ldo};
    }
    if constexpr (kGemmPanels == 1) {
      micro_6xn<vgemm, 2, kAccumulate, kEpilogue, 8>(a, lda, {b, b + 8}, cj, ldc, kk, nullptr, 0, 0, 1, ldw, e);
    } else if (j + 3 < panels) {  // four panels, 24 of the 32 vector registers accumulating (see above)
      micro_6xn<vgemm, 4, kAccumulate, kEpilogue, kNr>(a, lda, {b, b + kNr, b + 2 * kNr, b + 3 * kNr}, cj, ldc, kk,
                                                       nullptr, 0, 0, 1, ldw, e);
      j += 3;
    } else if (j + 1 < panels) {
      micro_6xn<vgemm, 2, kAccumulate, kEpilogue, kNr>(a, lda, {b, b + kNr}, cj, ldc, kk, nullptr, 0, 0, 1, ldw, e);
      ++j;
    } else {
      micro_6xn<vgemm, 1, kAccumulate, kEpilogue>(a, lda, {b}, cj, ldc, kk, nullptr, 0, 0, 1, ldw, e);
    }
  }
}

// conv_gemm_rows for a 1x1 conv with K <= kKc (x's rows read in place): per block of kConvGemmBlockGroups
// groups, slice by slice of the columns (64 at 16 lanes, 16 at 8), every group of the block against
// that slice, the epilogue applied to each group's 6 x 64 outputs as they leave the registers (through
// the thread's C buffer only for a partial group or slice). The weight's slice stays in L1 across the
// block's groups, where the group-major order streamed all of the weight (K x C_out floats: 64 KiB for
// stage 1's 64 -> 256 convs) from L2 for every 6 pixels. Those convs alone, on 2 threads of an Intel
// Xeon (the two orders switched call by call in one process, the same bits): 1.11x at batch 1 with
// the residual, 1.16x at batch 8; the epilogue from the registers on top, 1.21x and 1.33x; the
// 256 -> 64 ones (one slice) 1.02-1.03x, the 64 -> 64 one 1.14x. The whole W32 at batch 1 1.02x (23 of
// 30 forwards, an A/A control 1.002x), batch 8 1.01x (7 of 12, the control 0.99x).
void conv_gemm_rows_blocked(const ConvGemmTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t panels = (g.cout + kNr - 1) / kNr, k = g.cin;
  for (int64_t rb = t.r0; rb < t.r1; rb += kConvGemmBlockGroups * kMr) {
    const int64_t rb1 = std::min(t.r1, rb + kConvGemmBlockGroups * kMr);
    if (g.y_planar) {  // the block's C in t.cbuf (kConvGemmBlockGroups x kMr rows), then stored plane by plane
      for (int64_t j = 0; j < panels;) {
        const int64_t nj = kGemmPanels == 1 ? 1 : j + 3 < panels ? 4 : j + 1 < panels ? 2 : 1;
        for (int64_t r = rb; r < rb1; r += kMr) {
          const int rows = static_cast<int>(std::min<int64_t>(kMr, rb1 - r));
          const float* a = t.x + r * k;
          if (rows < kMr) {
            conv_gemm_gather(t, r, rows, t.abuf);
            a = t.abuf;
          }
          conv_gemm_panels<false>(a, k, t.w + j * kNr, t.ldw, k, nj, t.cbuf + (r - rb) * panels * kNr + j * kNr,
                                  panels * kNr);
        }
        j += nj;
      }
      conv_gemm_store(t, t.cbuf, panels * kNr, rb, static_cast<int>(rb1 - rb), 0, static_cast<int>(g.cout));
      continue;
    }
    for (int64_t j = 0; j < panels;) {
      const int64_t nj = kGemmPanels == 1 ? 1 : j + 3 < panels ? 4 : j + 1 < panels ? 2 : 1;
      const bool last_slice = j + nj >= panels;
      const float* b = t.w + j * kNr;
      const int64_t c0 = j * kNr, n = std::min(g.cout, (j + nj) * kNr) - c0;
      for (int64_t r = rb; r < rb1; r += kMr) {
        const int rows = static_cast<int>(std::min<int64_t>(kMr, rb1 - r));
        // this slice's residual and output lines kPrefetchGroups groups ahead, and on the last slice
        // x's rows of the next block's group
        const int64_t ahead = r + kPrefetchGroups * kMr;
        if (ahead < rb1) {
          for (int64_t p = ahead; p < std::min(rb1, ahead + kMr); ++p) {
            if (t.residual) prefetch_lines(t.residual + p * g.cout + c0, t.residual + p * g.cout + c0 + n);
            prefetch_lines(t.y + p * g.cout + c0, t.y + p * g.cout + c0 + n, true);
          }
        }
        if (last_slice) {
          const int64_t next = r + kConvGemmBlockGroups * kMr;
          if (next < t.r1) prefetch_lines(t.x + next * k, t.x + std::min(t.r1, next + kMr) * k);
        }
        const float* a = t.x + r * k;
        if (rows == kMr && n == nj * kNr) {  // the epilogue straight from the registers
          const MicroEpilogue epi{t.bias ? t.bias + c0 : nullptr, t.residual ? t.residual + r * g.cout + c0 : nullptr,
                                  t.relu, t.y + r * g.cout + c0, g.cout};
          conv_gemm_panels<false, true>(a, k, b, t.ldw, k, nj, t.cbuf, nj * kNr, epi);
          continue;
        }
        if (rows < kMr) {
          conv_gemm_gather(t, r, rows, t.abuf);
          a = t.abuf;
        }
        conv_gemm_panels<false>(a, k, b, t.ldw, k, nj, t.cbuf, nj * kNr);
        conv_gemm_epilogue(t.cbuf, nj * kNr, rows, static_cast<int>(n), t.bias ? t.bias + c0 : nullptr,
                           t.residual ? t.residual + r * g.cout + c0 : nullptr, t.y + r * g.cout + c0, g.cout, t.relu);
      }
      j += nj;
    }
  }
}

// Output rows (pixels) [r0, r1). A 1x1 conv with K <= kKc: conv_gemm_rows_blocked. Else per group of
// kMr rows, its C (kMr x C_out, in the thread's buffer) from K slices of kKc, each slice's A in L1
// against every panel (pair) of the weight, the last slice applying the epilogue as it stores (or,
// for a short group or a partial panel, the epilogue over C afterwards). The residual and output
// lines of the group kPrefetchGroups ahead are prefetched meanwhile: the epilogue reads and writes
// them pixel by pixel, and otherwise waited. With t.segs (conv_bias_act_split), each segment's
// columns are stored to its own output with its own residual and ReLU (the panels of a GEMM call never
// straddle two: segments start at whole panels); each column's sums are the same as without.
void conv_gemm_rows(const ConvGemmTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t panels = (g.cout + kNr - 1) / kNr, coutp = panels * kNr, k = g.kh * g.kw * g.cin;
  const bool in_place = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
  if (in_place && k <= kKc && t.nsegs == 0) return conv_gemm_rows_blocked(t);
  const ConvGemmSegment whole{0, g.cout, t.y, t.residual, t.relu};
  const ConvGemmSegment* const segs = t.nsegs ? t.segs : &whole;
  const int64_t nsegs = t.nsegs ? t.nsegs : 1;
  float* const cbuf = t.cbuf;
  for (int64_t r = t.r0; r < t.r1; r += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, t.r1 - r));
    const float* a = t.x + r * g.cin;
    if (!in_place || rows < kMr) {
      conv_gemm_gather(t, r, rows, t.abuf);
      a = t.abuf;
    }
    const int64_t ahead = r + kPrefetchGroups * kMr;
    if (ahead < t.r1) {
      const int64_t last = std::min(t.r1, ahead + kMr) - 1;
      for (int64_t q = 0; q < nsegs; ++q) {
        const ConvGemmSegment& sg = segs[q];
        const int64_t ldo = sg.c1 - sg.c0;
        if (sg.residual) prefetch_lines(sg.residual + ahead * ldo, sg.residual + (last + 1) * ldo);
        if (!g.y_planar) prefetch_lines(sg.y + ahead * ldo, sg.y + (last + 1) * ldo, true);
      }
      // and x's pixels there: the rows the GEMM reads in place 6 streams at a time, or the windows
      // the gather copies (W32's 256 -> 64 1x1 conv at batch 8: 0.76-0.82x oneDNN's time without, 1.08x with)
      if (in_place) {
        prefetch_lines(t.x + ahead * g.cin, t.x + (last + 1) * g.cin);
      } else {
        for (int64_t p = ahead; p <= last; ++p) {
          const int64_t img = p / (g.ho * g.wo), oy = p / g.wo % g.ho, ox = p % g.wo;
          // the window rows of pixel p, up to the last pixel's columns where the group stays in p's row
          const int64_t ox1 = (last / g.wo == p / g.wo) ? last % g.wo : ox;
          const int64_t ix0 = std::max<int64_t>(0, ox * g.stride - g.pad);
          const int64_t ix1 = std::min<int64_t>(g.w, ox1 * g.stride - g.pad + g.kw);
          for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t iy = oy * g.stride - g.pad + ky;
            if (iy < 0 || iy >= g.h || ix1 <= ix0) continue;
            const float* row = t.x + ((img * g.h + iy) * g.w) * g.cin;
            prefetch_lines(row + ix0 * g.cin, row + ix1 * g.cin);
          }
          if (ox1 != ox) p += ox1 - ox;  // the rest of this row's pixels are covered
        }
      }
    }
    // A whole group of whole panels: the epilogue applied by the last K slice's GEMM, straight from
    // its registers, rather than through C (W32's 32 -> 64 stride-2 conv alone, 2 threads of the
    // Intel Xeon: 1.09x; the whole W32 1.009x at batch 1, the same at batch 8).
    for (int64_t kc = 0; kc < k; kc += kKc) {
      const int64_t kk = std::min(kKc, k - kc);
      const bool last = kc + kk >= k;
      for (int64_t q = 0; q < nsegs; ++q) {
        const ConvGemmSegment& sg = segs[q];
        const int64_t ldo = sg.c1 - sg.c0, sp = (ldo + kNr - 1) / kNr;
        const bool direct = rows == kMr && ldo % kNr == 0 && !g.y_planar;
        const MicroEpilogue epi{t.bias ? t.bias + sg.c0 : nullptr, sg.residual ? sg.residual + r * ldo : nullptr,
                                sg.relu, sg.y + r * ldo, ldo};
        const float* w = t.w + kc * t.ldw + sg.c0;
        float* c = cbuf + sg.c0;
        if (kc == 0 && last && direct)
          conv_gemm_panels<false, true>(a, k, w, t.ldw, kk, sp, c, coutp, epi);
        else if (kc == 0)
          conv_gemm_panels<false>(a, k, w, t.ldw, kk, sp, c, coutp);
        else if (last && direct)
          conv_gemm_panels<true, true>(a + kc, k, w, t.ldw, kk, sp, c, coutp, epi);
        else
          conv_gemm_panels<true>(a + kc, k, w, t.ldw, kk, sp, c, coutp);
        if (last && !direct) {
          if (g.y_planar)
            conv_gemm_store(t, cbuf, coutp, r, rows, 0, static_cast<int>(g.cout));
          else
            conv_gemm_epilogue(c, coutp, rows, static_cast<int>(ldo), t.bias ? t.bias + sg.c0 : nullptr,
                               sg.residual ? sg.residual + r * ldo : nullptr, sg.y + r * ldo, ldo, sg.relu);
        }
      }
    }
  }
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
