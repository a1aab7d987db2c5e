// seg_head on CPU (float32): the segmentation HRNet's head, classifier(relu(conv1x1(x) + bias + sum_k
// bilinear(conv1x1(lowres[k])))), in one pass over the output pixels (csrc/cpu/seg_head_core.h). The
// low-res inputs' 1x1 convs run first, at their own resolution (fuse_multi_res's); then each task
// takes 6 output pixels at a time from x's rows to the classes, the C channels between (720 for
// HRNetV2) in the thread's buffer only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/conv_gemm.h"
#include "cpu/cpu_isa.h"
#include "cpu/fuse_project.h"
#include "cpu/tensor_view.h"
#include "cpu/winograd_isa.h"
#include "kernels/fuse_multi_res.h"

namespace hrnet_fast {
namespace {

constexpr const char* kOp = "hrnet_fast::seg_head: ";

// A 1x1 conv weight [C_out, C_in, 1, 1] of `cin` input channels (`what` names it in the error).
void check_1x1(const at::Tensor& w, int64_t cin, const char* what, const char* from) {
  TORCH_CHECK(w.dim() == 4 && w.size(1) == cin && w.size(2) == 1 && w.size(3) == 1, kOp, what,
              " must be a 1x1 conv weight [C_out, ", cin, ", 1, 1] (", from, "), got shape ", w.sizes());
}

void check_float_cpu(const at::Tensor& t, const FuseArg& name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, "the CPU kernel takes float32 tensors, got ", name, " of dtype ",
              fuse_dtype(t.scalar_type()));
  TORCH_CHECK(t.device().is_cpu(), kOp, name, " is on ", t.device(), ": all inputs must be on the CPU");
}

at::Tensor seg_head_cpu(const at::Tensor& x_in, at::TensorList lowres, const at::Tensor& weight, const at::Tensor& bias,
                        at::TensorList weights, const at::Tensor& classifier,
                        const std::optional<at::Tensor>& classifier_bias, bool align_corners) {
  TORCH_CHECK(x_in.dim() == 4, kOp, "x must be 4-D [N, C, H, W], got shape ", x_in.sizes());
  check_float_cpu(x_in, {"x", SIZE_MAX});
  check_1x1(weight, x_in.size(1), "weight", "x's channels in");
  const int64_t c = weight.size(0);
  check_float_cpu(weight, {"weight", SIZE_MAX});
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == c, kOp, "bias must have shape (", c, ",), got ", bias.sizes());
  check_float_cpu(bias, {"bias", SIZE_MAX});
  TORCH_CHECK(lowres.size() == weights.size(), kOp, "got ", lowres.size(), " lowres inputs but ", weights.size(),
              " weights: need one weight per input");
  TORCH_CHECK(static_cast<int64_t>(lowres.size()) <= kSegHeadMaxInputs, kOp, "takes at most ", kSegHeadMaxInputs,
              " lowres inputs, got ", lowres.size());
  const int64_t n = x_in.size(0), h = x_in.size(2), w = x_in.size(3);
  for (size_t k = 0; k < lowres.size(); ++k) {
    const at::Tensor& xk = lowres[k];
    const at::Tensor& wk = weights[k];
    TORCH_CHECK(xk.dim() == 4 && xk.size(0) == n && xk.size(2) > 0 && xk.size(3) > 0, kOp, "lowres[", k,
                "] must be 4-D [", n, ", C_k, H_k, W_k] (x's batch, a non-empty image), got shape ", xk.sizes());
    const bool shape_ok = (wk.dim() == 2 || (wk.dim() == 4 && wk.size(2) == 1 && wk.size(3) == 1)) &&
                          wk.size(0) == c && wk.size(1) == xk.size(1);
    TORCH_CHECK(shape_ok, kOp, "weights[", k, "] must have shape (", c, ", ", xk.size(1), ") or (", c, ", ",
                xk.size(1), ", 1, 1) to map lowres[", k, "]'s channels to weight's ", c, ", got ", wk.sizes());
    check_float_cpu(xk, {"lowres", k});
    check_float_cpu(wk, {"weights", k});
  }
  check_1x1(classifier, c, "classifier", "weight's output channels in");
  check_float_cpu(classifier, {"classifier", SIZE_MAX});
  const int64_t classes = classifier.size(0);
  if (classifier_bias.has_value()) {
    TORCH_CHECK(classifier_bias->dim() == 1 && classifier_bias->size(0) == classes, kOp, "classifier_bias must have shape (",
                classes, ",), got ", classifier_bias->sizes());
    check_float_cpu(*classifier_bias, {"classifier_bias", SIZE_MAX});
  }

