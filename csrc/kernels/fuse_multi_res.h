// fuse_multi_res's arithmetic, shared by csrc/cpu/fuse_multi_res.cpp and csrc/cuda/fuse_multi_res.cu:
// the nearest-neighbour index math, the per-element body, and the CUDA __global__ kernel itself.
// The torch-free part compiles under nvcc, g++, and g++ with tests/emu/cuda_emu.h (HF_CUDA_EMU),
// so the CPU tests run the very kernel the GPU runs, grid-stride loop and bounds included.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/hd.h"

namespace hrnet_fast {

// Low-res inputs one CUDA launch (and one CPU row pass) fuses; more are chained in chunks.
constexpr int kFmrMaxLowres = 4;

// ATen's scale for F.interpolate(size=..., mode="nearest"): float(in) / float(out).
HF_HD float fmr_scale(int64_t in, int64_t out) {
  return static_cast<float>(in) / static_cast<float>(out);
}

// Source index of output index `dst`, exactly as ATen's nearest_idx (UpSample.h): the two fast
// paths (same size, exact 2x), else min(floor(float(dst) * scale), in - 1) in float arithmetic.
HF_HD int64_t fmr_nearest(int64_t dst, int64_t in, int64_t out, float scale) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in - 1 ? src : in - 1;
}

// The per-element body, in the reference's order: ((base + bias) + y_0) + y_1 ..., then act.
HF_HD float fmr_start(float base, const float* bias, int64_t c) {
  return bias != nullptr ? base + bias[c] : base;
}
HF_HD float fmr_add(float acc, float y) { return acc + y; }
// `v < 0` is false for NaN, so NaN passes through as torch.relu does.
HF_HD float fmr_act(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

// One low-res input after its 1x1 conv: float32, dense, in the output's layout
// (NHWC: [N, h, w, C]; NCHW: [N, C, h, w]).
struct FmrLowres {
  const float* data;
  int64_t h, w;
  float scale_h, scale_w;
};

// Everything the CUDA kernel needs, passed by value. `base`/`out` are dense in the layout that
// `nhwc` names; `bias` is float32 (or null); `out` may alias `base` (chained chunks).
template <typename scalar_t>
struct FmrParams {
  const scalar_t* base;
  scalar_t* out;
  const float* bias;
  int64_t n, c, h, w;
  bool nhwc, relu;
  int k;
  FmrLowres low[kFmrMaxLowres];
};

// Offset of output element (n, ch, y, x)'s source in low-res input `l`.
HF_HD int64_t fmr_lowres_offset(const FmrLowres& l, int64_t n, int64_t ch, int64_t y, int64_t x,
                                int64_t c, int64_t h, int64_t w, bool nhwc) {
  const int64_t sy = fmr_nearest(y, l.h, h, l.scale_h);
  const int64_t sx = fmr_nearest(x, l.w, w, l.scale_w);
  return nhwc ? ((n * l.h + sy) * l.w + sx) * c + ch : ((n * c + ch) * l.h + sy) * l.w + sx;
}

// Output element `i` (linear index in the dense layout): what each CUDA thread computes.
template <typename scalar_t>
HF_HD void fmr_element(const FmrParams<scalar_t>& p, int64_t i) {
  int64_t ch, x, y, n, t;
  if (p.nhwc) {
    ch = i % p.c; t = i / p.c;
    x = t % p.w; t /= p.w;
    y = t % p.h; n = t / p.h;
  } else {
    x = i % p.w; t = i / p.w;
    y = t % p.h; t /= p.h;
    ch = t % p.c; n = t / p.c;
  }
  float acc = fmr_start(static_cast<float>(p.base[i]), p.bias, ch);
  for (int k = 0; k < p.k; ++k) {
    acc = fmr_add(acc, p.low[k].data[fmr_lowres_offset(p.low[k], n, ch, y, x, p.c, p.h, p.w, p.nhwc)]);
  }
  p.out[i] = static_cast<scalar_t>(fmr_act(acc, p.relu));
}

// Launch shape: 256 threads, enough blocks to cover `numel` up to `max_blocks`; the kernel's
// grid-stride loop covers the rest.
constexpr int kFmrThreads = 256;
constexpr int64_t kFmrMaxBlocks = 8192;
inline int64_t fmr_blocks(int64_t numel, int64_t max_blocks = kFmrMaxBlocks) {
  const int64_t b = (numel + kFmrThreads - 1) / kFmrThreads;
  return b < 1 ? 1 : (b > max_blocks ? max_blocks : b);
}

#if defined(__CUDACC__) || defined(HF_CUDA_EMU)
template <typename scalar_t>
__global__ void fuse_multi_res_kernel(FmrParams<scalar_t> p) {
  const int64_t numel = p.n * p.c * p.h * p.w;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    fmr_element(p, i);
  }
}
#endif

}  // namespace hrnet_fast

// ---- host side shared by the CPU and CUDA entry points: argument checks, low-res GEMMs -------
// The Python API checks first with the same wording; these guard direct torch.ops calls.
// (Both nvcc passes must see these: the device pass parses host code too.)
#if !defined(HF_CUDA_EMU)
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

