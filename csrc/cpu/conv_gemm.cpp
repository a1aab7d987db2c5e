// conv_bias_act's own direct convolution on CPU, NHWC: a GEMM of the output pixels with the Winograd
// kernel's micro-kernel (csrc/cpu/conv_gemm_core.h), bias, residual and ReLU applied to each group of
// 6 output pixels while it is in L1, so the output is written once. Runs the convs that Winograd does not:
// 1x1 (stage 1, the heads) and strided 3x3 (the stem, the transitions, the fusions' downsampling); with
// fewer than kConvGemmMinCin input channels (the stem's first conv) its variant that reads each window
// in place (csrc/cpu/conv_few_cin_core.h).
//
// Why not oneDNN's: its ReLU post-op turns NaN into 0, so conv_bias_act ran ReLU as a pass of its own
// over the output, and its per-call set-up (descriptors, a workspace) costs tens of microseconds on the
// calling thread while the others wait: W32 at batch 1 makes ~50 such calls. Which convs it takes, and
// why those: kConvGemmMaxK (csrc/cpu/winograd_isa.h). The whole W32 against the same model with every
// such conv on oneDNN (2 threads, 2026-11-27), forward by forward in one process with a second copy of
// one of the two as a control (the copies 0.99-1.0x apart): 1.04x at batch 1 (41 of 50 faster),
// 1.015-1.03x at batch 8; in separate processes batch 1 1.05-1.06x (three pairs).
#include "cpu/conv_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_isa.h"
#include "cpu/cpu_switch.h"
#include "cpu/tensor_view.h"
#include "cpu/winograd_isa.h"

namespace hrnet_fast {

bool conv_gemm_takes(int64_t cin, int64_t kh, int64_t kw) {
  if (cin <= 0 || active_cpu_isa() == CpuIsa::base) return false;
  if (cin < kConvGemmMinCin) return kh <= kFewCinMaxKh && kw * cin <= kFewCinMaxRow;  // conv_few_cin_rows
  return kh * kw * cin <= kConvGemmMaxK;
}

namespace {
// conv_gemm_cols on or off (on: weight-bound shapes run it, and conv_gemm takes them at any K)
CpuSwitch cols_switch;

int64_t output_pixels(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding) {
  const int64_t ho = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t wo = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  return x.size(0) * std::max<int64_t>(0, ho) * std::max<int64_t>(0, wo);
}
}  // namespace

bool conv_gemm_weight_bound(int64_t pixels, int64_t cin, int64_t kh, int64_t kw, int64_t cout) {
  if (active_cpu_isa() == CpuIsa::base) return false;
  return kh * kw * cin > kConvGemmMaxK && pixels <= kColsPixelsPerCout * cout;
}

bool conv_gemm_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, const std::optional<at::Tensor>& residual, const at::Tensor* out) {
  constexpr auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t cin = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  // into `out`: an NCHW x where conv_few_cin_rows reads it (few channels), an NCHW out without a residual
  const bool x_ok = x.is_contiguous(cl) || (out && cin < kConvGemmMinCin && x.is_contiguous());
  const bool out_ok = !out || out->is_contiguous(cl) || (!residual && out->is_contiguous());
  if (weight.is_mkldnn() || weight.layout() != at::kStrided || weight.scalar_type() != at::kFloat ||
      stride[0] != stride[1] || padding[0] != padding[1] || !x_ok || !out_ok ||
      (residual && !residual->is_contiguous(cl)))
    return false;
  return conv_gemm_takes(cin, kh, kw) ||
         conv_gemm_weight_bound(output_pixels(x, weight, stride, padding), cin, kh, kw, weight.size(0));
}