  constexpr auto cl = at::MemoryFormat::ChannelsLast;
  // the output in x's layout (as conv_bias_act's), planar where x is not channels_last
  const bool planar = x_in.suggest_memory_format() != cl;
  at::Tensor out = empty_float({n, classes, h, w}, planar ? at::MemoryFormat::Contiguous : cl);
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous(cl);

  const int64_t nk = static_cast<int64_t>(lowres.size());
  std::vector<at::Tensor> ys;
  std::vector<SegHeadTap> taps;  // per input: h row taps, then w column taps
  taps.reserve(nk * (h + w));
  for (int64_t k = 0; k < nk; ++k) {
    ys.push_back(fuse_project_cpu(lowres[k], weights[k], true));
    const int64_t hk = lowres[k].size(2), wk = lowres[k].size(3);
    const float sh = fuse_linear_scale(hk, h, align_corners), sw = fuse_linear_scale(wk, w, align_corners);
    for (int64_t y = 0; y < h; ++y) {
      const FuseTaps<int64_t> t = fuse_linear<int64_t>(y, hk, sh, align_corners);
      taps.push_back({t.i0 * wk * c, t.i1 * wk * c, t.l0, t.l1});
    }
    for (int64_t x0 = 0; x0 < w; ++x0) {
      const FuseTaps<int64_t> t = fuse_linear<int64_t>(x0, wk, sw, align_corners);
      taps.push_back({t.i0 * c, t.i1 * c, t.l0, t.l1});
    }
  }
  std::vector<SegHeadInput> inputs;
  for (int64_t k = 0; k < nk; ++k) {
    const SegHeadTap* rows = taps.data() + k * (h + w);
    inputs.push_back({ys[k].data_ptr<float>(), lowres[k].size(2) * lowres[k].size(3) * c, rows, rows + h});
  }

  at::Tensor packed, packed_c;
  int64_t ldw = 0, ldwc = 0;
  const float* wp = conv_gemm_weight(weight, packed, ldw);
  const float* wcp = conv_gemm_weight(classifier, packed_c, ldwc);
  const at::Tensor b = bias.contiguous();
  const at::Tensor bc = classifier_bias.has_value() ? classifier_bias->contiguous() : at::Tensor();

  const ConvGemmGeometry g{n, h, w, x.size(1), h, w, c, 1, 1, 1, 0};
  const SegHeadTask task{&g, x.data_ptr<float>(), wp, ldw, b.data_ptr<float>(), inputs.data(), nk, wcp, ldwc,
                         bc.defined() ? bc.data_ptr<float>() : nullptr, classes, out.data_ptr<float>(), planar,
                         nullptr, nullptr, nullptr, 0, 0};
  const SegHeadFn fn = winograd_kernels(active_cpu_isa()).seg_head;
  // Each thread's kMr rows of x (a last partial group), of the C channels and of the classes (64-byte
  // aligned slices of one allocation).
  const int64_t ldc = (c + kNr - 1) / kNr * kNr, ldo = (classes + kNr - 1) / kNr * kNr;
  const int64_t a_floats = (kMr * g.cin + 15) / 16 * 16, per_thread = a_floats + kMr * (ldc + ldo);
  at::internal::lazy_init_num_threads();
  const int64_t slots = at::get_num_threads();
  const at::Tensor scratch = empty_float({slots * per_thread});
  float* const scratch_base = scratch.data_ptr<float>();
  const int64_t pixels = n * h * w, groups = (pixels + kMr - 1) / kMr;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    SegHeadTask t = task;
    t.abuf = scratch_base + std::min<int64_t>(at::get_thread_num(), slots - 1) * per_thread;
    t.cbuf = t.abuf + a_floats;
    t.obuf = t.cbuf + kMr * ldc;
    t.r0 = begin * kMr;
    t.r1 = std::min(pixels, end * kMr);
    fn(t);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("seg_head", &seg_head_cpu); }

}  // namespace hrnet_fast
