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

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

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
  const auto stream = c10::cuda::getCurrentCUDAStream(out.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_bias_act_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const int64_t channels = out.size(1), hw = out.size(2) * out.size(3);
    const ElementwisePlan plan = conv_bias_act_epilogue_plan(o, rp, numel, channels, channels_last);
    conv_bias_act_epilogue_dispatch<scalar_t, acc_t>(plan, [&](auto kernel, auto units) {
      kernel<<<static_cast<unsigned>(elementwise_blocks(units)), kElementwiseThreads, 0, stream>>>(
          o, bp, rp, units, channels, hw, channels_last, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Whether cuDNN's fused conv-bias-(add)-ReLU graph runs for a conv configuration. cuDNN's runtime
// fusion engines support some dtypes, layouts and channel alignments and not others (and vary by
// version), so each configuration is tried once and the answer remembered: a rejection costs one
// failed plan search, not one per call, and never switches off the configurations that do work.
struct FusedKey {
  int dtype;
  bool channels_last, residual, bias;
  int64_t c_in, c_out, kh, kw, sh, sw, ph, pw;
  bool operator<(const FusedKey& o) const {
    return std::tie(dtype, channels_last, residual, bias, c_in, c_out, kh, kw, sh, sw, ph, pw) <
           std::tie(o.dtype, o.channels_last, o.residual, o.bias, o.c_in, o.c_out, o.kh, o.kw, o.sh, o.sw, o.ph, o.pw);
  }
};

// HRNET_FAST_CUDNN_FUSED: "auto" (default: try, remember), "0" (never: conv + our epilogue), "1"
// (always try, never remember a failure). HRNET_FAST_DEBUG=1 reports each rejection on stderr.
int fused_mode() {
  static const int mode = [] {
    const char* v = std::getenv("HRNET_FAST_CUDNN_FUSED");
    if (v == nullptr || std::strcmp(v, "auto") == 0 || *v == '\0') return -1;
    return std::strcmp(v, "0") == 0 ? 0 : 1;
  }();
  return mode;
}

class FusedDecisions {
 public:
  // false when this configuration is known not to run fused.
  bool worth_trying(const FusedKey& k) {
    const std::lock_guard<std::mutex> lock(mu_);
    const auto it = usable_.find(k);
    return it == usable_.end() || it->second;
  }
  void remember(const FusedKey& k, bool ok, const char* why) {
    {
      const std::lock_guard<std::mutex> lock(mu_);
      usable_[k] = ok;
    }
    static const bool debug = std::getenv("HRNET_FAST_DEBUG") != nullptr;
    if (!ok && debug) {
      std::fprintf(stderr,
                   "hrnet_fast: cuDNN fused conv-bias-%sReLU unavailable for dtype %d %s C_in=%lld C_out=%lld "
                   "k=%lldx%lld stride=%lldx%lld: %.300s\n",
                   k.residual ? "add-" : "", k.dtype, k.channels_last ? "NHWC" : "NCHW", (long long)k.c_in,
                   (long long)k.c_out, (long long)k.kh, (long long)k.kw, (long long)k.sh, (long long)k.sw, why);
    }
  }

 private:
  std::mutex mu_;
  std::map<FusedKey, bool> usable_;
};

FusedDecisions& fused_decisions() {
  static FusedDecisions d;
  return d;
}

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

  at::Tensor out;
  const int mode = fused_mode();
  if (relu && mode != 0 && at::globalContext().userEnabledCuDNN()) {
    const FusedKey key{static_cast<int>(dtype), fmt == at::MemoryFormat::ChannelsLast, residual.has_value(),
                       bias.has_value(), x.size(1), weight.size(0), weight.size(2), weight.size(3),
                       stride[0], stride[1], padding[0], padding[1]};
    if (mode == 1 || fused_decisions().worth_trying(key)) {
      try {
        out = residual ? at::cudnn_convolution_add_relu(x, weight, *residual, 1, bias, stride, padding, dilation, 1)
                       : at::cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, 1);
        if (mode != 1) fused_decisions().remember(key, true, "");
      } catch (const c10::OutOfMemoryError&) {
        throw;  // says nothing about whether the fused graph runs
      } catch (const std::exception& e) {
        // cuDNN (c10::Error) or cudnn_frontend (std::runtime_error) found no engine for the fused
        // graph; raised on the host before any launch, so falling back is safe.
        if (mode != 1) fused_decisions().remember(key, false, e.what());
        out = at::Tensor();
      }
    }
  }
  if (!out.defined()) {
    // The bias always joins our epilogue pass: aten's own bias add after a cuDNN conv is a broadcast
    // add_ that does not vectorise over NHWC, several times slower than the epilogue kernel.
    const bool epilogue = relu || residual.has_value() || bias.has_value();
    out = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, no_padding, 1);
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
