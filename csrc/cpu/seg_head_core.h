// The segmentation head's per-ISA kernel (seg_head, csrc/cpu/seg_head.cpp): for 6 output pixels at a
// time, the base 1x1 conv's C channels (the micro-kernel, into the thread's C buffer), plus its bias
// and each low-res input's bilinear term, a ReLU, then the classifier's 1x1 conv of those C channels
// and its bias, stored to the output. The C-channel sum (HRNetV2-W48 at 512x1024: 720 channels of
// 128 x 256 pixels, 94 MB) never leaves the thread's L1 and L2: the unfused head wrote it with the
// base conv, read and wrote it in the fusion, and read it again in the classifier. Included after
// winograd_core.h and conv_gemm_core.h under the same HF_ISA_NS.
#pragma once

#ifndef HF_ISA_NS
#error "include seg_head_core.h through csrc/cpu/isa/winograd_variant.h"
#endif

namespace hrnet_fast {
namespace HF_ISA_NS {
namespace {

// One input's four source pointers and its weights for one output pixel.
struct SegHeadSources {
  const float* a[4];
  float ly0, ly1, lx0, lx1;
};

// C[q, q + 8) += K inputs' terms, in order; K known at compile time, so the pointers and weights stay
// in registers across the channels (with the count and the lane check in the loop, GCC reloaded them
// every vector: 3 inputs took ~10 of the 720-channel head's ~30 ms a 512x1024 image).
template <int K>
inline vf8 seg_head_terms(vf8 v, const SegHeadSources* s, int64_t q) {
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) {
    const vf8 a = load8(s[k].a[0] + q), b = load8(s[k].a[1] + q), d = load8(s[k].a[2] + q), e = load8(s[k].a[3] + q);
    v += s[k].ly0 * (s[k].lx0 * a + s[k].lx1 * b) + s[k].ly1 * (s[k].lx0 * d + s[k].lx1 * e);
  }
  return v;
}

// Row i of the group, output pixel p: C[i] = relu(C[i] + bias + sum_k blend_k), the inputs in order
// (the reference's: ((base + bias) + y_0) + y_1 ..., then the ReLU; torch.relu keeps NaN), each term
// fuse_blend's expression (kernels/fuse_multi_res.h): ly0 (lx0 a + lx1 b) + ly1 (lx0 d + lx1 e).
// K < 0: any number of inputs (t.ninputs), a vector of channels at a time through all of them.
template <int K>
void seg_head_sum_k(const SegHeadTask& t, const SegHeadSources* s, float* c) {
  const int64_t cout = t.g->cout, whole = cout / 8 * 8, inputs = K < 0 ? t.ninputs : K;
  for (int64_t q = 0; q < whole; q += 8) {
    vf8 v = load8(c + q) + load8(t.bias + q);
    if constexpr (K >= 0)
      v = seg_head_terms<K>(v, s, q);
    else
      for (int64_t k = 0; k < inputs; ++k) v = seg_head_terms<1>(v, s + k, q);
    v = v < 0.f ? vf8{} : v;
    std::memcpy(c + q, &v, sizeof(v));
  }
  for (int64_t q = whole; q < cout; ++q) {  // the channels past the last whole vector, one at a time
    float v = c[q] + t.bias[q];
    for (int64_t k = 0; k < inputs; ++k)
      v += s[k].ly0 * (s[k].lx0 * s[k].a[0][q] + s[k].lx1 * s[k].a[1][q]) +
           s[k].ly1 * (s[k].lx0 * s[k].a[2][q] + s[k].lx1 * s[k].a[3][q]);
    c[q] = v < 0.f ? 0.f : v;
  }
}

inline void seg_head_sum(const SegHeadTask& t, int64_t p, float* c) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t plane = g.ho * g.wo, n = p / plane, y = p % plane / g.wo, x = p % g.wo;
  SegHeadSources s[kSegHeadMaxInputs];
  for (int64_t k = 0; k < t.ninputs; ++k) {
    const SegHeadInput& in = t.inputs[k];
    const SegHeadTap& ty = in.rows[y];
    const SegHeadTap& tx = in.cols[x];
    const float* image = in.y + n * in.image;
    s[k] = {{image + ty.i0 + tx.i0, image + ty.i0 + tx.i1, image + ty.i1 + tx.i0, image + ty.i1 + tx.i1},
            ty.l0, ty.l1, tx.l0, tx.l1};
  }
  switch (t.ninputs) {
    case 0: return seg_head_sum_k<0>(t, s, c);
    case 1: return seg_head_sum_k<1>(t, s, c);
    case 2: return seg_head_sum_k<2>(t, s, c);
    case 3: return seg_head_sum_k<3>(t, s, c);
    default: return seg_head_sum_k<-1>(t, s, c);
  }
}

// Output pixels [t.r0, t.r1), kMr at a time: the base conv (x's rows read in place; a last partial group's
// copied into abuf, zero-padded), the sum, the classifier into obuf, its bias, stored NHWC or planar.
void seg_head_rows(const SegHeadTask& t) {
  const ConvGemmGeometry& g = *t.g;
  const int64_t panels = (g.cout + kNr - 1) / kNr, ldc = panels * kNr;
  const int64_t cpanels = (t.classes + kNr - 1) / kNr, ldo = cpanels * kNr;
  const int64_t plane = g.ho * g.wo;
  for (int64_t r = t.r0; r < t.r1; r += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, t.r1 - r));
    const float* a = t.x + r * g.cin;
    if (rows < kMr) {
      std::memcpy(t.abuf, a, sizeof(float) * rows * g.cin);
      std::memset(t.abuf + rows * g.cin, 0, sizeof(float) * (kMr - rows) * g.cin);
      a = t.abuf;
    }
    conv_gemm_panels<false>(a, g.cin, t.w, t.ldw, g.cin, panels, t.cbuf, ldc);
    for (int i = 0; i < rows; ++i) seg_head_sum(t, r + i, t.cbuf + i * ldc);
    // rows past the group's end hold the base conv of zeros (finite or NaN): their outputs are not stored
    conv_gemm_panels<false>(t.cbuf, ldc, t.wc, t.ldwc, g.cout, cpanels, t.obuf, ldo);
    if (t.out_planar)
      conv_gemm_epilogue_planar(t.obuf, ldo, rows, static_cast<int>(t.classes), t.bias_c, t.out, r, plane, t.classes,
                                false);
    else
      conv_gemm_epilogue(t.obuf, ldo, rows, static_cast<int>(t.classes), t.bias_c, nullptr, t.out + r * t.classes,
                         t.classes, false);
  }
}

}  // namespace
}  // namespace HF_ISA_NS
}  // namespace hrnet_fast
