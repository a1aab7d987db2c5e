// fuse_multi_res on CUDA (float32, float16, bfloat16; NCHW or NHWC): each low-res 1x1 conv is one
// cuBLAS GEMM at low resolution with float32 results, then one elementwise kernel (the one in
// kernels/fuse_multi_res.h, which the CPU tests run under tests/emu) writes the output.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kernels/fuse_multi_res.h"

namespace hrnet_fast {
namespace {

template <typename scalar_t>
void launch(const at::Tensor& base, at::Tensor& out, const std::vector<at::Tensor>& ys,
            at::TensorList lowres, const float* bias, bool nhwc, bool relu, bool bilinear, bool align_corners) {
  const int64_t nk = static_cast<int64_t>(ys.size());
  const int64_t chunks = std::max<int64_t>(1, (nk + kFuseMaxLowres - 1) / kFuseMaxLowres);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t largest = out.numel();
  for (const at::Tensor& y : ys) largest = std::max(largest, y.numel());
  for (int64_t j = 0; j < chunks; ++j) {
    FuseParams<scalar_t> p{};
    // Later chunks (more than kFuseMaxLowres inputs) add into the output in place.
    p.base = j == 0 ? base.const_data_ptr<scalar_t>() : out.const_data_ptr<scalar_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.bias = j == 0 ? bias : nullptr;
    p.n = out.size(0), p.c = out.size(1), p.h = out.size(2), p.w = out.size(3);
    p.nhwc = nhwc;
    p.relu = relu && j == chunks - 1;
    p.bilinear = bilinear;
    p.align_corners = align_corners;
    const int64_t k0 = j * kFuseMaxLowres, k1 = std::min<int64_t>(nk, k0 + kFuseMaxLowres);
    p.k = static_cast<int>(k1 - k0);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t hk = lowres[k].size(2), wk = lowres[k].size(3);
      p.low[k - k0] = fuse_lowres(ys[k].const_data_ptr<float>(), hk, wk, p.h, p.w, bilinear, align_corners);
    }
    fuse_dispatch(p, fuse_plan(p, largest), [&](auto kernel, const auto& params, auto units) {
      kernel<<<static_cast<unsigned>(elementwise_blocks(units)), kElementwiseThreads, 0, stream>>>(params, units);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

at::Tensor fuse_multi_res_cuda(const at::Tensor& base_in, at::TensorList lowres, at::TensorList weights,
                               const std::optional<at::Tensor>& bias_in, bool relu, c10::string_view mode,
                               bool align_corners) {
  fuse_check(base_in, lowres, weights, bias_in);
  const bool bilinear = fuse_bilinear(mode, align_corners);
  const auto dtype = base_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "hrnet_fast::fuse_multi_res: the CUDA kernel takes float32, float16 or bfloat16, got base of dtype ",
              fuse_dtype(dtype));
  const c10::cuda::CUDAGuard guard(base_in.device());
  FuseOutput dst = fuse_output(base_in);
  const bool nhwc = dst.nhwc;
  const at::Tensor& base = dst.base;
  at::Tensor& out = dst.out;
  if (out.numel() == 0) return dst.result;

  std::vector<at::Tensor> ys;
  ys.reserve(lowres.size());
  for (size_t k = 0; k < lowres.size(); ++k) ys.push_back(fuse_project(lowres[k], weights[k], nhwc).contiguous());
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_p = bias.defined() ? bias.const_data_ptr<float>() : nullptr;

  if (dtype == at::kFloat) {
    launch<float>(base, out, ys, lowres, bias_p, nhwc, relu, bilinear, align_corners);
  } else if (dtype == at::kHalf) {
    launch<at::Half>(base, out, ys, lowres, bias_p, nhwc, relu, bilinear, align_corners);
  } else {
    launch<at::BFloat16>(base, out, ys, lowres, bias_p, nhwc, relu, bilinear, align_corners);
  }
  return dst.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnet_fast, CUDA, m) { m.impl("fuse_multi_res", &fuse_multi_res_cuda); }

}  // namespace hrnet_fast
