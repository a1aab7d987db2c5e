// fuse_multi_res on CPU (float32, NCHW or NHWC): each low-res 1x1 conv is one GEMM at low
// resolution, then one parallel pass over the output reads base, the bias and the low-res
// results and writes the output. No full-resolution intermediate is ever written: bilinear
// upsampling interpolates one output row of each input at a time, into a per-thread row buffer.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/conv_gemm.h"
#include "cpu/fuse_project.h"
#include "cpu/tensor_view.h"
#include "kernels/fuse_multi_res.h"

namespace hrnet_fast {

// conv1x1(x, weight) as fuse_project gives it, by conv_bias_act's direct kernel (csrc/cpu/conv_gemm.cpp)
// where it takes the call: NHWC output, x float32 channels_last, C_k within its bounds. No op is
// dispatched per input, where fuse_project's views and at::mm cost ~50 us of a W32 fusion's ~90 at
// batch 1 (rdtsc inside the op, caches cold after the convs before it).
at::Tensor fuse_project_cpu(const at::Tensor& x, const at::Tensor& weight, bool nhwc) {
  const int64_t n = x.size(0), ck = x.size(1), h = x.size(2), w = x.size(3), c = weight.size(0);
  if (!nhwc || x.scalar_type() != at::kFloat || !x.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      !conv_gemm_takes(ck, 1, 1))
    return fuse_project(x, weight, nhwc).contiguous();
  const ConvGemmGeometry g{n, h, w, ck, h, w, c, 1, 1, 1, 0};
  at::Tensor y = empty_float({n * h * w, c});
  at::Tensor packed;
  int64_t ldw = 0;
  const float* wp = conv_gemm_weight(weight, packed, ldw);
  conv_gemm_run(g, x.data_ptr<float>(), wp, ldw, nullptr, nullptr, false, y.data_ptr<float>());
  return y;
}

namespace {

// A row is (n, y) in NHWC (W*C contiguous floats) or (n, c, y) in NCHW (W floats).
struct Row {
  float* out;
  const float* base;
  const float* y[kFuseMaxLowres];      // the low-res row each input reads (NCHW: expanded to W)
  const int64_t* col[kFuseMaxLowres];  // NHWC: per output x, the offset of its source pixel in y
};

// NHWC: for each x the sources are contiguous channel vectors, so the inner loop is unit-stride.
template <int K, bool Bias, bool Relu>
void nhwc_row(const Row& r, const float* bias, int64_t w, int64_t c, int64_t /*ch*/) {
  for (int64_t x = 0; x < w; ++x) {
    const float* src[K > 0 ? K : 1];
    for (int k = 0; k < K; ++k) src[k] = r.y[k] + r.col[k][x];
    const float* b = r.base + x * c;
    float* o = r.out + x * c;
    // out may alias base (later chunks): each element is read before it is written, same index.
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) {
      float acc = fuse_start(b[i], Bias ? bias : nullptr, i);
      for (int k = 0; k < K; ++k) acc = fuse_add(acc, src[k][i]);
      o[i] = fuse_act(acc, Relu);
    }
  }
}

// NCHW: r.y[k] is low-res row k already expanded to the output's width (see expand()), so every
// read is unit-stride and the loop vectorises along W.
template <int K, bool Bias, bool Relu>
void nchw_row(const Row& r, const float* bias, int64_t w, int64_t /*c*/, int64_t ch) {
  const float b0 = Bias ? bias[ch] : 0.f;
#pragma omp simd
  for (int64_t x = 0; x < w; ++x) {
    float acc = fuse_start(r.base[x], Bias ? &b0 : nullptr, 0);
    for (int k = 0; k < K; ++k) acc = fuse_add(acc, r.y[k][x]);
    r.out[x] = fuse_act(acc, Relu);
  }
}

// The gather along W, done once per distinct (plane, source row) instead of once per output row:
// with an upsampling factor s the expanded row serves s consecutive output rows.
void expand(float* dst, const float* src, const int64_t* col, int64_t w) {
  for (int64_t x = 0; x < w; ++x) dst[x] = src[col[x]];
}

// Bilinear: one output row of a low-res input, from its two source rows r0 and r1 (weights ly0, ly1)
// and each output column's two source columns (taps, offsets within a row). `stride` is C (NHWC:
// each column a vector of channels) or 1 (NCHW).
void interpolate_row(float* dst, const float* r0, const float* r1, float ly0, float ly1,
                     const FuseTaps<int64_t>* taps, int64_t w, int64_t stride) {
  for (int64_t x = 0; x < w; ++x) {
    const FuseTaps<int64_t>& t = taps[x];
    const float *a = r0 + t.i0, *b = r0 + t.i1, *d = r1 + t.i0, *e = r1 + t.i1;
    float* o = dst + x * stride;
#pragma omp simd
    for (int64_t i = 0; i < stride; ++i) o[i] = fuse_blend(a[i], b[i], d[i], e[i], ly0, ly1, t.l0, t.l1);
  }
}

using RowFn = void (*)(const Row&, const float*, int64_t, int64_t, int64_t);

template <int K>
RowFn pick_k(bool nhwc, bool bias, bool relu) {
  if (nhwc) {
    return bias ? (relu ? nhwc_row<K, true, true> : nhwc_row<K, true, false>)
                : (relu ? nhwc_row<K, false, true> : nhwc_row<K, false, false>);
  }
  return bias ? (relu ? nchw_row<K, true, true> : nchw_row<K, true, false>)
              : (relu ? nchw_row<K, false, true> : nchw_row<K, false, false>);
}

RowFn pick(int k, bool nhwc, bool bias, bool relu) {
  static_assert(kFuseMaxLowres == 4, "pick() instantiates K = 0..4");
  switch (k) {
    case 0: return pick_k<0>(nhwc, bias, relu);
    case 1: return pick_k<1>(nhwc, bias, relu);
    case 2: return pick_k<2>(nhwc, bias, relu);
    case 3: return pick_k<3>(nhwc, bias, relu);
    default: return pick_k<4>(nhwc, bias, relu);
  }
}

at::Tensor fuse_multi_res_cpu(const at::Tensor& base_in, at::TensorList lowres, at::TensorList weights,
                              const std::optional<at::Tensor>& bias_in, bool relu, c10::string_view mode,
                              bool align_corners) {
  fuse_check(base_in, lowres, weights, bias_in);
  const bool bilinear = fuse_bilinear(mode, align_corners);
  TORCH_CHECK(base_in.scalar_type() == at::kFloat,
              "hrnet_fast::fuse_multi_res: the CPU kernel takes float32 inputs, got base of dtype ",
              fuse_dtype(base_in.scalar_type()));
  FuseOutput dst = fuse_output(base_in);
  const bool nhwc = dst.nhwc;
  const at::Tensor& base = dst.base;
  at::Tensor& out = dst.out;
  if (out.numel() == 0) return dst.result;

  const int64_t n = base.size(0), c = base.size(1), h = base.size(2), w = base.size(3);
  const int64_t nk = static_cast<int64_t>(lowres.size());
  std::vector<at::Tensor> ys;
  ys.reserve(nk);
  for (int64_t k = 0; k < nk; ++k) ys.push_back(fuse_project_cpu(lowres[k], weights[k], nhwc));
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;

  // Column tables: the nearest source column of each output column, as an offset into a row.
  std::vector<int64_t> cols(static_cast<size_t>(nk * w));
  std::vector<float> scale_h(nk);
  std::vector<int64_t> lh(nk), lw(nk);
  std::vector<const float*> yp(nk);
  // Bilinear: each output column's two source columns (as offsets into a row) and weights, and the
  // identity column table for rows already interpolated to the output's width.
  const int64_t stride = nhwc ? c : 1;
  std::vector<FuseTaps<int64_t>> taps(bilinear ? static_cast<size_t>(nk * w) : 0);
  std::vector<int64_t> identity(bilinear && nhwc ? static_cast<size_t>(w) : 0);
  for (int64_t x = 0; x < static_cast<int64_t>(identity.size()); ++x) identity[x] = x * c;
  for (int64_t k = 0; k < nk; ++k) {
    const int64_t wk = lw[k] = lowres[k].size(3), hk = lh[k] = lowres[k].size(2);
    yp[k] = ys[k].data_ptr<float>();
    if (bilinear) {
      const float sw = fuse_linear_scale(wk, w, align_corners);
      scale_h[k] = fuse_linear_scale(hk, h, align_corners);
      for (int64_t x = 0; x < w; ++x) {
        FuseTaps<int64_t> t = fuse_linear<int64_t>(x, wk, sw, align_corners);
        t.i0 *= stride;
        t.i1 *= stride;
        taps[k * w + x] = t;
      }
      continue;
    }
    const float sw = fuse_scale(wk, w);
    scale_h[k] = fuse_scale(hk, h);
    for (int64_t x = 0; x < w; ++x) cols[k * w + x] = fuse_nearest<int64_t>(x, wk, w, sw) * stride;
  }

  // Inputs beyond kFuseMaxLowres go in later chunks over the same row, still in cache.
  const int64_t chunks = std::max<int64_t>(1, (nk + kFuseMaxLowres - 1) / kFuseMaxLowres);
  std::vector<RowFn> fns;
  for (int64_t j = 0; j < chunks; ++j) {
    const int kk = static_cast<int>(std::min<int64_t>(kFuseMaxLowres, nk - j * kFuseMaxLowres));
    fns.push_back(pick(kk, nhwc, bias_p != nullptr && j == 0, relu && j == chunks - 1));
  }

  const float* base_p = base.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t rows = nhwc ? n * h : n * c * h;
  const int64_t row_len = nhwc ? w * c : w;
  // Rows of at least 16K floats a task, but never fewer tasks than threads where there are rows enough:
  // at batch 1 W32's fusions have 16-64 rows of 1536 floats, which 16K-float tasks made 2-7 of, so on
  // the 16-core machine the pass used at most 7 of 16 threads (48-57% efficiency from 8 to 16, run 9).
  const int64_t team = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16384 / row_len, (rows + team - 1) / team));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // NCHW nearest: per input, its expanded row and the source row it holds (null: none yet).
    // Bilinear: per input, its row interpolated to the output's width.
    std::vector<float> rowbuf(bilinear ? static_cast<size_t>(nk * row_len) : nhwc ? 0 : static_cast<size_t>(nk * w));
    std::vector<const float*> held(nhwc ? 0 : nk, nullptr);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % h, nc = r / h;  // nc is n (NHWC) or n*C + ch (NCHW)
      const int64_t ch = nhwc ? 0 : nc % c;
      Row row{out_p + r * row_len, base_p + r * row_len, {}, {}};
      for (int64_t j = 0; j < chunks; ++j) {
        const int64_t k0 = j * kFuseMaxLowres, k1 = std::min<int64_t>(nk, k0 + kFuseMaxLowres);
        for (int64_t k = k0; k < k1; ++k) {
          if (bilinear) {
            const FuseTaps<int64_t> ty = fuse_linear<int64_t>(y, lh[k], scale_h[k], align_corners);
            const float* r0 = yp[k] + (nc * lh[k] + ty.i0) * lw[k] * stride;
            const float* r1 = yp[k] + (nc * lh[k] + ty.i1) * lw[k] * stride;
            float* buf = rowbuf.data() + k * row_len;
            interpolate_row(buf, r0, r1, ty.l0, ty.l1, taps.data() + k * w, w, stride);
            row.y[k - k0] = buf;
            if (nhwc) row.col[k - k0] = identity.data();
            continue;
          }
          const int64_t sy = fuse_nearest<int64_t>(y, lh[k], h, scale_h[k]);
          const int64_t* col = cols.data() + k * w;
          if (nhwc) {
            row.y[k - k0] = yp[k] + (nc * lh[k] + sy) * lw[k] * c;
            row.col[k - k0] = col;
          } else {
            const float* src = yp[k] + (nc * lh[k] + sy) * lw[k];
            float* buf = rowbuf.data() + k * w;
            if (lw[k] != w && held[k] != src) expand(buf, src, col, w);
            held[k] = src;
            row.y[k - k0] = lw[k] == w ? src : buf;  // same width: the column index is the identity
          }
        }
        if (j > 0) row.base = row.out;
        fns[j](row, bias_p, w, c, ch);
      }
    }
  });
  return dst.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("fuse_multi_res", &fuse_multi_res_cpu); }

}  // namespace hrnet_fast
