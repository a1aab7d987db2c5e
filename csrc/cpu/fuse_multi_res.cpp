// fuse_multi_res on CPU (float32, NCHW or NHWC): each low-res 1x1 conv is one GEMM at low
// resolution, then one parallel pass over the output reads base, the bias and the low-res
// results and writes the output. No full-resolution intermediate is ever written.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kernels/fuse_multi_res.h"

namespace hrnet_fast {
namespace {

// A row is (n, y) in NHWC (W*C contiguous floats) or (n, c, y) in NCHW (W floats).
struct Row {
  float* out;
  const float* base;
  const float* y[kFmrMaxLowres];      // the low-res row each input reads (NCHW: expanded to W)
  const int64_t* col[kFmrMaxLowres];  // NHWC: per output x, the offset of its source pixel in y
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
      float acc = fmr_start(b[i], Bias ? bias : nullptr, i);
      for (int k = 0; k < K; ++k) acc = fmr_add(acc, src[k][i]);
      o[i] = fmr_act(acc, Relu);
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
    float acc = fmr_start(r.base[x], Bias ? &b0 : nullptr, 0);
    for (int k = 0; k < K; ++k) acc = fmr_add(acc, r.y[k][x]);
    r.out[x] = fmr_act(acc, Relu);
  }
}

// The gather along W, done once per distinct (plane, source row) instead of once per output row:
// with an upsampling factor s the expanded row serves s consecutive output rows.
void expand(float* dst, const float* src, const int64_t* col, int64_t w) {
  for (int64_t x = 0; x < w; ++x) dst[x] = src[col[x]];
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
  static_assert(kFmrMaxLowres == 4, "pick() instantiates K = 0..4");
  switch (k) {
    case 0: return pick_k<0>(nhwc, bias, relu);
    case 1: return pick_k<1>(nhwc, bias, relu);
    case 2: return pick_k<2>(nhwc, bias, relu);
    case 3: return pick_k<3>(nhwc, bias, relu);
    default: return pick_k<4>(nhwc, bias, relu);
  }
}

at::Tensor fuse_multi_res_cpu(const at::Tensor& base_in, at::TensorList lowres, at::TensorList weights,
                              const std::optional<at::Tensor>& bias_in, bool relu) {
  fmr_check(base_in, lowres, weights, bias_in);
  TORCH_CHECK(base_in.scalar_type() == at::kFloat,
              "hrnet_fast::fuse_multi_res: the CPU kernel takes float32 inputs, got base of dtype ",
              fmr_dtype(base_in.scalar_type()));
  FmrOutput dst = fmr_output(base_in);
  const bool nhwc = dst.nhwc;
  const at::Tensor& base = dst.base;
  at::Tensor& out = dst.out;
  if (out.numel() == 0) return dst.result;

  const int64_t n = base.size(0), c = base.size(1), h = base.size(2), w = base.size(3);
  const int64_t nk = static_cast<int64_t>(lowres.size());
  std::vector<at::Tensor> ys;
  ys.reserve(nk);
  for (int64_t k = 0; k < nk; ++k) ys.push_back(fmr_project(lowres[k], weights[k], nhwc).contiguous());
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;

  // Column tables: the nearest source column of each output column, as an offset into a row.
  std::vector<int64_t> cols(static_cast<size_t>(nk * w));
  std::vector<float> scale_h(nk);
  std::vector<int64_t> lh(nk), lw(nk);
  std::vector<const float*> yp(nk);
  for (int64_t k = 0; k < nk; ++k) {
    const int64_t wk = lw[k] = lowres[k].size(3), hk = lh[k] = lowres[k].size(2);
    const float sw = fmr_scale(wk, w);
    scale_h[k] = fmr_scale(hk, h);
    yp[k] = ys[k].data_ptr<float>();
    for (int64_t x = 0; x < w; ++x) cols[k * w + x] = fmr_nearest<int64_t>(x, wk, w, sw) * (nhwc ? c : 1);
  }

  // Inputs beyond kFmrMaxLowres go in later chunks over the same row, still in cache.
  const int64_t chunks = std::max<int64_t>(1, (nk + kFmrMaxLowres - 1) / kFmrMaxLowres);
  std::vector<RowFn> fns;
  for (int64_t j = 0; j < chunks; ++j) {
    const int kk = static_cast<int>(std::min<int64_t>(kFmrMaxLowres, nk - j * kFmrMaxLowres));
    fns.push_back(pick(kk, nhwc, bias_p != nullptr && j == 0, relu && j == chunks - 1));
  }

  const float* base_p = base.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  const int64_t rows = nhwc ? n * h : n * c * h;
  const int64_t row_len = nhwc ? w * c : w;
  const int64_t grain = std::max<int64_t>(1, 16384 / row_len);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // NCHW: per input, its expanded row and the source row it holds (-1: none yet).
    std::vector<float> rowbuf(nhwc ? 0 : static_cast<size_t>(nk * w));
    std::vector<const float*> held(nhwc ? 0 : nk, nullptr);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = r % h, nc = r / h;  // nc is n (NHWC) or n*C + ch (NCHW)
      const int64_t ch = nhwc ? 0 : nc % c;
      Row row{out_p + r * row_len, base_p + r * row_len, {}, {}};
      for (int64_t j = 0; j < chunks; ++j) {
        const int64_t k0 = j * kFmrMaxLowres, k1 = std::min<int64_t>(nk, k0 + kFmrMaxLowres);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t sy = fmr_nearest<int64_t>(y, lh[k], h, scale_h[k]);
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
