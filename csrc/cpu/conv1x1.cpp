// conv_bias_act's 1x1 stride-1 convs on CPU in NHWC: a GEMM of the pixels with the Winograd kernel's
// micro-kernel (csrc/cpu/conv1x1_core.h), bias, residual and ReLU applied to each 6 x 32 block while it
// is in registers' reach, so the output is written once.
//
// Why not oneDNN's: its ReLU post-op turns NaN into 0, so conv_bias_act runs ReLU as a pass of its
// own over the output, and the 256-channel outputs of stage 1 (6.3 MB an image pair) made that pass
// and oneDNN's fused add cost as much as half the GEMM. W32's stage-1 1x1 convs at batch 8 took 51 ms
// of a 350 ms forward (torch.profiler, 2 threads). Against oneDNN with its packed weight, 2 threads,
// inputs cycling through more memory than the L3 holds: 64 -> 256 channels with the residual 1.25-1.42x,
// without 1.02-1.17x, 256 -> 64 1.0-1.2x; the whole W32 1.017x at batch 8 (17 of 20 paired forwards
// faster) and 1.019x at batch 1 (40 of 60).
#include "cpu/conv1x1.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_isa.h"
#include "cpu/winograd_isa.h"

namespace hrnet_fast {

bool conv1x1_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, const std::optional<at::Tensor>& residual) {
  constexpr auto cl = at::MemoryFormat::ChannelsLast;
  return !weight.is_mkldnn() && weight.layout() == at::kStrided && weight.scalar_type() == at::kFloat &&
         weight.size(2) == 1 && weight.size(3) == 1 && stride[0] == 1 && stride[1] == 1 && padding[0] == 0 &&
         padding[1] == 0 && x.size(1) <= kConv1x1MaxCin && x.is_contiguous(cl) &&
         (!residual || residual->is_contiguous(cl)) && active_cpu_isa() != CpuIsa::base;
}

at::Tensor conv1x1_nhwc(const at::Tensor& x, const at::Tensor& weight, const float* bias,
                        const std::optional<at::Tensor>& residual, bool relu) {
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3), cout = weight.size(0);
  const int64_t coutp = (cout + kNr - 1) / kNr * kNr;
  at::Tensor y = at::empty({n, cout, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  // The weight into 16-wide panels [coutp/16][cin][16] on each call: C_in x C_out floats (64 KB at
  // most in HRNet's stage 1), a few microseconds against the GEMM's hundreds, and the model keeps
  // no second copy of it.
  at::Tensor wp = at::empty({coutp * cin}, x.options());
  float* p = wp.data_ptr<float>();
  const float* wd = weight.data_ptr<float>();
  const int64_t so = weight.stride(0), si = weight.stride(1);
  for (int64_t j = 0; j < coutp / kNr; ++j)
    for (int64_t i = 0; i < cin; ++i)
      for (int64_t l = 0; l < kNr; ++l) {
        const int64_t o = j * kNr + l;
        p[(j * cin + i) * kNr + l] = o < cout ? wd[o * so + i * si] : 0.f;
      }
  const Conv1x1Fn fn = winograd_kernels(active_cpu_isa()).conv1x1;
  const int64_t rows = n * h * w, groups = (rows + kMr - 1) / kMr;
  Conv1x1Task task{x.data_ptr<float>(), p, bias, residual ? residual->data_ptr<float>() : nullptr,
                   y.data_ptr<float>(), cin, cout, coutp, 0, 0, relu};
  // ~2 x 16 x C_in x C_out FLOP a group of 6 rows: groups of at least ~256 KFLOP a task
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, 12 * cin * coutp));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    Conv1x1Task t = task;
    t.r0 = begin * kMr;
    t.r1 = std::min(rows, end * kMr);
    fn(t);
  });
  return y;
}

}  // namespace hrnet_fast
