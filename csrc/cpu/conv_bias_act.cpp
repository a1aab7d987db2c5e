// conv_bias_act on CPU: torch's own oneDNN convolution with bias, residual add and ReLU as
// post-ops, called through the dispatcher (the mkldnn:: ops inductor uses).
//
// Weights may be dense, or pre-packed once into oneDNN's blocked layout
// (hrnet_fast.ops.conv.prepack): a packed weight is an MkldnnCPU tensor, so this kernel
// is registered for MkldnnCPU as well; the dispatcher picks that key when weight is packed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "cpu/conv_gemm.h"
#include "kernels/conv_bias_act.h"

namespace hrnet_fast {
namespace {

using Scalars = c10::List<std::optional<c10::Scalar>>;

// Handles looked up once: a dispatcher lookup per call would cost more than a small conv's epilogue.
const auto& pointwise_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t,
                            std::string_view, Scalars, std::optional<std::string_view>)>();
  return op;
}

const auto& pointwise_binary_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, int64_t, std::string_view, std::optional<c10::Scalar>,
                            std::optional<std::string_view>, Scalars, std::optional<std::string_view>)>();
  return op;
}

constexpr int64_t kDilation[2] = {1, 1};

// act(out + bias + residual) in place, out and residual contiguous NCHW. Used when oneDNN cannot
// fuse the sum (NCHW): the same per-element body and channel indexing as the CUDA epilogue kernel.
void epilogue_nchw_inplace(at::Tensor& out, const float* bias, const float* residual, bool relu) {
  const int64_t channels = out.size(1), hw = out.size(2) * out.size(3);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, out.numel() / hw, 16, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      float* op = o + plane * hw;
      const float* rp = residual + plane * hw;
      const float b = bias ? bias[conv_bias_act_channel<int64_t>(plane * hw, channels, hw, false)] : 0.f;
      for (int64_t k = 0; k < hw; ++k) op[k] = conv_bias_act_epilogue<float>(op[k], b, rp[k], relu);
    }
  });
}

// ReLU in place over a dense tensor, keeping NaN as torch.relu does. oneDNN's ReLU post-op is
// max(x, 0), which turns NaN into 0 (vmaxps returns its second operand when either is NaN), so the
// ReLU is never left to oneDNN: a NaN in the input must reach the output as it does in eager.
void relu_inplace(at::Tensor& out) {
  float* o = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = conv_bias_act_epilogue<float>(o[i], 0.f, 0.f, true);
  });
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                             const std::optional<at::Tensor>& residual, bool relu) {
  const auto out_sizes = conv_bias_act_check(x, weight, bias, stride, padding, residual);
  TORCH_CHECK(x.device().is_cpu(), "hrnet_fast::conv_bias_act (cpu): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "hrnet_fast::conv_bias_act (cpu): supports float32 only, got ",
              x.scalar_type(), "; use backend='torch' for other dtypes");
  TORCH_CHECK(x.layout() == at::kStrided && (!residual || residual->layout() == at::kStrided),
              "hrnet_fast::conv_bias_act (cpu): x and residual must be dense (strided) tensors");
  // The output's format follows x's, as aten's conv does (and as the fake kernel promises).
  const at::MemoryFormat fmt = x.suggest_memory_format();
  if (c10::multiply_integers(out_sizes) == 0 || x.size(1) == 0) {
    TORCH_CHECK(x.size(1) > 0 || c10::multiply_integers(out_sizes) == 0,
                "hrnet_fast::conv_bias_act (cpu): x must have at least one channel");
    return at::empty(out_sizes, x.options().memory_format(fmt));
  }
  // oneDNN reads a 1-D bias as one contiguous block.
  std::optional<at::Tensor> b;
  if (bias) b = bias->is_contiguous() ? *bias : bias->contiguous();
  const c10::IntArrayRef dil(kDilation, 2);
  if (conv_gemm_applies(x, weight, stride, padding, residual)) {
    at::Tensor out = conv_gemm(x, weight, b ? b->data_ptr<float>() : nullptr, stride[0], padding[0], residual, relu);
    return out.is_contiguous(fmt) ? out : out.contiguous(fmt);
  }

  // oneDNN runs NHWC (and fuses the residual) when the weight is packed or either operand is
  // channels_last; mirrors aten's mkldnn_conv_use_channels_last.
  const bool onednn_nhwc = weight.is_mkldnn() || fmt == at::MemoryFormat::ChannelsLast ||
                           weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  // When the output's NCHW and NHWC layouts coincide (one output channel, or a 1x1 output: a packed
  // weight on a small input meets it), torch 2.11's oneDNN (3.10) builds the fused add's primitive but
  // then fails to create the residual's memory ("could not create a memory"); 2.14's runs it. The
  // unfused path below costs next to nothing at those sizes and is the same element order either way.
  const bool layouts_coincide = out_sizes[1] == 1 || out_sizes[2] * out_sizes[3] == 1;
  at::Tensor out;
  if (!residual) {
    out = pointwise_op().call(x, weight, b, padding, stride, dil, 1, "none", Scalars(), std::nullopt);
    if (relu) relu_inplace(out);
  } else if (onednn_nhwc && !layouts_coincide) {
    out = pointwise_binary_op().call(x, *residual, weight, b, padding, stride, dil, 1, "add", std::nullopt,
                                     std::nullopt, Scalars(), std::nullopt);
    if (relu) relu_inplace(out);
  } else {
    // NCHW (or layouts that coincide): oneDNN would fall back to conv + a separate add + relu; ours is
    // one pass instead.
    out = pointwise_op().call(x, weight, std::nullopt, padding, stride, dil, 1, "none", Scalars(), std::nullopt);
    if (!out.is_contiguous()) out = out.contiguous();
    const at::Tensor res = residual->is_contiguous() ? *residual : residual->contiguous();
    epilogue_nchw_inplace(out, b ? b->data_ptr<float>() : nullptr, res.data_ptr<float>(), relu);
  }
  return out.is_contiguous(fmt) ? out : out.contiguous(fmt);
}

