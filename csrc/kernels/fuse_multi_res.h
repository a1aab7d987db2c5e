// fuse_multi_res's arithmetic, shared by csrc/cpu/fuse_multi_res.cpp and csrc/cuda/fuse_multi_res.cu:
// the nearest-neighbour and bilinear index math, the per-element body, and the CUDA kernel itself.
// The torch-free part compiles under nvcc, g++, and g++ with tests/emu/cuda_emu.h (HF_CUDA_EMU),
// so the CPU tests run the very kernel the GPU runs, grid-stride loop and bounds included.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/hd.h"

namespace hrnet_fast {

// Low-res inputs one CUDA launch (and one CPU row pass) fuses; more are chained in chunks.
constexpr int kFuseMaxLowres = 4;

// ATen's scale for F.interpolate(size=..., mode="nearest"): float(in) / float(out).
HF_HD float fuse_scale(int64_t in, int64_t out) {
  return static_cast<float>(in) / static_cast<float>(out);
}

// Source index of output index `dst`, exactly as ATen's nearest_idx (UpSample.h): the two fast
// paths (same size, exact 2x), else min(floor(float(dst) * scale), in - 1) in float arithmetic.
template <typename index_t>
HF_HD index_t fuse_nearest(index_t dst, index_t in, index_t out, float scale) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const index_t src = static_cast<index_t>(floorf(static_cast<float>(dst) * scale));
  return src < in - 1 ? src : in - 1;
}

// ATen's scale for F.interpolate(size=..., mode="bilinear", align_corners=...) (area_pixel_compute_scale
// without a scale factor), in float as ATen computes it for float and half inputs.
HF_HD float fuse_linear_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.f;
  return static_cast<float>(in) / static_cast<float>(out);
}

// The two source indices of output index `dst` along one axis and their weights, as ATen's
// upsample_bilinear2d computes them: the source coordinate (align_corners: dst * scale; else
// (dst + 0.5) * scale - 0.5, clamped at 0), its floor, the next index unless at the edge, and the
// fractional part as the far weight.
template <typename index_t>
struct FuseTaps {
  index_t i0, i1;
  float l0, l1;
};

template <typename index_t>
HF_HD FuseTaps<index_t> fuse_linear(index_t dst, index_t in, float scale, bool align_corners) {
  float real = align_corners ? scale * static_cast<float>(dst) : scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (real < 0.f) real = 0.f;
  const index_t i0 = static_cast<index_t>(real);
  const float l1 = real - static_cast<float>(i0) < 1.f ? real - static_cast<float>(i0) : 1.f;
  return {i0, i0 < in - 1 ? i0 + 1 : i0, 1.f - l1, l1};
}

// The bilinear blend of four source values, in ATen's CUDA kernel's order.
HF_HD float fuse_blend(float a00, float a01, float a10, float a11, float ly0, float ly1, float lx0, float lx1) {
  return ly0 * (lx0 * a00 + lx1 * a01) + ly1 * (lx0 * a10 + lx1 * a11);
}

