// The low-res inputs' 1x1 convs of the CPU fusions (fuse_multi_res, seg_head), defined in
// csrc/cpu/fuse_multi_res.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace hrnet_fast {

// conv1x1(x, weight) at x's resolution, float32, dense: [N*h*w, C] (nhwc) or [N, C, h*w]
// (kernels/fuse_multi_res.h's fuse_project), by conv_bias_act's direct kernel where it takes the call.
at::Tensor fuse_project_cpu(const at::Tensor& x, const at::Tensor& weight, bool nhwc);

}  // namespace hrnet_fast