const float* conv_gemm_weight(const at::Tensor& weight, at::Tensor& packed, int64_t& ldw, bool cin_major) {
  const bool conv = weight.dim() == 4;
  const int64_t cout = weight.size(0), cin = weight.size(1);
  const int64_t kh = conv ? weight.size(2) : 1, kw = conv ? weight.size(3) : 1;
  cin_major = cin_major && cin > 1 && kw > 1;  // else the same order
  const bool in_place = cout % kNr == 0 && !cin_major &&
                        (conv ? dense_in_order(weight, std::array<int, 4>{2, 3, 1, 0})
                              : dense_in_order(weight, std::array<int, 2>{1, 0}));
  if (in_place) {
    ldw = cout;
    return weight.data_ptr<float>();
  }
  // copied into that layout, the columns padded to whole panels with zeros (K x C_out floats: a few
  // microseconds for a 1x1 conv's)
  const int64_t k = kh * kw * cin, coutp = (cout + kNr - 1) / kNr * kNr;
  packed = empty_float({k * coutp});
  float* p = packed.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const int64_t so = weight.stride(0), si = weight.stride(1), sy = conv ? weight.stride(2) : 0,
                sx = conv ? weight.stride(3) : 0;
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx)
      for (int64_t i = 0; i < cin; ++i) {
        float* row = p + (cin_major ? (ky * cin + i) * kw + kx : (ky * kw + kx) * cin + i) * coutp;
        for (int64_t o = 0; o < coutp; ++o) row[o] = o < cout ? w[o * so + i * si + ky * sy + kx * sx] : 0.f;
      }
  ldw = coutp;
  return p;
}

namespace {
// conv_gemm_cols (csrc/cpu/conv_gemm_cols_core.h): every pixel's window gathered once into one buffer,
// the threads splitting the groups; the two halves of K's partial sums, each half's output channels
// split between ceil(threads / 2) tasks; their sum and the epilogue, the threads splitting the groups.
void conv_gemm_cols_run(const ConvGemmGeometry& g, const WinogradKernels& kernels, const float* x, const float* w,
                        int64_t ldw, const float* bias, const float* residual, bool relu, float* y) {
  const int64_t k = g.kh * g.kw * g.cin, panels = (g.cout + kNr - 1) / kNr, coutp = panels * kNr;
  const int64_t rows = g.n * g.ho * g.wo, groups = (rows + kMr - 1) / kMr, padded = groups * kMr;
  at::internal::lazy_init_num_threads();
  const at::Tensor scratch = empty_float({padded * k + 2 * padded * coutp});
  float* const a = scratch.data_ptr<float>();
  const ConvGemmTask task{&g, x, w, ldw, bias, residual, y, a, a + padded * k, 0, rows, relu};
  // about 32 KB of windows a task
  const int64_t gather_grain = std::max<int64_t>(1, 8192 / (kMr * k));
  at::parallel_for(0, groups, gather_grain, [&](int64_t begin, int64_t end) {
    ConvGemmTask t = task;
    t.r0 = begin * kMr;
    t.r1 = std::min(rows, end * kMr);
    kernels.conv_gemm_cols_gather(t);
  });
  // panels a GEMM call (the kernel's kColsUnit)
  const int64_t unit = kernels.gemm_panels == 1 ? 1 : 4, units = (panels + unit - 1) / unit;
  const int64_t splits = std::min(units, std::max<int64_t>(1, (at::get_num_threads() + 1) / 2));
  const int64_t k_half = std::min(k, (k / 2 + 15) / 16 * 16);
  at::parallel_for(0, 2 * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ConvGemmTask t = task;
      const int64_t half = i / splits, s = i % splits;
      t.k0 = half ? k_half : 0;
      t.k1 = half ? k : k_half;
      t.j0 = std::min(panels, units * s / splits * unit);
      t.j1 = std::min(panels, units * (s + 1) / splits * unit);
      t.cbuf = task.cbuf + half * padded * coutp;
      kernels.conv_gemm_cols(t);  // both halves have rows: K > kConvGemmMaxK here
    }
  });
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    ConvGemmTask t = task;
    t.r0 = begin * kMr;
    t.r1 = std::min(rows, end * kMr);
    kernels.conv_gemm_cols_sum(t);
  });
}
}  // namespace