// conv_bias_act_into: the same into `out`, a tensor of the output's sizes that overlaps neither x nor the
// residual (a slice of a larger batch: ChunkedStage's chunks write their part of the stage's output
// where it belongs, rather than each into a tensor of its own and all copied by a concatenation,
// which moved 25 MB at W32's batch 8), and an optimize()d model's first and last convs read its NCHW
// input and write its NCHW output (hrnet_fast/fused/conv.py). conv_gemm writes into it directly where
// it is dense, channels_last or NCHW (conv_gemm_applies); otherwise the result is copied in.
void conv_bias_act_into_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, const std::optional<at::Tensor>& residual,
                            bool relu, const at::Tensor& out) {
  constexpr const char* op = "hrnet_fast::conv_bias_act_into (cpu)";
  const auto out_sizes = conv_bias_act_check(x, weight, bias, stride, padding, residual);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == x.scalar_type() && out.layout() == at::kStrided, op,
              ": out must be a dense CPU tensor of x's dtype (", x.scalar_type(), "), got ", out.scalar_type(), " on ",
              out.device());
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(out_sizes), op, ": out must have the output's sizes ",
              c10::IntArrayRef(out_sizes), ", got ", out.sizes());
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, x);
  if (residual) at::assert_no_overlap(out, *residual);
  if (x.scalar_type() == at::kFloat && out.numel() > 0 && conv_gemm_applies(x, weight, stride, padding, residual, &out)) {
    const at::Tensor b = bias && !bias->is_contiguous() ? bias->contiguous() : bias.value_or(at::Tensor());
    conv_gemm(x, weight, b.defined() ? b.data_ptr<float>() : nullptr, stride[0], padding[0], residual, relu, &out);
    return;
  }
  out.copy_(conv_bias_act_cpu(x, weight, bias, stride, padding, residual, relu));  // copy_ is a const method
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) {
  m.impl("conv_bias_act", &hrnet_fast::conv_bias_act_cpu);
  m.impl("conv_bias_act_into", &hrnet_fast::conv_bias_act_into_cpu);
}

// A pre-packed (oneDNN-layout) weight puts MkldnnCPU in the dispatch key set; same kernels.
TORCH_LIBRARY_IMPL(hrnet_fast, MkldnnCPU, m) {
  m.impl("conv_bias_act", &hrnet_fast::conv_bias_act_cpu);
  m.impl("conv_bias_act_into", &hrnet_fast::conv_bias_act_into_cpu);
}
