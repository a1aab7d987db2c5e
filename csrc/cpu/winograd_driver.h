// The Winograd driver's pieces that more than one op uses (csrc/cpu/conv3x3_winograd.cpp, which defines
// them, and csrc/cpu/winograd_blocks.cpp): a conv's geometry, how its work is split between threads,
// and the running of one thread's share of a conv.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "cpu/winograd_isa.h"

namespace hrnet_fast {

WinogradGeometry winograd_geometry(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int m);

// How a conv's work is shared between threads: blocks of tb tiles times splits shares of the output
// panels (tasks = blocks * splits, part-major), and where each task's U comes from: transformed from
// the dense weight panel by panel inside the task (per_panel, slice input channels at a time where
// sliced), by each thread for itself into its scratch (own_u), or else once up front into shared
// scratch (a dense weight) or read packed (a transformed one).
struct WinogradPlan {
  int64_t blocks, splits, tb;
  bool per_panel, own_u, sliced;
  int64_t slice;
};

// Block blk's tiles [t0, t0 + nt) of `blocks` sharing `tiles`: whole groups of kMr tiles, as evenly as
// they divide (at most ceil(tiles / (kMr blocks)) groups a block: the plan's tb), the last group cut at
// `tiles`. A thread's contiguous range of blocks then gets its share of the tiles.
inline std::pair<int64_t, int64_t> block_tiles(int64_t tiles, int64_t blocks, int64_t blk) {
  const int64_t groups = (tiles + kMr - 1) / kMr;
  const int64_t t0 = blk * groups / blocks * kMr, t1 = std::min(tiles, (blk + 1) * groups / blocks * kMr);
  return {t0, t1 - t0};
}

// The dense weight argument `name` of a 3x3 conv C_in -> C_out, checked (errors name `op`): either
// [C_out, C_in, 3, 3] with any strides (read in place where stored OIHW or IHWO, else copied to OIHW)
// or panel-major [ceil(C_out/16), C_in, 3, 3, 16], contiguous (hrnet_fast.ops.winograd.panel_major).
// `kept` holds what the result points into.
DenseWeight dense_weight_arg(const char* op, const char* name, const at::Tensor& w, int64_t cout, int64_t cin,
                             at::Tensor& kept);

WinogradPlan plan_winograd(const WinogradGeometry& g, int m, bool dense, int64_t threads, int gemm_panels);
// Input channels a slice of a sliced plan (csrc/cpu/conv3x3_winograd.cpp says why)
constexpr int64_t kSliceChannels = 32;
// The run-time switches plan_winograd reads (fill_team, own_panels), as bits: what its plans depend on
// besides its arguments.
int64_t winograd_plan_switches();

// What that plan of a dense conv costs the slowest of its threads, modelled: each task's multiply-adds
// (its GEMMs, and its transforms by their flops), each thread its contiguous range of tasks
// (csrc/cpu/winograd_cost.cpp).
double winograd_plan_cost(const WinogradGeometry& g, int m, int64_t threads, int gemm_panels);
// ... of a given plan of a dense conv on `threads` threads
double winograd_plan_cost(const WinogradGeometry& g, int m, const WinogradPlan& p, int64_t threads);

// One conv shape's plan and thread scratch, made once and used for one conv or for several of that
// shape in turn (winograd_blocks: a chain of convs in one parallel region). run() does tasks [begin,
// end) of one conv with the scratch of `slot` (< slots()); a thread must take one contiguous range of
// tasks per conv (own_u transforms U once per range). A dense weight whose plan wants U transformed up
// front (shared_u()) needs that U from the caller (transform_shared_u or its parts, before the tasks).
// `min_slots`: scratch for at least that many threads (up to one a task) on a plan made for `threads`,
// where more threads than planned for may take its tasks (winograd_branches' shared tail).
class WinogradRunner {
 public:
  // `plan`: this one instead of plan_winograd's (conv3x3_winograd_thread_times, comparing plans)
  WinogradRunner(const WinogradGeometry& g, int m, bool dense, int64_t threads, int64_t min_slots = 0,
                 const WinogradPlan* plan = nullptr);
  const WinogradPlan& plan() const { return plan_; }
  int64_t tasks() const { return plan_.blocks * plan_.splits; }
  int64_t slots() const { return slots_; }
  bool shared_u() const { return dense_ && !plan_.per_panel && !plan_.own_u; }
  // U of dense weight w, into scratch this runner holds, across the threads (a parallel region of its
  // own); returns it, for run()'s u
  const float* transform_shared_u(const DenseWeight& w);
  // part `part` of `parts` of that (input channels split evenly), for a caller already in a parallel
  // region whose threads each do a part, then meet at a barrier before run()
  const float* transform_shared_u_part(const DenseWeight& w, int64_t part, int64_t parts) const;
  void run(int64_t slot, int64_t begin, int64_t end, const float* x, const float* u, const DenseWeight& w,
           const float* bias, const float* residual, bool relu, float* y) const;

 private:
  WinogradGeometry g_;
  int m_;
  bool dense_;
  WinogradKernels kernels_;
  WinogradPlan plan_;
  int group_;  // the tasks' WinogradTask::group
  int64_t u_stride_, vbuf_floats_, mbuf_floats_, per_thread_, slots_;
  at::Tensor scratch_, u_scratch_;
};

}  // namespace hrnet_fast
