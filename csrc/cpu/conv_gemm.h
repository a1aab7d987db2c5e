// conv_bias_act's own direct convolution on CPU, NHWC (csrc/cpu/conv_gemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace hrnet_fast {

// Whether conv_gemm runs this call: a dense float32 weight of kConvGemmMinCin to kConvGemmMaxK / (kh kw)
// input channels, the same stride and padding both ways, x (and the residual) channels_last, and a
// vector variant of the CPU kernels in use.
bool conv_gemm_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, const std::optional<at::Tensor>& residual);

// act(conv2d(x, weight, stride, padding) + bias + residual), channels_last out (bias: C_out floats or null).
at::Tensor conv_gemm(const at::Tensor& x, const at::Tensor& weight, const float* bias, int64_t stride, int64_t padding,
                     const std::optional<at::Tensor>& residual, bool relu);

}  // namespace hrnet_fast
