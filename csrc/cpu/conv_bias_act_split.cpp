// conv_bias_act_split on CPU: one conv whose output channels go to several outputs, each with its own
// residual and ReLU. An HR module's fusion starts every path down from a branch with a strided 3x3 conv
// of that branch (W32's 32-channel branch: 32 -> 64 into the second output, summed with its input, and
// 32 -> 32 with a ReLU towards each lower output); run as one conv, the windows are gathered once and
// each GEMM call is 4 panels wide: on 2 threads of an Intel Xeon, those three convs took 215 us as one
// against 317 apart at batch 1, 1626 against 2145 at batch 8 (the 64-channel branch's two: 196 against
// 232, 1233 against 1347). Each output channel's sums are the same as its own conv's (conv_gemm_rows
// with segments), so the bits are too. Where conv_gemm does not take the call, conv_bias_act per output.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/conv_gemm.h"
#include "cpu/winograd_isa.h"
#include "kernels/conv_bias_act.h"

namespace hrnet_fast {
namespace {

std::vector<at::Tensor> conv_bias_act_split_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                                c10::IntArrayRef padding, c10::IntArrayRef channels,
                                                const c10::List<std::optional<at::Tensor>>& residuals,
                                                const c10::List<bool>& relus) {
  constexpr const char* op = "hrnet_fast::conv_bias_act_split (cpu): ";
  const auto out_sizes = conv_bias_act_check(x, weight, bias, stride, padding, std::nullopt);
  const int64_t parts = static_cast<int64_t>(channels.size());
  TORCH_CHECK(parts > 0 && static_cast<int64_t>(residuals.size()) == parts && static_cast<int64_t>(relus.size()) == parts,
              op, "channels, residuals and relus must have one entry per output, got ", channels.size(), ", ",
              residuals.size(), " and ", relus.size());
  int64_t total = 0;
  for (const int64_t c : channels) {
    TORCH_CHECK(c > 0, op, "every output needs at least one channel, got channels ", channels);
    total += c;
  }
  TORCH_CHECK(total == weight.size(0), op, "channels ", channels, " must add up to the weight's ", weight.size(0),
              " output channels");
  const auto sizes_of = [&](int64_t c) { return std::vector<int64_t>{out_sizes[0], c, out_sizes[2], out_sizes[3]}; };
  constexpr auto cl = at::MemoryFormat::ChannelsLast;
  // one conv_gemm where it takes the call, every output starting at a whole panel
  bool together = x.scalar_type() == at::kFloat && x.size(1) >= kConvGemmMinCin &&
                  weight.size(1) * weight.size(2) * weight.size(3) <= kConvGemmMaxK &&
                  conv_gemm_applies(x, weight, stride, padding, std::nullopt);
  int64_t c0 = 0;
  for (int64_t s = 0; s < parts; ++s) {
    const std::optional<at::Tensor> r = residuals.get(s);
    if (r) {
      TORCH_CHECK(r->sizes() == c10::IntArrayRef(sizes_of(channels[s])), op, "residual ", s,
                  " must have its output's sizes ", c10::IntArrayRef(sizes_of(channels[s])), ", got ", r->sizes());
      TORCH_CHECK(r->device() == x.device() && r->scalar_type() == x.scalar_type(), op, "residual ", s,
                  " must be a ", x.scalar_type(), " tensor on ", x.device());
      together = together && r->is_contiguous(cl);
    }
    together = together && c0 % kNr == 0;
    c0 += channels[s];
  }
  std::vector<at::Tensor> outs;
  outs.reserve(parts);
  if (!together) {  // conv_bias_act per output, its slice of the weight and bias
    static const auto conv_bias_act =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("hrnet_fast::conv_bias_act", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef,
                              c10::IntArrayRef, const std::optional<at::Tensor>&, bool)>();
    c0 = 0;
    for (int64_t s = 0; s < parts; ++s) {
      const auto n = channels[s];
      std::optional<at::Tensor> b;
      if (bias) b = bias->narrow(0, c0, n);
      outs.push_back(conv_bias_act.call(x, weight.narrow(0, c0, n), b, stride, padding, residuals.get(s), relus.get(s)));
      c0 += n;
    }
    return outs;
  }
  ConvGemmGeometry g{x.size(0), x.size(2), x.size(3), x.size(1), out_sizes[2], out_sizes[3], weight.size(0),
                     weight.size(2), weight.size(3), stride[0], padding[0]};
  std::vector<ConvGemmSegment> segs;
  c0 = 0;
  for (int64_t s = 0; s < parts; ++s) {
    outs.push_back(at::empty(sizes_of(channels[s]), x.options().memory_format(cl)));
    const std::optional<at::Tensor> r = residuals.get(s);
    segs.push_back({c0, c0 + channels[s], outs.back().data_ptr<float>(), r ? r->data_ptr<float>() : nullptr,
                    static_cast<bool>(relus.get(s))});
    c0 += channels[s];
  }
  at::Tensor packed;
  int64_t ldw = 0;
  const float* w = conv_gemm_weight(weight, packed, ldw);
  const at::Tensor b = bias && !bias->is_contiguous() ? bias->contiguous() : bias.value_or(at::Tensor());
  conv_gemm_run(g, x.data_ptr<float>(), w, ldw, b.defined() ? b.data_ptr<float>() : nullptr, nullptr, false, nullptr,
                &segs);
  return outs;
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("conv_bias_act_split", &hrnet_fast::conv_bias_act_split_cpu); }
