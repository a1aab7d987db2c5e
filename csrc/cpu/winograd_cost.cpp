// winograd_plan_cost: what conv3x3_winograd's plan for a number of threads costs the slowest of them,
// modelled from the work of each task (csrc/cpu/winograd_driver.h), for splitting threads between
// convs that run side by side (csrc/cpu/branch_split.cpp).
//
// Why a model: a plan's split is coarse (tasks of whole 6-tile groups and 16-channel panels), so a
// team of 3, 5, 6 or 7 threads often gets no more from it than one of 4 (W32's 64-channel 32x24 conv
// at batch 1: 2 panels for one thread of 3; its 128-channel 16x12 one: 8 panels on 5, 6 or 7
// threads, the slowest with 2), and the split between branches has to know that. The model counts
// each task's multiply-adds: its GEMMs (whole micro-kernel rows of tiles) and, by their flops, the
// input transform of its tiles, the filter transform of its panels (where done in the task) and the
// output transform; each thread its contiguous range of tasks. Against each thread's share timed on
// one core (conv3x3_winograd_thread_times, AMD EPYC, W32's branch convs at batch 1 and 8, 2 to 16
// threads): within ~10% where the plan splits by tiles or panels alone; it undercounts what splits
// by channels repeat (each thread's input transform of all the tiles, which costs more than its flops
// where V leaves L2: the 256-channel 8x6 conv at batch 8 on 16 threads 394 us timed, 195 modelled).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/winograd_driver.h"

namespace hrnet_fast {

double winograd_plan_cost(const WinogradGeometry& g, int m, int64_t threads, int gemm_panels) {
  return winograd_plan_cost(g, m, plan_winograd(g, m, /*dense=*/true, threads, gemm_panels), threads);
}

double winograd_plan_cost(const WinogradGeometry& g, int m, const WinogradPlan& p, int64_t threads) {
  const double k = m + 2, cin = static_cast<double>(g.cin), cinp = static_cast<double>(g.cinp);
  const int64_t panels = g.coutp / kNr, tasks = p.blocks * p.splits, chunk = (tasks + threads - 1) / threads;
  // flops as multiply-adds: per tile and input channel, B^T d B (two K x K by K x K products); per
  // panel and input channel, G g G^T for its 16 filters (K x 3 by 3 x 3, then K x 3 by 3 x K); per
  // tile and output channel, A^T M A (m x K by K x K, then m x K by K x m)
  const double v = 2 * k * k * k, u = kNr * (k * 9 + k * k * 3), o = m * k * k + m * k * m;
  std::vector<double> share(threads, 0.0);
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t part = task / p.blocks, blk = task % p.blocks;
    const double j = static_cast<double>(panels * (part + 1) / p.splits - panels * part / p.splits);
    const double nt = static_cast<double>(block_tiles(g.tiles, p.blocks, blk).second);
    const double rows = std::ceil(nt / kMr) * kMr;  // the GEMMs' micro-kernel rows, the last group padded
    share[task / chunk] +=
        nt * cin * v + rows * k * k * cinp * j * kNr + nt * j * kNr * o + (p.per_panel ? j * cin * u : 0);
  }
  // a U transformed before the tasks: whole by each thread (own_u), or once, a share of its input
  // channels each (shared_u)
  const double whole_u = static_cast<double>(panels) * cin * u;
  const double before = p.own_u ? whole_u : p.per_panel ? 0.0 : whole_u / static_cast<double>(threads);
  return *std::max_element(share.begin(), share.end()) + before;
}

namespace {

// conv3x3_winograd_cost: winograd_plan_cost of a dense C_in -> out_channels conv on x_size [N, C_in,
// H, W], for tests and for reading a thread count's balance
double conv3x3_winograd_cost(c10::IntArrayRef x_size, int64_t out_channels, int64_t tile, int64_t threads) {
  constexpr const char* op = "hrnet_fast::conv3x3_winograd_cost";
  TORCH_CHECK(x_size.size() == 4 && out_channels > 0 && threads > 0, op, ": x_size must be [N, C_in, H, W], "
              "out_channels and threads positive, got ", x_size, ", ", out_channels, ", ", threads);
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  const int m = static_cast<int>(tile);
  return winograd_plan_cost(winograd_geometry(x_size[0], x_size[2], x_size[3], x_size[1], out_channels, m), m,
                            threads, winograd_kernels(active_cpu_isa()).gemm_panels);
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // the modelled multiply-adds of the slowest of `threads` threads in conv3x3_winograd's plan of a
  // dense conv (winograd_plan_cost)
  m.def("conv3x3_winograd_cost(int[] x_size, int out_channels, int tile, int threads) -> float",
        &hrnet_fast::conv3x3_winograd_cost);
}
