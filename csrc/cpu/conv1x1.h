// conv_bias_act's own path for 1x1 stride-1 convs in NHWC (csrc/cpu/conv1x1.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace hrnet_fast {

// Whether conv1x1_nhwc runs this call: a dense float32 1x1 weight, stride 1, no padding, x (and the
// residual) channels_last, C_in <= kConv1x1MaxCin, and a vector variant of the CPU kernels in use.
bool conv1x1_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, const std::optional<at::Tensor>& residual);

// act(conv2d(x, weight) + bias + residual), channels_last out (bias: C_out floats or null).
at::Tensor conv1x1_nhwc(const at::Tensor& x, const at::Tensor& weight, const float* bias,
                        const std::optional<at::Tensor>& residual, bool relu);

}  // namespace hrnet_fast