// The per-element body, in the reference's order: ((base + bias) + y_0) + y_1 ..., then act.
HF_HD float fuse_start(float base, const float* bias, int64_t c) {
  return bias != nullptr ? base + bias[c] : base;
}
HF_HD float fuse_add(float acc, float y) { return acc + y; }
// `v < 0` is false for NaN, so NaN passes through as torch.relu does.
HF_HD float fuse_act(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

// One low-res input after its 1x1 conv: float32, dense, in the output's layout
// (NHWC: [N, h, w, C]; NCHW: [N, C, h, w]).
struct FuseLowres {
  const float* data;
  int64_t h, w;
  float scale_h, scale_w;  // fuse_scale (nearest) or fuse_linear_scale (bilinear)
};

// Everything the CUDA kernel needs, passed by value. `base`/`out` are dense in the layout that
// `nhwc` names; `bias` is float32 (or null); `out` may alias `base` (chained chunks).
template <typename scalar_t>
struct FuseParams {
  const scalar_t* base;
  scalar_t* out;
  const float* bias;
  int64_t n, c, h, w;
  bool nhwc, relu;
  bool bilinear, align_corners;  // the upsampling of every low-res input (nearest when !bilinear)
  int k;
  FuseLowres low[kFuseMaxLowres];
};

// Offset of output element (n, ch, y, x)'s source in low-res input `l`. `index_t` is int32_t when
// every tensor the kernel addresses has fewer than 2**31 elements (then the division-heavy index math
// runs at full speed), int64_t otherwise.
template <typename index_t>
HF_HD index_t fuse_lowres_offset(const FuseLowres& l, index_t n, index_t ch, index_t y, index_t x,
                                index_t c, index_t h, index_t w, bool nhwc) {
  const index_t lh = static_cast<index_t>(l.h), lw = static_cast<index_t>(l.w);
  const index_t sy = fuse_nearest<index_t>(y, lh, h, l.scale_h);
  const index_t sx = fuse_nearest<index_t>(x, lw, w, l.scale_w);
  return nhwc ? ((n * lh + sy) * lw + sx) * c + ch : ((n * c + ch) * lh + sy) * lw + sx;
}

// Bilinear: the offsets of the four source values output pixel (n, y, x) blends in low-res input `l`
// (channel ch; NHWC or NCHW) and their weights along each axis.
template <typename index_t>
struct FuseCorners {
  index_t o00, o01, o10, o11;
  float ly0, ly1, lx0, lx1;
};

template <typename index_t>
HF_HD FuseCorners<index_t> fuse_corners(const FuseLowres& l, index_t n, index_t ch, index_t y, index_t x, index_t c,
                                        bool nhwc, bool align_corners) {
  const index_t lh = static_cast<index_t>(l.h), lw = static_cast<index_t>(l.w);
  const FuseTaps<index_t> ty = fuse_linear<index_t>(y, lh, l.scale_h, align_corners);
  const FuseTaps<index_t> tx = fuse_linear<index_t>(x, lw, l.scale_w, align_corners);
  // the offset of source (sy, sx) is row(sy) + col(sx) in either layout
  const index_t r0 = nhwc ? (n * lh + ty.i0) * lw * c + ch : ((n * c + ch) * lh + ty.i0) * lw;
  const index_t r1 = nhwc ? (n * lh + ty.i1) * lw * c + ch : ((n * c + ch) * lh + ty.i1) * lw;
  const index_t c0 = nhwc ? tx.i0 * c : tx.i0, c1 = nhwc ? tx.i1 * c : tx.i1;
  return {r0 + c0, r0 + c1, r1 + c0, r1 + c1, ty.l0, ty.l1, tx.l0, tx.l1};
}

// Output element `i` (linear index in the dense layout), any layout: what each thread of the
// scalar kernel computes.
template <typename scalar_t, typename index_t>
HF_HD void fuse_element(const FuseParams<scalar_t>& p, index_t i) {
  const index_t c = static_cast<index_t>(p.c), h = static_cast<index_t>(p.h), w = static_cast<index_t>(p.w);
  index_t ch, x, y, n, t;
  if (p.nhwc) {
    ch = i % c; t = i / c;
    x = t % w; t /= w;
    y = t % h; n = t / h;
  } else {
    x = i % w; t = i / w;
    y = t % h; t /= h;
    ch = t % c; n = t / c;
  }
  float acc = fuse_start(static_cast<float>(p.base[i]), p.bias, ch);
  for (int k = 0; k < p.k; ++k) {
    const FuseLowres& l = p.low[k];
    if (p.bilinear) {
      const FuseCorners<index_t> q = fuse_corners<index_t>(l, n, ch, y, x, c, p.nhwc, p.align_corners);
      acc = fuse_add(acc, fuse_blend(l.data[q.o00], l.data[q.o01], l.data[q.o10], l.data[q.o11], q.ly0, q.ly1, q.lx0,
                                     q.lx1));
    } else {
      acc = fuse_add(acc, l.data[fuse_lowres_offset<index_t>(l, n, ch, y, x, c, h, w, p.nhwc)]);
    }
  }
  p.out[i] = static_cast<scalar_t>(fuse_act(acc, p.relu));
}

// Channels one thread of the vector kernel handles: 16 bytes of the output (4 float32, 8 half).
template <typename scalar_t>
constexpr int fuse_vec_width() {
  return Vec16<scalar_t>::kLen;
}

// NHWC, V = fuse_vec_width<scalar_t>() channels of one pixel starting at channel `ch` (a multiple of V):
// one 16-byte load of base, 16-byte loads of each low-res source, one 16-byte store, and the pixel's
// index math once for V elements. The same per-element order as fuse_element.
template <typename scalar_t, typename index_t>
HF_HD void fuse_vector(const FuseParams<scalar_t>& p, index_t unit) {
  constexpr int V = fuse_vec_width<scalar_t>();
  constexpr int VF = Vec16<float>::kLen;  // float32 low-res values per 16-byte load
  const index_t c = static_cast<index_t>(p.c), h = static_cast<index_t>(p.h), w = static_cast<index_t>(p.w);
  const index_t groups = c / V;
  const index_t ch = (unit % groups) * V;
  index_t t = unit / groups;
  const index_t x = t % w;
  t /= w;
  const index_t y = t % h, n = t / h;
  const index_t i = unit * V;  // == ((n * h + y) * w + x) * c + ch
  const Vec16<scalar_t> b = *reinterpret_cast<const Vec16<scalar_t>*>(p.base + i);
  float acc[V];
  for (int v = 0; v < V; ++v) acc[v] = fuse_start(static_cast<float>(b.v[v]), p.bias, ch + v);
  for (int k = 0; k < p.k; ++k) {
    const FuseLowres& l = p.low[k];
    if (p.bilinear) {
      const FuseCorners<index_t> q = fuse_corners<index_t>(l, n, ch, y, x, c, true, p.align_corners);
      for (int j = 0; j < V; j += VF) {
        const Vec16<float> a = *reinterpret_cast<const Vec16<float>*>(l.data + q.o00 + j);
        const Vec16<float> b = *reinterpret_cast<const Vec16<float>*>(l.data + q.o01 + j);
        const Vec16<float> d = *reinterpret_cast<const Vec16<float>*>(l.data + q.o10 + j);
        const Vec16<float> e = *reinterpret_cast<const Vec16<float>*>(l.data + q.o11 + j);
        for (int v = 0; v < VF; ++v)
          acc[j + v] = fuse_add(acc[j + v], fuse_blend(a.v[v], b.v[v], d.v[v], e.v[v], q.ly0, q.ly1, q.lx0, q.lx1));
      }
    } else {
      const float* src = l.data + fuse_lowres_offset<index_t>(l, n, ch, y, x, c, h, w, true);
      for (int j = 0; j < V; j += VF) {
        const Vec16<float> v16 = *reinterpret_cast<const Vec16<float>*>(src + j);
        for (int v = 0; v < VF; ++v) acc[j + v] = fuse_add(acc[j + v], v16.v[v]);
      }
    }
  }
  Vec16<scalar_t> o;
  for (int v = 0; v < V; ++v) o.v[v] = static_cast<scalar_t>(fuse_act(acc[v], p.relu));
  *reinterpret_cast<Vec16<scalar_t>*>(p.out + i) = o;
}

// Which kernel runs: vector (NHWC, C a multiple of V, every pointer 16-byte aligned) or scalar, and
// 32- or 64-bit indices. `units` is what the grid covers (elements, or V-channel groups).
template <typename scalar_t>
inline ElementwisePlan fuse_plan(const FuseParams<scalar_t>& p, int64_t largest_numel) {
  constexpr int V = fuse_vec_width<scalar_t>();
  bool vector = p.nhwc && p.c % V == 0 && aligned16(p.base) && aligned16(p.out);
  for (int k = 0; k < p.k; ++k) vector = vector && aligned16(p.low[k].data);
  const int64_t numel = p.n * p.c * p.h * p.w;
  return {vector, needs_wide_indices(largest_numel), vector ? numel / V : numel};
}

#if defined(__CUDACC__) || defined(HF_CUDA_EMU)
template <typename scalar_t, typename index_t, bool Vector>
__global__ void fuse_multi_res_kernel(FuseParams<scalar_t> p, index_t units) {
  const index_t step = static_cast<index_t>(blockDim.x * gridDim.x);
  for (index_t u = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x); u < units; u += step) {
    if constexpr (Vector) {
      fuse_vector<scalar_t, index_t>(p, u);
    } else {
      fuse_element<scalar_t, index_t>(p, u);
    }
  }
}

