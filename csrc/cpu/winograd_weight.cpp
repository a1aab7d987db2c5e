// winograd_weight on CPU: the filter transform U = G w G^T of a [C_out, C_in, 3, 3] float32 weight,
// packed as conv3x3_winograd reads it: [(m+2)^2, ceil(C_out/16), C_in, 16], output channels past
// C_out zero. One implementation for both uses, so they agree bit for bit: weights transformed once
// and kept (hrnet_fast.ops.winograd.transform_weight), and weights kept only dense and transformed on
// each call (the large ones of the low-resolution branches, where reading 1.8x-4x the bytes from
// memory costs more than the transform; see hrnet_fast/fused/conv.py).
//
// The transform runs in the CPU's variant (csrc/cpu/isa/), vectorised over output channels. It reads an
// OIHW (contiguous) or IHWO (w.permute(1, 2, 3, 0) contiguous, seen through OIHW strides) weight in
// place: any other layout is copied to OIHW first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "cpu/cpu_isa.h"
#include "cpu/tensor_view.h"
#include "cpu/winograd_isa.h"

namespace hrnet_fast {

void winograd_transform_all(const DenseWeight& w, int64_t cin, int64_t cout, int m, float* u, int64_t us) {
  const WinogradKernels kernels = winograd_kernels(active_cpu_isa());
  const WinogradWeightFn fn = m == 2 ? kernels.w2 : kernels.w4;
  const int64_t panels = (cout + kNr - 1) / kNr;
  // ~4 KiB of output per input channel and panel: a grain of 16 channels keeps tasks worth a thread
  at::parallel_for(0, cin, std::max<int64_t>(1, 16 / panels),
                   [&](int64_t begin, int64_t end) { fn(w, cin, cout, begin, end, u, us); });
}

namespace {

at::Tensor winograd_weight_cpu(const at::Tensor& weight, int64_t m) {
  constexpr const char* op = "hrnet_fast::winograd_weight (cpu)";
  TORCH_CHECK(m == 2 || m == 4, op, ": m (the output tile size) must be 2 or 4, got ", m);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, op,
              ": weight must be a 3x3 conv weight [C_out, C_in, 3, 3], got shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.layout() == at::kStrided, op,
              ": weight must be a dense float32 CPU tensor, got ", weight.scalar_type(), " on ", weight.device());
  const int64_t cout = weight.size(0), cin = weight.size(1), k = m + 2, panels = (cout + kNr - 1) / kNr;
  at::Tensor u = at::empty({k * k, panels, cin, kNr}, weight.options());
  if (u.numel() == 0) return u;
  // read in place where stored IHWO or OIHW, else copied to OIHW
  const bool ihwo = dense_in_order(weight, std::array<int, 4>{1, 2, 3, 0});
  const at::Tensor w = ihwo ? weight : weight.contiguous();
  const DenseWeight dense = ihwo ? DenseWeight::ihwo(w.data_ptr<float>(), cout) : DenseWeight::oihw(w.data_ptr<float>(), cin);
  winograd_transform_all(dense, cin, cout, static_cast<int>(m), u.data_ptr<float>(), panels * cin * kNr);
  return u;
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("winograd_weight", &hrnet_fast::winograd_weight_cpu); }