void conv_gemm_run(const ConvGemmGeometry& g, const float* x, const float* w, int64_t ldw, const float* bias,
                   const float* residual, bool relu, float* y, const std::vector<ConvGemmSegment>* segs) {
  const int64_t k = g.kh * g.kw * g.cin, coutp = (g.cout + kNr - 1) / kNr * kNr;
  const WinogradKernels kernels = winograd_kernels(active_cpu_isa());
  // (segments: conv_gemm_rows, which its callers ensure: kConvGemmMinCin channels or more, K within kConvGemmMaxK)
  if (k > kConvGemmMaxK && !segs) return conv_gemm_cols_run(g, kernels, x, w, ldw, bias, residual, relu, y);
  // Few input channels: conv_few_cin_rows, whose tasks are whole output rows (kMr pixels at a time
  // along each) and whose buffer is a zero-padded patch of a group's windows.
  const bool few = g.cin < kConvGemmMinCin;
  const ConvGemmFn fn = few ? kernels.conv_few_cin : kernels.conv_gemm;
  const int64_t rows = g.n * g.ho * g.wo, groups = few ? g.n * g.ho : (rows + kMr - 1) / kMr;
  // Each thread's kMr gathered windows (or patch) and their outputs (64-byte aligned slices of one allocation).
  at::internal::lazy_init_num_threads();
  const int64_t a_size = few ? g.kh * ((kMr - 1) * g.stride + g.kw) * g.cin : kMr * k;
  // C of a group, or of a block of groups where conv_gemm_rows_blocked writes a planar y
  const int64_t c_rows = g.y_planar ? kConvGemmBlockGroups * kMr : kMr;
  const int64_t a_floats = (a_size + 15) / 16 * 16, per_thread = a_floats + c_rows * coutp;
  const int64_t slots = at::get_num_threads();
  const at::Tensor scratch = empty_float({slots * per_thread});
  float* const scratch_base = scratch.data_ptr<float>();
  ConvGemmTask task{&g, x, w, ldw, bias, residual, y, nullptr, nullptr, 0, 0, relu};
  if (segs) {
    task.segs = segs->data();
    task.nsegs = static_cast<int64_t>(segs->size());
  }
  // 2 x kMr x K x C_out FLOP a group (a row of wo pixels for few channels): at least ~256 KFLOP a task
  const int64_t per_group = 2 * (few ? g.wo : kMr) * k * coutp;
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, per_group));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    ConvGemmTask t = task;
    t.abuf = scratch_base + std::min<int64_t>(at::get_thread_num(), slots - 1) * per_thread;
    t.cbuf = t.abuf + a_floats;
    t.r0 = few ? begin : begin * kMr;
    t.r1 = few ? end : std::min(rows, end * kMr);
    fn(t);
  });
}

at::Tensor conv_gemm(const at::Tensor& x, const at::Tensor& weight, const float* bias, int64_t stride, int64_t padding,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor* out) {
  ConvGemmGeometry g{x.size(0), x.size(2), x.size(3), x.size(1), 0, 0, weight.size(0), weight.size(2), weight.size(3),
                     stride, padding};
  g.ho = (g.h + 2 * padding - g.kh) / stride + 1;
  g.wo = (g.w + 2 * padding - g.kw) / stride + 1;
  constexpr auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor y = out ? *out : empty_float({g.n, g.cout, g.ho, g.wo}, cl);
  // channels_last wherever the layouts coincide (one channel, one pixel): the same bytes either way
  g.x_planar = !x.is_contiguous(cl);
  g.y_planar = !y.is_contiguous(cl);
  at::Tensor packed;
  int64_t ldw = 0;
  const float* w = conv_gemm_weight(weight, packed, ldw, g.x_planar);
  conv_gemm_run(g, x.data_ptr<float>(), w, ldw, bias, residual ? residual->data_ptr<float>() : nullptr, relu,
                y.data_ptr<float>());
  return y;
}

}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // whether conv_bias_act's own direct kernel takes a conv of cin input channels and a kh x kw window
  // (on a channels_last input, the same stride and padding both ways), with the CPU kernels now in use
  m.def("conv_gemm_takes(int cin, int kh, int kw) -> bool", &hrnet_fast::conv_gemm_takes);
  m.def("conv_gemm_weight_bound(int pixels, int cin, int kh, int kw, int cout) -> bool",
        [](int64_t pixels, int64_t cin, int64_t kh, int64_t kw, int64_t cout) {
          return hrnet_fast::cols_switch.on() && hrnet_fast::conv_gemm_weight_bound(pixels, cin, kh, kw, cout);
        });
  m.def("conv_gemm_cols_switch(bool? use=None) -> bool",
        [](std::optional<bool> use) { return hrnet_fast::cols_switch.set(use); });
}
