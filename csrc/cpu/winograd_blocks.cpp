// winograd_blocks on CPU: n ResNet BasicBlocks with identity shortcuts, x <- relu(conv(relu(conv(x, w1) + b1),
// w2) + b2 + x), every conv 3x3, stride 1, C -> C, by Winograd F(m x m, 3 x 3) (the tasks of
// csrc/cpu/conv3x3_winograd.cpp), all 2n convs in one parallel region with a barrier after each.
//
// Why: an HRNet branch is 4 such blocks, and at batch 1 each of its convs is ~100-300 us, of which a
// call through the dispatcher, the op's checks and allocations, and the start and end of a parallel
// region take ~10-20 us on the calling thread while the others wait (README, "Winograd on the CPU").
// Here the shape is checked and planned, the scratch and the 3 activation buffers allocated, and the
// threads started once for all 2n convs. The results are the same bits as the 2n conv3x3_winograd calls.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "cpu/tensor_view.h"
#include "cpu/winograd_driver.h"

namespace hrnet_fast {
namespace {

at::Tensor winograd_blocks_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases, int64_t tile) {
  constexpr const char* op = "hrnet_fast::winograd_blocks (cpu)";
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.layout() == at::kStrided, op,
              ": x must be a dense 4-D [N, C, H, W] float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  const int64_t c = x.size(1), n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n >= 2 && n % 2 == 0 && biases.size() == weights.size(), op,
              ": weights and biases must be two a block (an even number, at least 2) and as many of each, got ", n,
              " weights and ", biases.size(), " biases");
  // each conv's dense weight as IHWO [3][3][C_in][C_out] (itself where stored that way, as optimize() keeps it)
  std::vector<at::Tensor> kept(n);
  std::vector<const float*> w(n), b(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& wi = weights[i];
    const at::Tensor& bi = biases[i];
    TORCH_CHECK(wi.dim() == 4 && wi.size(0) == c && wi.size(1) == c && wi.size(2) == 3 && wi.size(3) == 3 &&
                    wi.device().is_cpu() && wi.scalar_type() == at::kFloat && wi.layout() == at::kStrided,
                op, ": weights[", i, "] must be a float32 CPU 3x3 weight [", c, ", ", c, ", 3, 3] (C -> C, x has ",
                c, " channels), got ", wi.sizes(), " ", wi.scalar_type(), " on ", wi.device());
    TORCH_CHECK(bi.dim() == 1 && bi.size(0) == c && bi.device().is_cpu() && bi.scalar_type() == at::kFloat, op,
                ": biases[", i, "] must be a float32 CPU tensor of shape [", c, "], got ", bi.sizes(), " ",
                bi.scalar_type(), " on ", bi.device());
    kept[i] = dense_in_order(wi, std::array<int, 4>{1, 2, 3, 0}) ? wi : wi.permute({1, 2, 3, 0}).contiguous();
    w[i] = kept[i].data_ptr<float>();
    kept.push_back(bi.contiguous());
    b[i] = kept.back().data_ptr<float>();
  }
  const at::MemoryFormat fmt = x.suggest_memory_format();
  at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (c % 8 == 0 && reinterpret_cast<std::uintptr_t>(xc.data_ptr()) % 32) xc = xc.clone(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> sizes = {x.size(0), c, x.size(2), x.size(3)};
  // block k reads `in` (its input and shortcut) and writes `out`, never the same buffer: other threads'
  // tiles still read `in` (their halos, the shortcut) while a thread writes its part of `out`
  at::Tensor mid = empty_float(sizes, at::MemoryFormat::ChannelsLast);
  std::array<at::Tensor, 2> outs = {empty_float(sizes, at::MemoryFormat::ChannelsLast),
                                    n > 2 ? empty_float(sizes, at::MemoryFormat::ChannelsLast) : at::Tensor()};
  if (mid.numel() == 0) return fmt == at::MemoryFormat::ChannelsLast ? outs[0] : outs[0].contiguous(fmt);

  const int m = static_cast<int>(tile);
  const WinogradGeometry g = winograd_geometry(x.size(0), x.size(2), x.size(3), c, c, m);
  at::internal::lazy_init_num_threads();  // this library's first-region set-up before the team is read
  WinogradRunner runner(g, m, /*dense=*/true, at::get_num_threads());
  // conv i of the chain: its input, shortcut (the block's input, on its second conv) and output
  auto conv_io = [&](int64_t i) {
    const int64_t k = i / 2;
    const float* in = k == 0 ? xc.data_ptr<float>() : outs[(k - 1) % 2].data_ptr<float>();
    float* out = outs[k % 2].data_ptr<float>();
    return i % 2 == 0 ? std::make_tuple(in, static_cast<const float*>(nullptr), mid.data_ptr<float>())
                      : std::make_tuple(static_cast<const float*>(mid.data_ptr<float>()), in, out);
  };
  const int64_t tasks = runner.tasks();
  if (runner.shared_u()) {
    // U transformed up front into shared scratch: a region of its own each conv, as conv3x3_winograd
    for (int64_t i = 0; i < n; ++i) {
      const auto [in, res, out] = conv_io(i);
      const float* u = runner.transform_shared_u(w[i]);
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        runner.run(at::get_thread_num(), begin, end, in, u, w[i], b[i], res, true, out);
      });
    }
  } else if (runner.slots() == 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) {
      const auto [in, res, out] = conv_io(i);
      runner.run(0, 0, tasks, in, nullptr, w[i], b[i], res, true, out);
    }
  } else {
    // One region: each thread the same contiguous range of tasks in every conv (at::parallel_for's
    // split), a barrier between convs (the next one reads every tile's halo and shortcut).
    const int team = static_cast<int>(runner.slots());
#pragma omp parallel num_threads(team)
    {
      const int64_t tid = omp_get_thread_num(), threads = omp_get_num_threads();
      const int64_t chunk = (tasks + threads - 1) / threads;
      const int64_t begin = std::min(tasks, tid * chunk), end = std::min(tasks, begin + chunk);
      for (int64_t i = 0; i < n; ++i) {
        const auto [in, res, out] = conv_io(i);
        if (begin < end) runner.run(tid, begin, end, in, nullptr, w[i], b[i], res, true, out);
#pragma omp barrier
      }
    }
  }
  const at::Tensor& y = outs[(n / 2 - 1) % 2];
  return fmt == at::MemoryFormat::ChannelsLast ? y : y.contiguous(fmt);
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("winograd_blocks", &hrnet_fast::winograd_blocks_cpu); }