// Runs the planned kernel through `launch(kernel, units)`: the CUDA entry point launches it with
// <<<>>>, the tests through the emulator, so both take the same path for the same inputs.
template <typename scalar_t, typename Launch>
void fuse_dispatch(const FuseParams<scalar_t>& p, const ElementwisePlan& plan, Launch&& launch) {
  if (plan.wide) {
    if (plan.vector) launch(fuse_multi_res_kernel<scalar_t, int64_t, true>, p, int64_t{plan.units});
    else launch(fuse_multi_res_kernel<scalar_t, int64_t, false>, p, int64_t{plan.units});
  } else {
    const int32_t units = static_cast<int32_t>(plan.units);
    if (plan.vector) launch(fuse_multi_res_kernel<scalar_t, int32_t, true>, p, units);
    else launch(fuse_multi_res_kernel<scalar_t, int32_t, false>, p, units);
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
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

namespace hrnet_fast {

// torch's Python name ("torch.float32"), so C++ and Python errors read the same.
inline std::string fuse_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// "lowres[2]", "weights[0]" or "bias", streamed only when a check fails (no strings per call).
struct FuseArg {
  const char* name;
  size_t k;
};
inline std::ostream& operator<<(std::ostream& os, const FuseArg& a) {
  return a.k == SIZE_MAX ? os << a.name : os << a.name << '[' << a.k << ']';
}

inline void fuse_check(const at::Tensor& base, at::TensorList lowres, at::TensorList weights,
                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "hrnet_fast::fuse_multi_res: ";
  TORCH_CHECK(base.dim() == 4, op, "base must be 4-D [N, C, H, W], got shape ", base.sizes());
  TORCH_CHECK(lowres.size() == weights.size(), op, "got ", lowres.size(), " lowres inputs but ",
              weights.size(), " weights: need one weight per input");
  const int64_t n = base.size(0), c = base.size(1);
  auto same = [&](const at::Tensor& t, const FuseArg& name) {
    TORCH_CHECK(t.device() == base.device(), op, name, " is on ", t.device(), " but base is on ",
                base.device(), ": all inputs must share a device");
    TORCH_CHECK(t.scalar_type() == base.scalar_type(), op, name, " has dtype ", fuse_dtype(t.scalar_type()),
                " but base has ", fuse_dtype(base.scalar_type()), ": all inputs must share a dtype");
  };
  for (size_t k = 0; k < lowres.size(); ++k) {
    const at::Tensor& x = lowres[k];
    const at::Tensor& w = weights[k];
    const FuseArg xs{"lowres", k}, ws{"weights", k};
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
    same(*bias, FuseArg{"bias", SIZE_MAX});
  }
}

// Whether `mode` is "bilinear" (else "nearest"), after checking it and align_corners as
// F.interpolate would: align_corners goes with the interpolating mode only.
inline bool fuse_bilinear(c10::string_view mode, bool align_corners) {
  constexpr const char* op = "hrnet_fast::fuse_multi_res: ";
  TORCH_CHECK(mode == "nearest" || mode == "bilinear", op, "mode must be 'nearest' or 'bilinear', got '", mode, "'");
  TORCH_CHECK(mode == "bilinear" || !align_corners, op,
              "align_corners=True goes with mode='bilinear' only (as in F.interpolate), got mode='", mode, "'");
  return mode == "bilinear";
}

// Each low-res input's scales for the kernels: nearest's in/out, or bilinear's (align_corners-aware).
inline FuseLowres fuse_lowres(const float* data, int64_t hk, int64_t wk, int64_t h, int64_t w, bool bilinear,
                            bool align_corners) {
  if (bilinear) {
    return FuseLowres{data, hk, wk, fuse_linear_scale(hk, h, align_corners), fuse_linear_scale(wk, w, align_corners)};
  }
  return FuseLowres{data, hk, wk, fuse_scale(hk, h), fuse_scale(wk, w)};
}

// Where a kernel writes: `out`, dense in base's suggested layout. `result` has the fake's strides
// (empty_like(base)); only an oddly-strided dense base makes them differ, and finish() copies back.
struct FuseOutput {
  bool nhwc;
  at::Tensor base, result, out;
  at::Tensor finish() {
    if (!out.is_same(result)) result.copy_(out);
    return result;
  }
};

inline FuseOutput fuse_output(const at::Tensor& base_in) {
  const auto fmt = base_in.suggest_memory_format();
  at::Tensor base = base_in.contiguous(fmt);
  at::Tensor result = at::empty_like(base_in);
  at::Tensor out = result.is_contiguous(fmt) ? result : at::empty_like(base);
  return {fmt == at::MemoryFormat::ChannelsLast, base, result, out};
}

// conv1x1(x, w) at x's resolution as one GEMM, float32, dense in the output's layout:
// [N*h*w, C] (nhwc) or [N, C, h*w]. Reads x in place when it is dense NCHW or NHWC.
inline at::Tensor fuse_project(const at::Tensor& x, const at::Tensor& weight, bool nhwc) {
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
