// The direct convolution's per-ISA kernel for few input channels (fewer than kConvGemmMinCin: an
// image's first conv, HRNet's 3 -> 64 stride-2 stem), NHWC, y = act(conv(x, W) + bias + residual).
// conv_gemm_rows gathers each output pixel's window into a buffer first, 6 pixels at a time; at 3
// input channels that is 18 short copies for 6 x 27 x 64 multiply-adds (by count, about as many
// cycles as the GEMM's 648 FMAs take), and it measured slower there than oneDNN's conv. Here the
// micro-kernel reads the windows where they lie: pixel r's window row ky is kW x C_in floats of x's
// row, r x stride x C_in floats on from pixel 0's, so 6 pixels of an output row are kh row pointers
// and one stride, the accumulators staying in registers across the kh rows. Only a group whose
// windows leave the image (a border, or a row's last group short of 6) is copied first, into a small
// zero-padded patch. Included after winograd_core.h under the same HF_ISA_NS.
#pragma once

#ifndef HF_ISA_NS
#error "include conv_few_cin_core.h through csrc/cpu/isa/winograd_variant.h"
#endif

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {

// C[kMr][NV x L] = sum over ky < kh of A_ky B_ky: output pixel r's window row ky at a[ky] + r * lda
// (kr floats), the weight's row (ky, p) at b + (ky * kr + p) * ldb, its NV vectors L floats apart; the
// accumulators stored through micro_store (kEpilogue: act(C + bias + residual) into epi.out).
template <int NV, bool kEpilogue>
inline void micro_window(const float* const* a, int kh, int64_t lda, int64_t kr, const float* b, int64_t ldb, float* c,
                         int64_t ldc, const MicroEpilogue& epi) {
  constexpr int L = sizeof(vgemm) / sizeof(float);
  vgemm acc[kMr][NV] = {};
  for (int ky = 0; ky < kh; ++ky) {
    const float* __restrict__ ak = a[ky];
    const float* bk = b + ky * kr * ldb;
    for (int64_t p = 0; p < kr; ++p) {
      vgemm w[NV];
      for (int v = 0; v < NV; ++v) std::memcpy(&w[v], bk + p * ldb + v * L, sizeof(vgemm));
#pragma GCC unroll 6
      for (int r = 0; r < kMr; ++r) {
        const float ar = ak[r * lda + p];
        for (int v = 0; v < NV; ++v) acc[r][v] += ar * w[v];
      }
    }
  }
  micro_store<vgemm, NV, kEpilogue>(acc, c, ldc, epi);
}

// One group's kMr pixels against every panel of the weight: 64 columns a call at 16 lanes (24 of the 32
// registers accumulating), else 16. `direct`: a whole group of whole panels, stored through the
// epilogue from the registers; otherwise into C (kMr x coutp) for conv_gemm_epilogue.
inline void window_panels(const float* const* a, int kh, int64_t lda, int64_t kr, const float* w, int64_t ldw,
                          int64_t panels, bool direct, float* c, int64_t ldc, const MicroEpilogue& epi) {
  for (int64_t j = 0; j < panels;) {
    const int nj = kGemmPanels == 1 ? 1 : j + 3 < panels ? 4 : j + 1 < panels ? 2 : 1;
    const int64_t col = j * kNr;
    const MicroEpilogue e{epi.bias ? epi.bias + col : nullptr, epi.residual ? epi.residual + col : nullptr, epi.relu,
                          epi.out ? epi.out + col : nullptr, epi.ldo};
    auto call = [&]<int NV>() {
      direct ? micro_window<NV, true>(a, kh, lda, kr, w + col, ldw, c + col, ldc, e)
             : micro_window<NV, false>(a, kh, lda, kr, w + col, ldw, c + col, ldc, e);
    };
    const int vectors = nj * kNr / static_cast<int>(sizeof(vgemm) / sizeof(float));
    if (vectors == 4)
      call.template operator()<4>();
    else if (vectors == 2)
      call.template operator()<2>();
    else
      call.template operator()<1>();
    j += nj;
  }
}

// Output rows [t.r0, t.r1) of the n x ho image rows, kMr pixels at a time along each row. t.abuf holds
// a patch of kh rows of ((kMr - 1) stride + kW) pixels; t.cbuf a group's C (kMr x coutp). A planar x
// (the model's input image, [n][cin][h][w]) is read in place as well, without the image's NCHW -> NHWC
// copy (a pass of its own over 4.7 MB at batch 8): a window is then kh x cin rows of kW floats, one per
// input channel's plane, pixel r's at r x stride floats on, and the weight's rows come in that order
// ([kh][cin][kW], conv_gemm's copy); the sums are the same but for their order.
void conv_few_cin_rows(const ConvGemmTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t panels = (g.cout + kNr - 1) / kNr, coutp = panels * kNr;
  const int64_t span = (kMr - 1) * g.stride + g.kw;  // a patch row's pixels
  const bool planar = g.x_planar;
  // A's rows of a window, their floats, and the floats between two pixels' windows along a row
  const int nrows = static_cast<int>(planar ? g.kh * g.cin : g.kh);
  const int64_t kr = planar ? g.kw : g.kw * g.cin, lda = planar ? g.stride : g.stride * g.cin;
  const int64_t row_floats = planar ? span : span * g.cin;  // a patch row's
  const float* a[kFewCinMaxKh * kConvGemmMinCin];
  for (int64_t row = t.r0; row < t.r1; ++row) {
    const int64_t img = row / g.ho, oy = row % g.ho, iy0 = oy * g.stride - g.pad;
    const float* base = t.x + img * g.h * g.w * g.cin;
    const bool rows_inside = iy0 >= 0 && iy0 + g.kh <= g.h;
    for (int64_t ox = 0; ox < g.wo; ox += kMr) {
      const int rows = static_cast<int>(std::min<int64_t>(kMr, g.wo - ox));
      const int64_t ix0 = ox * g.stride - g.pad, pix = row * g.wo + ox;
      // row i of the window: (ky, channel c) of a planar x, ky of an NHWC one
      auto source = [&](int i, int64_t iy, int64_t ix) {
        return planar ? base + ((i % g.cin) * g.h + iy) * g.w + ix : base + (iy * g.w + ix) * g.cin;
      };
      if (rows_inside && rows == kMr && ix0 >= 0 && ix0 + span <= g.w) {
        for (int i = 0; i < nrows; ++i) a[i] = source(i, iy0 + (planar ? i / g.cin : i), ix0);
      } else {  // the patch: x's pixels of the group's windows, zeros outside the image and past `rows`
        const int64_t used = (rows - 1) * g.stride + g.kw;
        for (int i = 0; i < nrows; ++i) {
          float* dst = t.abuf + i * row_floats;
          a[i] = dst;
          const int64_t iy = iy0 + (planar ? i / g.cin : i);
          const int64_t per = planar ? 1 : g.cin;  // floats a pixel
          for (int64_t q = 0; q < span; ++q) {
            const int64_t ix = ix0 + q;
            if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w && q < used)
              std::memcpy(dst + q * per, source(i, iy, ix), sizeof(float) * per);
            else
              std::memset(dst + q * per, 0, sizeof(float) * per);
          }
        }
      }
      const bool direct = rows == kMr && coutp == g.cout && !g.y_planar;
      const MicroEpilogue epi{t.bias, t.residual ? t.residual + pix * g.cout : nullptr, t.relu, t.y + pix * g.cout,
                              g.cout};
      window_panels(a, nrows, lda, kr, t.w, t.ldw, panels, direct, t.cbuf, coutp, epi);
      if (!direct) conv_gemm_store(t, t.cbuf, coutp, pix, rows, 0, static_cast<int>(g.cout));
    }
  }
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