namespace hrnet_fast {

// torch's Python name ("torch.float32"), so C++ and Python errors read the same.
inline std::string fmr_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// "lowres[2]", "weights[0]" or "bias", streamed only when a check fails (no strings per call).
struct FmrArg {
  const char* name;
  size_t k;
};
inline std::ostream& operator<<(std::ostream& os, const FmrArg& a) {
  return a.k == SIZE_MAX ? os << a.name : os << a.name << '[' << a.k << ']';
}

inline void fmr_check(const at::Tensor& base, at::TensorList lowres, at::TensorList weights,
                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "hrnet_fast::fuse_multi_res: ";
  TORCH_CHECK(base.dim() == 4, op, "base must be 4-D [N, C, H, W], got shape ", base.sizes());
  TORCH_CHECK(lowres.size() == weights.size(), op, "got ", lowres.size(), " lowres inputs but ",
              weights.size(), " weights: need one weight per input");
  const int64_t n = base.size(0), c = base.size(1);
  auto same = [&](const at::Tensor& t, const FmrArg& name) {
    TORCH_CHECK(t.device() == base.device(), op, name, " is on ", t.device(), " but base is on ",
                base.device(), ": all inputs must share a device");
    TORCH_CHECK(t.scalar_type() == base.scalar_type(), op, name, " has dtype ", fmr_dtype(t.scalar_type()),
                " but base has ", fmr_dtype(base.scalar_type()), ": all inputs must share a dtype");
  };
  for (size_t k = 0; k < lowres.size(); ++k) {
    const at::Tensor& x = lowres[k];
    const at::Tensor& w = weights[k];
    const FmrArg xs{"lowres", k}, ws{"weights", k};
    TORCH_CHECK(x.dim() == 4, op, xs, " must be 4-D [N, C, H, W], got shape ", x.sizes());
    TORCH_CHECK(x.size(0) == n, op, xs, " has batch ", x.size(0), " but base has batch ", n);
    // An empty source has no nearest pixel: the index math would read before its start.
    TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, xs, " must have a non-empty spatial size, got ", x.sizes());
    const int64_t ck = x.size(1);
    const bool shape_ok = (w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1)) &&
                          w.size(0) == c && w.size(1) == ck;
    TORCH_CHECK(shape_ok, op, ws, " must have shape (", c, ", ", ck, ") or (", c, ", ", ck,
                ", 1, 1) to map ", xs, "'s ", ck, " channels to base's ", c, ", got ", w.sizes());
    same(x, xs);
    same(w, ws);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c, op, "bias must have shape (", c, ",), got ",
                bias->sizes());
    same(*bias, FmrArg{"bias", SIZE_MAX});
  }
}

// Where a kernel writes: `out`, dense in base's suggested layout. `result` has the fake's strides
// (empty_like(base)); only an oddly-strided dense base makes them differ, and finish() copies back.
struct FmrOutput {
  bool nhwc;
  at::Tensor base, result, out;
  at::Tensor finish() {
    if (!out.is_same(result)) result.copy_(out);
    return result;
  }
};

inline FmrOutput fmr_output(const at::Tensor& base_in) {
  const auto fmt = base_in.suggest_memory_format();
  at::Tensor base = base_in.contiguous(fmt);
  at::Tensor result = at::empty_like(base_in);
  at::Tensor out = result.is_contiguous(fmt) ? result : at::empty_like(base);
  return {fmt == at::MemoryFormat::ChannelsLast, base, result, out};
}

// conv1x1(x, w) at x's resolution as one GEMM, float32, dense in the output's layout:
// [N*h*w, C] (nhwc) or [N, C, h*w]. Reads x in place when it is dense NCHW or NHWC.
inline at::Tensor fmr_project(const at::Tensor& x, const at::Tensor& weight, bool nhwc) {
  const int64_t n = x.size(0), ck = x.size(1), hw = x.size(2) * x.size(3), c = weight.size(0);
  const at::Tensor w = weight.reshape({c, ck});
  // Half/bfloat16 (CUDA): cuBLAS accumulates in float32 and writes float32.
  const bool f32 = x.scalar_type() == at::kFloat;
  auto mm = [&](const at::Tensor& a, const at::Tensor& b) { return f32 ? at::mm(a, b) : at::mm(a, b, at::kFloat); };
  auto bmm = [&](const at::Tensor& a, const at::Tensor& b) { return f32 ? at::bmm(a, b) : at::bmm(a, b, at::kFloat); };
  const at::Tensor xc = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)
                            ? x
                            : x.contiguous(x.suggest_memory_format());
  if (nhwc && xc.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return mm(xc.permute({0, 2, 3, 1}).reshape({n * hw, ck}), w.t());
  }
  // [N, C_k, h*w] as a view of NCHW or NHWC storage (strides (C_k*hw, hw, 1) or (C_k*hw, 1, C_k)).
  const at::Tensor xv = xc.reshape({n, ck, hw});
  if (nhwc) return bmm(xv.transpose(1, 2), w.t().expand({n, ck, c}));
  if (n == 1) return mm(w, xv[0]);
  return bmm(w.expand({n, c, ck}), xv);
}

}  // namespace hrnet_fast
#endif
