// conv_bias_act on CUDA: cuDNN's fused conv-bias-(add)-ReLU where it applies, otherwise cuDNN's
// conv (at::convolution) and one epilogue kernel of ours for bias + residual + ReLU. The
// epilogue's per-element body and indexing are shared with the CPU code (kernels/conv_bias_act.h).
// Only light headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE and slow nvcc down.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <optional>

#include "kernels/conv_bias_act.h"

namespace hrnet_fast {
namespace {

void launch_epilogue(at::Tensor& out, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                     bool relu) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const bool channels_last = !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // Same layout as out, so one flat index addresses both.
  const at::Tensor res = !residual ? at::Tensor() : residual->is_contiguous(fmt) ? *residual : residual->contiguous(fmt);
  const at::Tensor b = !bias ? at::Tensor() : bias->contiguous();
  const int64_t blocks = conv_bias_act_blocks(numel);
  const auto stream = c10::cuda::getCurrentCUDAStream(out.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bias_act_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv_bias_act_epilogue_kernel<scalar_t, acc_t><<<blocks, kCbaThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, numel, out.size(1), out.size(2) * out.size(3),
        channels_last, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Per dtype (float, half, bfloat16): cleared the first time cuDNN finds no engine for the fused
// graph, after which that dtype takes the unfused path.
std::atomic<bool> fused_usable[3] = {true, true, true};

at::Tensor conv_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              const std::optional<at::Tensor>& residual, bool relu) {
  const auto out_sizes = conv_bias_act_check(x, weight, bias, stride, padding, residual);
  TORCH_CHECK(x.is_cuda(), "hrnet_fast::conv_bias_act (cuda): x must be a CUDA tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "hrnet_fast::conv_bias_act (cuda): supports float32, float16 and bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  // The output's format follows x's, as aten's conv does (and as the fake kernel promises).
  const at::MemoryFormat fmt = x.suggest_memory_format();
  if (c10::multiply_integers(out_sizes) == 0) return at::empty(out_sizes, x.options().memory_format(fmt));
  const int64_t dilation[2] = {1, 1};
  const int64_t no_padding[2] = {0, 0};
  std::atomic<bool>& fused_ok = fused_usable[dtype == at::kFloat ? 0 : dtype == at::kHalf ? 1 : 2];

  at::Tensor out;
  if (relu && at::globalContext().userEnabledCuDNN() && fused_ok.load(std::memory_order_relaxed)) {
    try {
      out = residual ? at::cudnn_convolution_add_relu(x, weight, *residual, 1, bias, stride, padding, dilation, 1)
                     : at::cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, 1);
    } catch (const c10::Error&) {
      // cuDNN rejects some fused graphs (engine support varies by version, dtype and shape);
      // the error is raised on the host before any launch, so falling back is safe.
      fused_ok.store(false, std::memory_order_relaxed);
    }
  }
  if (!out.defined()) {
    const bool epilogue = relu || residual.has_value();
    // Without an epilogue cuDNN adds the bias itself; with one, the bias joins the single extra pass.
    out = at::convolution(x, weight, epilogue ? std::nullopt : bias, stride, padding, dilation, false, no_padding, 1);
    if (epilogue) {
      if (!out.is_contiguous() && !out.is_contiguous(at::MemoryFormat::ChannelsLast)) out = out.contiguous(fmt);
      launch_epilogue(out, bias, residual, relu);
    }
  }
  return out.is_contiguous(fmt) ? out : out.contiguous(fmt);
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CUDA, m) { m.impl("conv_bias_act", &hrnet_fast::conv_bias_act_cuda); }
