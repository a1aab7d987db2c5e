// WinogradChain (csrc/cpu/winograd_chain.h): a chain of BasicBlocks checked, its buffers made and its
// convs planned, for winograd_blocks and winograd_branches.
#include "cpu/winograd_chain.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>

#include "cpu/tensor_view.h"

namespace hrnet_fast {

WinogradChain::WinogradChain(const char* op, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             int64_t tile, int64_t threads, int64_t slots) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.layout() == at::kStrided, op,
              ": x must be a dense 4-D [N, C, H, W] float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  const int64_t c = x.size(1), n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n >= 2 && n % 2 == 0 && biases.size() == weights.size(), op,
              ": weights and biases must be two a block (an even number, at least 2) and as many of each, got ", n,
              " weights and ", biases.size(), " biases");
  // each conv's dense weight as the kernel reads it (dense_weight_arg: in place where stored IHWO, as
  // optimize() keeps it, or panel-major)
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& wi = weights[i];
    const at::Tensor& bi = biases[i];
    const std::string name = "weights[" + std::to_string(i) + "] (C -> C, x has " + std::to_string(c) + " channels)";
    kept_.emplace_back();
    w_.push_back(dense_weight_arg(op, name.c_str(), wi, c, c, kept_.back()));
    TORCH_CHECK(bi.dim() == 1 && bi.size(0) == c && bi.device().is_cpu() && bi.scalar_type() == at::kFloat, op,
                ": biases[", i, "] must be a float32 CPU tensor of shape [", c, "], got ", bi.sizes(), " ",
                bi.scalar_type(), " on ", bi.device());
    kept_.push_back(bi.contiguous());
    b_.push_back(kept_.back().data_ptr<float>());
  }
  fmt_ = x.suggest_memory_format();
  xc_ = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (c % 8 == 0 && reinterpret_cast<std::uintptr_t>(xc_.data_ptr()) % 32)
    xc_ = xc_.clone(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> sizes = {x.size(0), c, x.size(2), x.size(3)};
  // block k reads `in` (its input and shortcut) and writes `out`, never the same buffer: other threads'
  // tiles still read `in` (their halos, the shortcut) while a thread writes its part of `out`
  mid_ = empty_float(sizes, at::MemoryFormat::ChannelsLast);
  outs_ = {empty_float(sizes, at::MemoryFormat::ChannelsLast),
           n > 2 ? empty_float(sizes, at::MemoryFormat::ChannelsLast) : at::Tensor()};
  if (!empty())
    runner_.emplace(winograd_geometry(x.size(0), x.size(2), x.size(3), c, c, static_cast<int>(tile)),
                    static_cast<int>(tile), /*dense=*/true, threads, slots);
}

std::tuple<const float*, const float*, float*> WinogradChain::io(int64_t i) const {
  const int64_t k = i / 2;
  const float* in = k == 0 ? xc_.data_ptr<float>() : outs_[(k - 1) % 2].data_ptr<float>();
  if (i % 2 == 0) return {in, nullptr, mid_.data_ptr<float>()};
  return {mid_.data_ptr<float>(), in, outs_[k % 2].data_ptr<float>()};
}

void WinogradChain::run(int64_t i, int64_t slot, int64_t begin, int64_t end, const float* u) const {
  const auto [in, res, out] = io(i);
  runner_->run(slot, begin, end, in, u, w_[i], b_[i], res, /*relu=*/true, out);
}

at::Tensor WinogradChain::result() const {
  const at::Tensor& y = outs_[(convs() / 2 - 1) % 2];
  return fmt_ == at::MemoryFormat::ChannelsLast ? y : y.contiguous(fmt_);
}

void run_chain(WinogradChain& chain) {
  if (chain.empty()) return;
  WinogradRunner& runner = chain.runner();
  const int64_t tasks = runner.tasks(), n = chain.convs();
  if (runner.shared_u()) {
    // U transformed up front into shared scratch: a region of its own each conv, as conv3x3_winograd
    for (int64_t i = 0; i < n; ++i) {
      const float* u = runner.transform_shared_u(chain.weight(i));
      at::parallel_for(0, tasks, 1,
                       [&](int64_t begin, int64_t end) { chain.run(i, at::get_thread_num(), begin, end, u); });
    }
  } else if (runner.slots() == 1 || at::in_parallel_region() || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) chain.run(i, 0, 0, tasks);
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
        if (begin < end) chain.run(i, tid, begin, end);
#pragma omp barrier
      }
    }
  }
}

}  // namespace hrnet_fast
