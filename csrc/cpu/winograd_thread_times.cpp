// conv3x3_winograd_thread_times: how evenly conv3x3_winograd's plan for a number of threads shares out
// a conv, measured on one core. Each thread's share (the contiguous range of tasks at::parallel_for
// and winograd_branches hand it, and its part of a U transformed up front) runs on the calling thread,
// one after another, each timed.
//
// Why: this project's machine has 2 cores, its users 4 to 64, and the plan's splits for 3 to 16 threads
// cannot be timed here. What they leave idle can: the slowest share against the mean is the most a
// team of that size gets from the split (more cores add their own losses: bandwidth, shared caches,
// the threads' meeting, none of which this sees; each share here runs with the caches as the shares
// before it left them, which flatters plans whose threads read the same data: the second reads it
// from this core's L1 or L2, where on its own core it would come from L3 or another core's cache.
// `evict_bytes` > 0 streams through a buffer that large before each share, so each starts with its
// L1 and L2 cold, its data from L3 at best: the other bound, unfair to plans that keep a thread's
// tiles on one core from conv to conv. A split better on both is better).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/tensor_view.h"
#include "cpu/winograd_driver.h"

namespace hrnet_fast {
namespace {

// Reads and writes every cache line of `buf`: what was in this core's L1 and L2 is evicted by it
void evict(std::vector<float>& buf) {
  volatile float* p = buf.data();
  for (size_t i = 0; i < buf.size(); i += 64 / sizeof(float)) p[i] = p[i] + 1.0f;
}

// Each of `threads` shares' median time in us over `repeats` runs of the whole conv (ReLU, no bias or
// residual, into a scratch output), as conv3x3_winograd plans it for a dense `weight` and `tile`.
std::vector<double> conv3x3_winograd_thread_times(const at::Tensor& x, const at::Tensor& weight, int64_t tile,
                                                  int64_t threads, int64_t repeats, at::OptionalIntArrayRef plan,
                                                  int64_t evict_bytes) {
  constexpr const char* op = "hrnet_fast::conv3x3_winograd_thread_times";
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.layout() == at::kStrided, op,
              ": x must be a dense 4-D [N, C, H, W] float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  TORCH_CHECK(threads >= 1 && repeats >= 1, op, ": threads and repeats must be positive, got ", threads, " and ",
              repeats);
  TORCH_CHECK(evict_bytes >= 0, op, ": evict_bytes must be 0 or more, got ", evict_bytes);
  std::vector<float> cold(static_cast<size_t>(evict_bytes) / sizeof(float));
  const int64_t cin = x.size(1), cout = weight.dim() == 4 ? weight.size(0) : 0;
  at::Tensor kept;
  const DenseWeight w = dense_weight_arg(op, "weight", weight, cout, cin, kept);
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = empty_float({x.size(0), cout, x.size(2), x.size(3)}, at::MemoryFormat::ChannelsLast);
  const int m = static_cast<int>(tile);
  const WinogradGeometry g = winograd_geometry(x.size(0), x.size(2), x.size(3), cin, cout, m);
  std::optional<WinogradPlan> given;
  if (plan) {  // [blocks, splits, per_panel, sliced]; tiles a block and a slice's channels as plan_winograd's
    const auto& q = *plan;
    TORCH_CHECK(q.size() == 4 && q[0] >= 1 && q[1] >= 1 && q[1] <= (cout + kNr - 1) / kNr, op,
                ": plan must be [blocks, splits, per_panel, sliced] with blocks >= 1 and 1 <= splits <= panels, "
                "got ", q);
    const int64_t tb = ((g.tiles + q[0] - 1) / q[0] + kMr - 1) / kMr * kMr;
    given = WinogradPlan{(g.tiles + tb - 1) / tb, q[1], tb, q[2] != 0, false, q[2] != 0 && q[3] != 0,
                         q[2] != 0 && q[3] != 0 ? std::min(kSliceChannels, cin) : cin};
  }
  WinogradRunner runner(g, m, /*dense=*/true, threads, 0, given ? &*given : nullptr);
  const int64_t tasks = runner.tasks(), chunk = (tasks + threads - 1) / threads;
  using clock = std::chrono::steady_clock;
  std::vector<std::vector<double>> runs(threads);
  for (int64_t r = 0; r < repeats; ++r) {
    std::vector<double> us(threads, 0.0);
    const float* u = nullptr;
    if (runner.shared_u()) {  // each thread a share of the input channels, as winograd_branches does it
      for (int64_t k = 0; k < threads; ++k) {
        evict(cold);
        const auto t0 = clock::now();
        u = runner.transform_shared_u_part(w, k, threads);
        us[k] += std::chrono::duration<double, std::micro>(clock::now() - t0).count();
      }
    }
    for (int64_t k = 0; k < threads; ++k) {
      const int64_t begin = std::min(tasks, k * chunk), end = std::min(tasks, begin + chunk);
      evict(cold);
      const auto t0 = clock::now();
      if (begin < end)
        runner.run(k, begin, end, xc.data_ptr<float>(), u, w, nullptr, nullptr, true, y.data_ptr<float>());
      us[k] += std::chrono::duration<double, std::micro>(clock::now() - t0).count();
    }
    for (int64_t k = 0; k < threads; ++k) runs[k].push_back(us[k]);
  }
  std::vector<double> out;
  for (auto& v : runs) {
    std::sort(v.begin(), v.end());
    out.push_back(v[v.size() / 2]);
  }
  return out;
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // each of `threads` threads' share of a conv as conv3x3_winograd plans it, timed one after another
  // on the calling thread (us, the median of `repeats`): how evenly the plan splits it
  // (`plan`: [blocks, splits, per_panel, sliced] instead of the plan's own, for comparing plans;
  // `evict_bytes`: a buffer that large streamed through before each share, its caches cold)
  m.def("conv3x3_winograd_thread_times(Tensor x, Tensor weight, int tile, int threads, int repeats=5, "
        "int[]? plan=None, int evict_bytes=0) -> float[]",
        &hrnet_fast::conv3x3_winograd_thread_times);
}
