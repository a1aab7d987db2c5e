// conv_bias_act's epilogue, shared by the CPU fallback loop (csrc/cpu/conv_bias_act.cpp) and the
// CUDA epilogue kernel (csrc/cuda/conv_bias_act.cu): the CPU tests run the same arithmetic and
// channel indexing that the GPU runs. The device part is torch-free; the host checks below need only ATen/core.
#pragma once

#include <cstdint>

#include "kernels/hd.h"

namespace hrnet_fast {

// act(conv + bias + residual). `v < 0` is false for NaN, so NaN passes through as torch.relu does.
template <typename acc_t>
HF_HD acc_t conv_bias_act_epilogue(acc_t conv, acc_t bias, acc_t residual, bool relu) {
  acc_t v = conv + bias + residual;
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

// Channel of element `i` of a dense [N, C, H, W] tensor stored NCHW (channels_last=false) or NHWC.
template <typename index_t>
HF_HD index_t conv_bias_act_channel(index_t i, index_t channels, index_t hw, bool channels_last) {
  return channels_last ? i % channels : (i / hw) % channels;
}

// Which epilogue kernel runs: vector (NHWC, C a multiple of the 16-byte vector's length, out and
// residual 16-byte aligned) or one element a thread; 32-bit indices unless the tensor is too large.
template <typename scalar_t>
inline ElementwisePlan conv_bias_act_epilogue_plan(const scalar_t* out, const scalar_t* residual, int64_t numel,
                                                   int64_t channels, bool channels_last) {
  constexpr int V = Vec16<scalar_t>::kLen;
  const bool vector = channels_last && channels % V == 0 && aligned16(out) && aligned16(residual);
  return {vector, needs_wide_indices(numel), vector ? numel / V : numel};
}

#if defined(__CUDACC__) || defined(HF_CUDA_EMU)
// out = act(out + bias[channel] + residual) in place; out and residual dense in the same format
// (NCHW, or NHWC when channels_last). bias and residual may be null. Vector: unit u is the V
// channels at element u * V (NHWC only). tests/emu runs it on the CPU.
template <typename scalar_t, typename acc_t, typename index_t, bool Vector>
__global__ void conv_bias_act_epilogue_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ bias,
                                              const scalar_t* __restrict__ residual, index_t units,
                                              int64_t channels, int64_t hw, bool channels_last, bool relu) {
  const index_t c = static_cast<index_t>(channels), plane = static_cast<index_t>(hw);
  const index_t step = static_cast<index_t>(blockDim.x * gridDim.x);
  for (index_t u = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x); u < units; u += step) {
    if constexpr (Vector) {
      constexpr int V = Vec16<scalar_t>::kLen;
      const index_t i = u * V, ch = i % c;
      Vec16<scalar_t> o = *reinterpret_cast<const Vec16<scalar_t>*>(out + i);
      Vec16<scalar_t> r{};
      if (residual) r = *reinterpret_cast<const Vec16<scalar_t>*>(residual + i);
      for (int v = 0; v < V; ++v) {
        const acc_t b = bias ? static_cast<acc_t>(bias[ch + v]) : acc_t(0);
        const acc_t res = residual ? static_cast<acc_t>(r.v[v]) : acc_t(0);
        o.v[v] = static_cast<scalar_t>(conv_bias_act_epilogue<acc_t>(static_cast<acc_t>(o.v[v]), b, res, relu));
      }
      *reinterpret_cast<Vec16<scalar_t>*>(out + i) = o;
    } else {
      const index_t ch = conv_bias_act_channel<index_t>(u, c, plane, channels_last);
      const acc_t b = bias ? static_cast<acc_t>(bias[ch]) : acc_t(0);
      const acc_t r = residual ? static_cast<acc_t>(residual[u]) : acc_t(0);
      out[u] = static_cast<scalar_t>(conv_bias_act_epilogue<acc_t>(static_cast<acc_t>(out[u]), b, r, relu));
    }
  }
}

// Runs the planned kernel through `launch(kernel, units)`: <<<>>> in the CUDA entry point, the
// emulator in the tests, so both take the same path for the same inputs.
template <typename scalar_t, typename acc_t, typename Launch>
void conv_bias_act_epilogue_dispatch(const ElementwisePlan& plan, Launch&& launch) {
  if (plan.wide) {
    if (plan.vector) launch(conv_bias_act_epilogue_kernel<scalar_t, acc_t, int64_t, true>, int64_t{plan.units});
    else launch(conv_bias_act_epilogue_kernel<scalar_t, acc_t, int64_t, false>, int64_t{plan.units});
  } else {
    const int32_t units = static_cast<int32_t>(plan.units);
    if (plan.vector) launch(conv_bias_act_epilogue_kernel<scalar_t, acc_t, int32_t, true>, units);
    else launch(conv_bias_act_epilogue_kernel<scalar_t, acc_t, int32_t, false>, units);
  }
}
#endif

}  // namespace hrnet_fast

// ---- host-side argument checks shared by the CPU and CUDA entry points ----------------------
// The Python API checks first with the same wording; these guard direct torch.ops calls.
// Left out of the emulated build (tests/emu), which is plain g++ without torch.
#if !defined(HF_CUDA_EMU)
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

namespace hrnet_fast {

// Output sizes [N, C_out, H_out, W_out], after checking shapes, devices and dtypes agree.
inline std::vector<int64_t> conv_bias_act_check(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "hrnet_fast::conv_bias_act: ";
  TORCH_CHECK(x.dim() == 4, op, "x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, "weight must be 4-D [C_out, C_in, kH, kW], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, "weight must have shape (C_out, ", x.size(1),
              ", kH, kW) to match x's channels, got ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, op, "stride and padding must have 2 values");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0, op,
              "stride must be >= 1 and padding >= 0, got stride=", stride, ", padding=", padding);
  const int64_t h = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t w = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= weight.size(2) && x.size(3) + 2 * padding[1] >= weight.size(3),
              op, "x of spatial size ", x.sizes().slice(2), " is too small for a ", weight.sizes().slice(2),
              " kernel with padding ", padding);
  std::vector<int64_t> out{x.size(0), weight.size(0), h, w};
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ", x.device(),
                ": all inputs must share a device");
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, name, " has dtype ", t.scalar_type(), " but x has ",
                x.scalar_type(), ": all inputs must share a dtype");
  };
  same(weight, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, "bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    same(*bias, "bias");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == c10::IntArrayRef(out), op, "residual must have the output's shape ",
                c10::IntArrayRef(out), ", got ", residual->sizes());
    same(*residual, "residual");
  }
  return out;
}

}  // namespace hrnet_fast
#endif  // !HF_CUDA_EMU
