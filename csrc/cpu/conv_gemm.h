// conv_bias_act's own direct convolution on CPU, NHWC (csrc/cpu/conv_gemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "cpu/winograd_isa.h"

namespace hrnet_fast {

// Whether conv_gemm takes a conv of `cin` input channels and a kh x kw window: K = kh kw cin of at
// most kConvGemmMaxK from kConvGemmMinCin channels, or fewer channels in windows of at most
// kFewCinMaxKh rows of kFewCinMaxRow floats; with a vector variant of the CPU kernels in use (its
// kernels exist in those only).
bool conv_gemm_takes(int64_t cin, int64_t kh, int64_t kw);

// Whether conv_gemm takes a conv of K = kh kw cin past kConvGemmMaxK at `pixels` output pixels: a
// weight-bound one (at most kColsPixelsPerCout pixels an output channel), which it runs as two streams
// of the weight's rows (conv_gemm_cols_core.h); with a vector variant of the CPU kernels in use.
bool conv_gemm_weight_bound(int64_t pixels, int64_t cin, int64_t kh, int64_t kw, int64_t cout);

// Whether conv_gemm runs this call: a dense float32 weight that conv_gemm_takes (or, at this call's
// output pixels, conv_gemm_weight_bound), the same stride and padding both ways, x (and the residual)
// channels_last, and a vector variant of the CPU kernels in use. Into `out` (channels_last, or NCHW
// without a residual), x may also be NCHW where it has fewer than kConvGemmMinCin channels (an image).
bool conv_gemm_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, const std::optional<at::Tensor>& residual,
                       const at::Tensor* out = nullptr);

// The weight ([C_out, C_in, kh, kw], or [C_out, C_in] for a 1x1 conv) as conv_gemm_run reads it: rows
// [kh][kw][C_in] of ldw floats. Its own storage where that is its layout (HWIO, as optimize() keeps
// it) and C_out is whole panels of 16; else a copy in `packed`, the columns padded with zeros.
// cin_major: rows [kh][C_in][kw] instead, as conv_few_cin_rows reads a planar x (always a copy).
const float* conv_gemm_weight(const at::Tensor& weight, at::Tensor& packed, int64_t& ldw, bool cin_major = false);

// y = act(conv(x, w) + bias + residual), NHWC, on the calling thread's team (bias, residual: or null).
// With segs (conv_bias_act_split: at least kConvGemmMinCin input channels, K within kConvGemmMaxK, an
// NHWC y), each segment's channels go to its own output instead, y, residual and relu unused.
void conv_gemm_run(const ConvGemmGeometry& g, const float* x, const float* w, int64_t ldw, const float* bias,
                   const float* residual, bool relu, float* y, const std::vector<ConvGemmSegment>* segs = nullptr);

// act(conv2d(x, weight, stride, padding) + bias + residual), channels_last (bias: C_out floats or null):
// into `out` where given (the output's sizes, channels_last- or NCHW-contiguous as conv_gemm_applies
// allows, overlapping neither x nor the residual), else into a new tensor; returns the tensor written.
at::Tensor conv_gemm(const at::Tensor& x, const at::Tensor& weight, const float* bias, int64_t stride, int64_t padding,
                     const std::optional<at::Tensor>& residual, bool relu, const at::Tensor* out = nullptr);

}  // namespace hrnet_fast
