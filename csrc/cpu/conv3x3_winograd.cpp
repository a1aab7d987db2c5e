// conv3x3_winograd on CPU: act(conv3x3(x, w, stride 1, padding 1) + bias + residual) by Winograd
// F(m x m, 3 x 3), m = 2 or 4 (csrc/kernels/winograd.h), NHWC, float32.
//
// Work is split into blocks of tiles sized to stay in the L2 cache (and, where the weights dominate,
// into shares of the output channels: see winograd_forward). Per block and share, one thread
//   1. transforms the input tiles: V[p][t][c] = (B^T d_{t,c} B)[p]      (p < K*K, K = m + 2)
//   2. runs K*K small GEMMs:       Mt[p][t][o] = sum_c V[p][t][c] U[p][c][o]
//   3. transforms back and applies the epilogue straight into y:
//                                  y[t] = act(A^T Mt[.][t][o] A + bias[o] + residual[t])
// so nothing but x, the transformed weights U and y touches memory. U is either packed ahead
// (hrnet_fast.ops.winograd.transform_weight, kept by the caller), or derived from the dense weight on
// each call (`tile` given): where the threads share out the output channels of a single block, each
// thread transforms a panel of 16 output channels into its own buffer right before the panel's GEMMs,
// so U never leaves the L2 cache and only the dense weight is read from memory (weight-bound convs
// get faster, and the caller holds no transformed copy); otherwise U is transformed once per call into
// scratch shared by the threads. The GEMM's micro-kernel is a 6 x 16 register block: 12 accumulators of
// 8 floats, the AVX2 FMA shape of BLIS/oneDNN. U is packed as [K*K][C_out/16][C_in][16] so each
// micro-kernel streams one contiguous 16-wide panel, C_out padded to whole panels with zeros; V's
// rows are padded to whole vectors of 8 channels. The transforms read and write only real channels,
// so any channel count works (timm's HRNet-W18 has 18, 36, 72 and 144).
//
// This file is the driver, built for the baseline ISA: checks, the split into tasks, threads. The
// tasks themselves run in the variant for the CPU's instruction set (csrc/cpu/isa/, chosen at run time
// by csrc/cpu/cpu_isa.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/cpu_switch.h"
#include "cpu/tensor_view.h"
#include "cpu/winograd_driver.h"
#include "cpu/winograd_isa.h"

namespace hrnet_fast {
namespace {

// Budget for one thread's V and Mt buffers: half of a 1 MiB L2, leaving room for U's panels.
constexpr int64_t kBlockBytes = 512 * 1024;
// Past this size U no longer stays close by between blocks, and every block streams all of it
// again (36 C_in C_out floats: 9.4 MB at 256 channels). Such convs take blocks up to 4x bigger,
// letting V and Mt spill from L2 (one position's slice, which is what a GEMM touches, still fits).
// Bounded: this scratch is memory the forward pass holds.
constexpr int64_t kCachedWeightBytes = 2 * 1024 * 1024;
constexpr int64_t kSpillBlockBytes = 2 * 1024 * 1024;
// A dense weight-bound conv takes all its tiles in one block up to this much V and Mt a thread, so
// that each thread transforms each of its weight panels once (in L2) and streams V from L3, rather
// than writing the whole transformed weight (4x the dense one: 21 MB for W48's 384-channel convs) to
// scratch and reading it back.
constexpr int64_t kDenseBlockBytes = 8 * 1024 * 1024;
// A conv that is not weight-bound but has at most a block of tiles a thread is split by output channels
// (see winograd_forward) only while its V and Mt, which each thread then holds for all the tiles, take
// at most this much, about a 2 MB L2: W32's 64-channel 32x24 conv at batch 1 (0.9 MB) ran 1.35x faster
// so than by tiles, but its 128-channel 16x12 one at batch 8 (3.5 MB) 1.03x slower (2 threads of an
// Intel Xeon, the two splits in turns in one process), and the whole W32 at batch 8 with it split by
// tiles took 0.977-0.981x the time in three pairs of processes (in one process, 1.017x: 9 of 12).
constexpr int64_t kDenseSplitBytes = 2 * 1024 * 1024;
// A conv that is not weight-bound with at most a block of tiles a thread, where each thread would get
// at least this many tiles, takes a block a thread instead, each thread transforming every weight
// panel for its block, panel by panel (the filter transform done once a thread instead of once):
// - rather than split by channels (above): in a chain of convs (winograd_branches, winograd_blocks),
//   a channel split makes each thread's input transform read every channel of x, half of them
//   written by the other thread and fetched from its cache: the input transform took 18% of W32's
//   64-channel branch's time at batch 1 on 2 threads split by channels, 7% by tiles. That branch (8
//   convs) 1.076x faster by tiles (60 of 60), the whole W32 at batch 1 1.025x (32 of 40). The 1.35x
//   above was a lone conv, its x read by both threads.
// - rather than transform U once into shared scratch: each thread then read the half of U the other
//   wrote from the other's cache. W32's 128-channel 16x12 branch at batch 8, 2.4 MB of U a conv:
//   1.122x faster (20 of 20), the whole W32 at batch 8 1.012x (7 of 10).
// (2 threads of an Intel Xeon, each pair of splits in turns in one process, the same bits.)
constexpr int64_t kTileSplitTiles = 24;
// A U this small (W32's 32- and 64-channel F(4x4) ones: 147 and 590 KB) is transformed by each thread
// for itself when each has at least kOwnUTiles tiles: transforming all of U costs a thread about what
// the GEMMs of ~7 tiles do, so that much duplicated work stays under ~7% of a thread's share, while
// shared it took a parallel region of its own, slower on 2 threads than on 1. On 2 threads, W32 at
// batch 1: the 32- and 64-channel convs together 4-5% faster (with the channel split below), per-call
// times summed over 30 forwards, four pairs of processes; batch 8 1% faster.
constexpr int64_t kOwnUBytes = 640 * 1024;
// A dense weight transformed panel by panel (per_panel below) is transformed and used kSliceChannels
// input channels at a time where the Mt rows of the panels (which every slice's GEMMs read and add
// to) take at most kSliceMtBytes: a block of a dozen tiles, the small branches at batch 1. A whole
// panel's U (256 KB for 256 channels at F(2x2), 2.3x that at F(4x4)) shares L2 with V, Mt and the
// next panel's dense weight on its way in, and part of it was read back from L3; a slice's is read
// back while in L1 or L2. W32 at batch 1, weights cold, 2 threads of an Intel Xeon (AVX-512, 2 MB
// L2), slicing switched call by call in one process (the results are the same bits): the 256-channel
// 8x6 conv 1.21-1.29x faster, the 128-channel 16x12 one 1.04-1.09x (16-48 channels a slice measured
// alike); the whole W32 at batch 1 1.12x (40 of 40 forwards, an A/A control copy 0.99x apart), W48
// 1.15x, where unsliced also meant those panels unpaired (winograd_core.h); with them paired either
// way, W32 1.06-1.08x (28 and 29 of 30). The AVX2 variant (one panel a call, half the U) measured the
// same either way (0.99x, 12 of 30). With more tiles (the 64-channel 32x24 conv at batch 1, every
// batch-8 conv) slicing measured 0.8-1.0x: each slice then reads and writes Mt rows that no longer fit.
constexpr int64_t kSliceMtBytes = 64 * 1024;
constexpr int64_t kOwnUTiles = 96;
// The fewest tiles a block gets where the tiles are split only to give idle threads work (plan_winograd):
// one micro-kernel row. A dense weight's panel transform costs about what its GEMMs for ~6 tiles do,
// so a task of 6 tiles spends half its time transforming: W32's 128-channel 16x12 conv at batch 1 on
// 16 threads (12 tiles, 8 panels) then runs 16 tasks of 6 tiles instead of 8 of 12, each 3/4 as long.
constexpr int64_t kWideTiles = kMr;
// Four 16-wide panels a GEMM call where the GEMM is 16 lanes and U is whole before the tasks (given,
// shared or the thread's own; winograd_task): per k, 24 FMAs for 10 loads and one loop's bookkeeping
// instead of 12 for 8, 24 of the 32 registers accumulating. Lone convs on 2 threads of an Intel Xeon,
// in turns with two panels a call (the same bits): 64 channels at batch 8 (32x24) 1.047-1.049x (22
// and 26 of 30), 96 channels (four, then two) 1.049-1.073x, 48 (three) 1.094-1.109x (28-29 of 30);
// W32 at batch 8 1.017-1.022x (9 of 12, 10 of 16), batch 1 the same. Not where U is transformed panel
// by panel in the tasks (per_panel): four panels there (the transform's buffer twice as large, one
// weight stream for twice the GEMMs) took 1.08x as long for the 128-channel 16x12 conv at batch 1 and
// 1.17x for the 64-channel 32x24 one (the 256-channel 8x6 one at batch 8 the same).

// Whether plan_winograd splits tiles further to give idle threads work (below); on unless switched
// off by conv3x3_winograd_fill_team(False), for comparing the two splits in one process.
CpuSwitch fill_team;

bool conv3x3_winograd_fill_team(std::optional<bool> use) { return fill_team.set(use); }

// Whether plan_winograd gives a thread a block of its own and every panel's transform for it where
// the threads have kTileSplitTiles tiles each (own_panels); switched off by
// conv3x3_winograd_own_panels(False), for comparing in one process at thread counts not measured.
CpuSwitch own_panels_switch;

bool conv3x3_winograd_own_panels(std::optional<bool> use) { return own_panels_switch.set(use); }

// Whether a GEMM call takes four panels where U is whole (above); off: two, as before, for comparing
// in one process (conv3x3_winograd_four_panels(False)).
CpuSwitch four_panels;

bool conv3x3_winograd_four_panels(std::optional<bool> use) { return four_panels.set(use); }

// Whether plan_winograd fits its task counts to the team (team_fit below); on unless switched off
// by conv3x3_winograd_fit_team(False), for comparing in one process.
CpuSwitch fit_team_switch;

bool conv3x3_winograd_fit_team(std::optional<bool> use) { return fit_team_switch.set(use); }

// The most parts, at most `most`, that `n` units may each be cut into on `threads` threads without
// leaving a thread idle for nothing: n x parts at most a task a thread, or a multiple of the threads.
// Each thread takes a contiguous range of ceil(tasks / threads) tasks, so between those (threads <
// tasks < 2 threads, say) some threads get two tasks and others none, and the slowest does what it
// would with fewer, larger tasks, plus the transforms the extra cuts repeat: W32's 128-channel 16x12
// conv at batch 8 was 4 groups of tiles x 2 of panels on 6 threads (8 tasks: 4 threads busy), its
// 8 panels at batch 1 16 tasks of 6 tiles on 9 to 15 threads (8 busy, each filter transform twice).
// Teams of 3 to 15 threads are what branches side by side get (csrc/cpu/branch_split.h).
int64_t team_fit(int64_t n, int64_t most, int64_t threads) {
  if (!fit_team_switch.on()) return most;
  for (int64_t p = most; p > 1; --p)
    if (n * p <= threads || n * p % threads == 0) return p;
  return 1;
}

// A plan of `blocks` blocks of `tb` tiles and `splits` panel parts, with where its U comes from. A
// dense weight is transformed panel by panel inside the tasks when each panel then belongs to one task
// (a single block), or to one task a block where the tiles were split to fill the team (wide) or a
// block is a thread's (own_panels), or to panel_groups' tasks (those three: `own_panel_ways`). Else,
// where U is small and each thread has tiles enough to pay for transforming all of it (at least
// kOwnUTiles: `own_u_fits`), each thread transforms the whole U into its own scratch as its tasks
// begin; else it is transformed once, up front, into shared scratch.
WinogradPlan finish_plan(const WinogradGeometry& g, int K, bool u, int64_t blocks, int64_t splits, int64_t tb,
                         bool own_panel_ways, bool own_u_fits, int gemm_panels) {
  const bool per_panel = !u && (blocks == 1 || own_panel_ways);
  // Per panel, the transform and the GEMMs go a slice of kSliceChannels input channels at a time
  // where the panel's rows of Mt (what each slice's GEMMs add to) are few enough to stay close by;
  // else the whole panel at once.
  // (tb: a block's tiles, padded to kMr)
  const bool sliced = per_panel && K * K * tb * gemm_panels * kNr * int64_t(sizeof(float)) <= kSliceMtBytes;
  const int64_t slice = sliced ? std::min(kSliceChannels, g.cin) : g.cin;
  const bool own_u = !u && !per_panel && own_u_fits;
  return WinogradPlan{blocks, splits, tb, per_panel, own_u, sliced, slice};
}

}  // namespace

int64_t winograd_plan_switches() {
  return (fill_team.on() ? 1 : 0) | (own_panels_switch.on() ? 2 : 0) | (fit_team_switch.on() ? 4 : 0);
}

WinogradGeometry winograd_geometry(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int m) {
  WinogradGeometry g{n, h, w, cin, cout, (cin + 7) / 8 * 8, (cout + kNr - 1) / kNr * kNr, 0, 0, 0};
  g.tiles_h = (h + m - 1) / m;
  g.tiles_w = (w + m - 1) / m;
  g.tiles = n * g.tiles_h * g.tiles_w;
  return g;
}

WinogradPlan plan_winograd(const WinogradGeometry& g, int m, bool dense, int64_t threads, int gemm_panels) {
  const int K = m + 2;  // input tile size
  const int64_t panels = g.coutp / kNr;
  const bool u = !dense;  // as the driver's pointer: a packed U is given
  // Tiles per block: what the cache budget allows.
  const int64_t per_tile = K * K * (g.cinp + g.coutp) * int64_t(sizeof(float));
  const int64_t weight_bytes = K * K * g.cin * g.coutp * int64_t(sizeof(float));
  const int64_t budget = weight_bytes > kCachedWeightBytes ? kSpillBlockBytes : kBlockBytes;
  const int64_t max_tiles = std::max<int64_t>(kMr, budget / per_tile / kMr * kMr);
  int64_t blocks = (g.tiles + max_tiles - 1) / max_tiles, splits = 1;
  // Share the work between threads. Where the weights outweigh the tiles' V and Mt (few tiles, many
  // channels: W32's 16x12 and 8x6 branches at batch 1), reading U from memory is the cost, so each
  // thread takes a share of the output channels (of U) for every block; the input transform, cheap
  // there, is done by each. Otherwise each thread takes whole blocks, as many as the others (with
  // 2 threads, 3 blocks would leave one idle a third of the time), splitting channels only when
  // there are fewer blocks than threads.
  bool weight_bound = weight_bytes > g.tiles * per_tile;
  // A dense weight's conv whose tiles make at most a block a thread (W32's 64-channel 32x24 conv at
  // batch 1) is split by channels too, where every thread gets a panel and the tiles' V and Mt fit
  // kDenseSplitBytes: each then transforms only its own panels, in its own buffer, within the one
  // parallel region, instead of all threads writing the whole U to shared scratch in a region of its
  // own first (which took 35 us of the 64-channel conv's 129 on 2 threads, longer than on one: 29).
  // But where the threads get kTileSplitTiles tiles each, such a conv is split by tiles, a block a
  // thread, each thread transforming every panel for its block (own_panels), with no U shared.
  const bool few_blocks = !u && !weight_bound && threads > 1 && blocks <= threads;
  // On more than 2 threads only for a U above kOwnUBytes (here and for panel_groups below): a small U
  // shared is cheap to read (it stays in the caches), while each thread transforming all of it costs
  // what ~7 tiles' GEMMs do, a fixed cost a thread however few tiles each gets. On the 16-core machine
  // (W32, each way in turns in one process, 6 forwards each, sub-teams of 4-8 threads side by side):
  // batch 1 on 16 threads 21.9 ms with a thread or task its own panels of the 32- and 64-channel
  // (147 and 590 KB of U) convs, 19.1 without; on 8 threads 30.7 and 29.1; batch 8 on 16 threads,
  // where the 128-channel convs' 2.4 MB U is the one it changes, 81.1 with and 83.0 without.
  const bool own_splits = own_panels_switch.on() && (threads <= 2 || weight_bytes > kOwnUBytes);
  const bool own_panels = few_blocks && own_splits && g.tiles >= threads * kTileSplitTiles;
  // That channel split was measured on 2 threads; on more (fit_team) such a conv is split by tiles: on
  // 3 to 5 threads each thread's share of it timed on one core (conv3x3_winograd_thread_times, with and
  // without its caches evicted before each share; AMD EPYC), the channel split against the tiles split
  // with U shared: W32's 64-channel 32x24 conv at batch 1 1.31-1.70x slower on 3 and 4 threads (4
  // panels on 3: one thread gets 2; on 4 each transforms all 48 tiles' input for one panel), W48's
  // 96-channel one 1.17-1.76x on 3 to 5.
  const bool channel_split = threads <= 2 || !fit_team_switch.on();
  if (few_blocks && !own_panels && channel_split && panels >= threads && g.tiles * per_tile <= kDenseSplitBytes)
    weight_bound = true;
  if (weight_bound) {
    splits = std::min(panels, threads);
    if (!u && g.tiles * per_tile <= kDenseBlockBytes) blocks = 1;
  } else {
    if (g.tiles >= threads * kMr) blocks = std::max(blocks, threads);
    if (blocks >= threads) blocks = (blocks + threads - 1) / threads * threads;
  }
  int64_t tb = ((g.tiles + blocks - 1) / blocks + kMr - 1) / kMr * kMr;
  // The blocks share the tiles as evenly as groups of kMr allow (block_tiles), so a count that is a
  // multiple of the threads stays one: 1536 tiles (W32's 32-channel branch at batch 8) in blocks of at
  // most 54 made 29 such blocks, 15 for one thread and 14 for the other (810 tiles against 726), and
  // the first thread's work per forward was 5% above the second's, which waited at every conv's barrier;
  // 30 blocks of 48 or 54 tiles give each 768. Only a count above the groups (some empty) is cut.
  if (blocks > (g.tiles + kMr - 1) / kMr) blocks = (g.tiles + tb - 1) / tb;
  if (!weight_bound && blocks < threads)
    splits = team_fit(blocks, std::min(panels, (threads + blocks - 1) / blocks), threads);
  // Many threads, few tasks: where blocks x splits leaves threads idle (16 threads, W32 at batch 1:
  // the 64-channel 32x24 conv made 2 blocks x 4 panel groups, the 128-channel 16x12 one 8 panels of
  // one block), the tiles are split further, into blocks of at least kWideTiles, until the tasks fill
  // the team (or the tiles run out). A dense weight transformed panel by panel in the tasks (one
  // block) stays so (wide): each panel's filter transform is then done once a block, by threads that
  // would otherwise wait.
  bool wide = false;
  if (fill_team.on() && blocks * splits < threads) {
    const int64_t more = team_fit(splits, std::min((threads + splits - 1) / splits, g.tiles / kWideTiles), threads);
    if (more > blocks) {
      wide = blocks == 1;
      tb = ((g.tiles + more - 1) / more + kMr - 1) / kMr * kMr;
      blocks = (g.tiles + tb - 1) / tb;
    }
  }

  // A U that would be shared (none of the ways below to transform it per thread or per panel) by
  // blocks of fewer than kTileSplitTiles tiles: each thread would read all of U, most of it from the
  // other cores' caches, for a few tiles' GEMMs (W32's 128-channel 16x12 conv at batch 8 on 16 threads:
  // 2.4 MB of U for 6 tiles a thread). Where blocks of kTileSplitTiles times groups of panels give the
  // team a task each at most and fill it, that split instead, each task transforming its own panels
  // for its block (panel_groups): 4 x 4 tasks of 24 tiles and 2 panels there (on 16 threads measured
  // only together with own_panels, above); on 2 threads it changes only convs such as W48's
  // 96-channel 32x24 one at batch 1 (a block a thread: that branch alone 1.43x faster, 40 of 40; the
  // whole W48 at batch 1 1.060x, 30 of 30). Switched with own_panels.
  const bool own_u_fits = threads > 1 && weight_bytes <= kOwnUBytes && g.tiles >= kOwnUTiles * threads;
  if (!u && own_splits && threads > 1 && !weight_bound && !own_panels && !wide && blocks > 1 &&
      !own_u_fits && tb < kTileSplitTiles) {
    const int64_t most = std::max<int64_t>(1, g.tiles / kTileSplitTiles);  // groups of kTileSplitTiles at least
    const auto grouped = [&](int64_t groups, int64_t parts) {
      const int64_t gtb = ((g.tiles + groups - 1) / groups + kMr - 1) / kMr * kMr;
      return finish_plan(g, K, u, (g.tiles + gtb - 1) / gtb, parts, gtb, true, own_u_fits, gemm_panels);
    };
    std::optional<WinogradPlan> best;
    const bool fills = most <= threads && most * std::min(panels, (threads + most - 1) / most) >= threads;
    if (fills && fit_team_switch.on()) {
      // fit_team: the groups (2 at least where there are 2: one group of all the tiles is the channel
      // split above) and parts whose plan is modelled cheapest (winograd_plan_cost: the slowest thread's
      // tasks) among those that keep 3/4 of the team busy; none such: U shared. The most groups and
      // ceil(threads / groups) parts (below) gave 4 groups x 2 parts on 6 threads (8 tasks, 4 threads
      // busy; 3 x 2 keeps 6) and 2 x 2 on 3 (2 busy; U shared: the tiles split 3 ways). The search adds
      // a few microseconds to a plan at most (13 for W48's 96-channel 32x24 conv at batch 16 on 32
      // threads, which takes milliseconds).
      double cheapest = 0.0;
      for (int64_t gr = std::min<int64_t>(2, most); gr <= most; ++gr) {
        for (int64_t parts = 1; parts <= std::min(panels, (threads + gr - 1) / gr); ++parts) {
          const WinogradPlan p = grouped(gr, parts);
          const int64_t tasks = p.blocks * p.splits, chunk = (tasks + threads - 1) / threads;
          if ((tasks + chunk - 1) / chunk * 4 < threads * 3) continue;
          const double cost = winograd_plan_cost(g, m, p, threads);
          if (!best || cost < cheapest) {
            best = p;
            cheapest = cost;
          }
        }
      }
    } else if (fills) {  // the most groups, ceil(threads / groups) parts each
      best = grouped(most, std::min(panels, (threads + most - 1) / most));
    }
    if (best) return *best;
  }

  return finish_plan(g, K, u, blocks, splits, tb, wide || own_panels, own_u_fits, gemm_panels);
}

DenseWeight dense_weight_arg(const char* op, const char* name, const at::Tensor& w, int64_t cout, int64_t cin,
                             at::Tensor& kept) {
  const int64_t panels = (cout + kNr - 1) / kNr;
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.layout() == at::kStrided, op, ": ", name,
              " must be a dense float32 CPU tensor, got ", w.scalar_type(), " on ", w.device());
  if (w.dim() == 5) {
    TORCH_CHECK(w.size(0) == panels && w.size(1) == cin && w.size(2) == 3 && w.size(3) == 3 && w.size(4) == kNr &&
                    w.is_contiguous(),
                op, ": a 5-D ", name, " must be a contiguous panel-major 3x3 weight [", panels, ", ", cin,
                ", 3, 3, 16] (hrnet_fast.ops.winograd.panel_major of a [", cout, ", ", cin, ", 3, 3] weight), got ",
                w.sizes(), w.is_contiguous() ? "" : " (not contiguous)");
    kept = w;
    return DenseWeight::panel_major(w.data_ptr<float>(), cin);
  }
  TORCH_CHECK(w.dim() == 4 && w.size(0) == cout && w.size(1) == cin && w.size(2) == 3 && w.size(3) == 3, op, ": ",
              name, " must be the dense 3x3 weight [", cout, ", ", cin, ", 3, 3] (or panel-major [", panels, ", ",
              cin, ", 3, 3, 16]), got shape ", w.sizes());
  // Read in place where stored OIHW (contiguous) or IHWO [C_in][3][3][C_out], checked by its strides
  // (tensor_view.h: a permuted view made on every call cost 5.7 us of W32's ~150 us calls at batch 1,
  // its caches cold); any other strides are copied to OIHW first.
  if (dense_in_order(w, std::array<int, 4>{1, 2, 3, 0})) {
    kept = w;
    return DenseWeight::ihwo(kept.data_ptr<float>(), cout);
  }
  kept = w.contiguous();
  return DenseWeight::oihw(kept.data_ptr<float>(), cin);
}

WinogradRunner::WinogradRunner(const WinogradGeometry& g, int m, bool dense, int64_t threads, int64_t min_slots,
                               const WinogradPlan* plan)
    : g_(g), m_(m), dense_(dense), kernels_(winograd_kernels(active_cpu_isa())),
      plan_(plan ? *plan : plan_winograd(g, m, dense, threads, kernels_.gemm_panels)) {
  const int K = m + 2;  // input tile size
  u_stride_ = g.coutp * g.cin;  // a packed transformed weight's
  if (plan_.own_u || shared_u()) u_stride_ = plane_stride(g.coutp * g.cin);
  // Each thread's V and Mt (and U panel), from torch's allocator so memory profiles see them
  // (at::empty is 64-byte aligned, as the transforms' vector accesses need; per-thread slices keep that).
  vbuf_floats_ = K * K * plane_stride(plan_.tb * g.cinp);
  mbuf_floats_ = K * K * plane_stride(plan_.tb * g.coutp);
  group_ = kernels_.gemm_panels == 2 && four_panels.on() && !plan_.per_panel ? 4 : kernels_.gemm_panels;
  const int64_t ubuf_floats = plan_.per_panel ? K * K * plane_stride(group_ * plan_.slice * kNr)
                              : plan_.own_u   ? K * K * u_stride_
                                              : 0;
  per_thread_ = vbuf_floats_ + mbuf_floats_ + ubuf_floats;  // each a multiple of 16 floats
  slots_ = std::min(std::max(threads, min_slots), tasks());
  scratch_ = empty_float({slots_ * per_thread_});
  if (shared_u()) u_scratch_ = empty_float({K * K * u_stride_});
}

const float* WinogradRunner::transform_shared_u(const DenseWeight& w) {
  winograd_transform_all(w, g_.cin, g_.cout, m_, u_scratch_.data_ptr<float>(), u_stride_);
  return u_scratch_.data_ptr<float>();
}

const float* WinogradRunner::transform_shared_u_part(const DenseWeight& w, int64_t part, int64_t parts) const {
  const int64_t ci0 = g_.cin * part / parts, ci1 = g_.cin * (part + 1) / parts;
  float* u = u_scratch_.data_ptr<float>();
  if (ci0 < ci1) (m_ == 2 ? kernels_.w2 : kernels_.w4)(w, g_.cin, g_.cout, ci0, ci1, u, u_stride_);
  return u;
}

void WinogradRunner::run(int64_t slot, int64_t begin, int64_t end, const float* x, const float* u, const DenseWeight& w,
                         const float* bias, const float* residual, bool relu, float* y) const {
  const WinogradTaskFn run_task = m_ == 2 ? kernels_.m2 : kernels_.m4;
  const int64_t blocks = plan_.blocks, splits = plan_.splits, panels = g_.coutp / kNr;
  float* vbuf = scratch_.data_ptr<float>() + std::min<int64_t>(slot, slots_ - 1) * per_thread_;
  float* mbuf = vbuf + vbuf_floats_;
  float* ubuf = mbuf + mbuf_floats_;  // U panels (per_panel) or the whole U (own_u); else empty
  const float* task_u = u;
  if (plan_.own_u) {  // once per range of tasks, so once per thread
    (m_ == 2 ? kernels_.w2 : kernels_.w4)(w, g_.cin, g_.cout, 0, g_.cin, ubuf, u_stride_);
    task_u = ubuf;
  }
  for (int64_t task = begin; task < end; ++task) {
    // part-major: a thread's contiguous range of tasks covers its share of channels, all blocks
    const int64_t part = task / blocks, blk = task % blocks;
    const int64_t j0 = panels * part / splits, j1 = panels * (part + 1) / splits;
    const auto [t0, nt] = block_tiles(g_.tiles, blocks, blk);
    const int64_t ntp = (nt + kMr - 1) / kMr * kMr;
    run_task(WinogradTask{x, task_u, u_stride_, w, plan_.per_panel ? ubuf : nullptr, bias, residual, relu, &g_, y,
                          vbuf, mbuf, t0, nt, ntp, j0, j1, plan_.slice, group_});
  }
}

namespace {

// u: the packed transformed weight, or null with w the dense weight (transformed here).
void winograd_forward(const float* x, const float* u, const DenseWeight& w, const float* bias, const float* residual,
                      bool relu, const WinogradGeometry& g, int m, float* y) {
  // This library's own first-region set-up (csrc/cpu/cpu_thread_team.cpp) before the team is read:
  // the scratch has a slot per thread of the parallel_for's team, so the two must agree.
  at::internal::lazy_init_num_threads();
  WinogradRunner runner(g, m, u == nullptr, at::get_num_threads());
  if (runner.shared_u()) u = runner.transform_shared_u(w);
  // parallel_for hands each thread one contiguous range of tasks, as run() needs
  at::parallel_for(0, runner.tasks(), 1, [&](int64_t begin, int64_t end) {
    runner.run(at::get_thread_num(), begin, end, x, u, w, bias, residual, relu, y);
  });
}

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t out_channels,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                bool relu, int64_t tile) {
  constexpr const char* op = "hrnet_fast::conv3x3_winograd (cpu)";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const int64_t cin = x.size(1), cout = out_channels;
  // tile 0: weight is transformed ([16 or 36, ceil(C_out/16), C_in, 16]); 2 or 4: weight is dense
  const bool dense = tile != 0;
  TORCH_CHECK(tile == 0 || tile == 2 || tile == 4, op, ": tile must be 2 or 4 for a dense weight (0: weight is "
              "transformed), got ", tile);
  if (!dense) {
    TORCH_CHECK(weight.dim() == 4 && (weight.size(0) == 16 || weight.size(0) == 36) && weight.size(3) == kNr,
                op, ": weight must be a transformed weight [16 or 36, ceil(C_out/16), C_in, 16] from "
                "hrnet_fast.ops.winograd.transform_weight (or a dense [C_out, C_in, 3, 3] one with tile=2 or 4), "
                "got shape ", weight.sizes());
    TORCH_CHECK(weight.size(2) == cin, op, ": weight was transformed for ", weight.size(2), " input channels, x has ", cin);
    TORCH_CHECK(cout > (weight.size(1) - 1) * kNr && cout <= weight.size(1) * kNr, op, ": out_channels=", cout,
                " does not fit a weight transformed for ", weight.size(1) * kNr, " (padded) output channels");
  }
  for (const auto* t : {&x, &weight}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->layout() == at::kStrided, op,
                ": x and weight must be dense float32 CPU tensors, got ", t->scalar_type(), " on ", t->device());
  }
  const std::vector<int64_t> out_sizes = {x.size(0), cout, x.size(2), x.size(3)};
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout && bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                op, ": bias must be a float32 CPU tensor of shape [", cout, "], got ", bias->sizes(), " ",
                bias->scalar_type(), " on ", bias->device());
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == c10::IntArrayRef(out_sizes) && residual->scalar_type() == at::kFloat &&
                    residual->device().is_cpu() && residual->layout() == at::kStrided,
                op, ": residual must be a dense float32 CPU tensor of the output's shape ", out_sizes, ", got ",
                residual->sizes(), " ", residual->scalar_type(), " on ", residual->device());
  }
  const at::MemoryFormat fmt = x.suggest_memory_format();
  // The kernel works in NHWC; an NCHW x (or residual) is converted, and y is returned in x's format.
  at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (cin % 8 == 0 && reinterpret_cast<std::uintptr_t>(xc.data_ptr()) % 32) xc = xc.clone(at::MemoryFormat::ChannelsLast);
  at::Tensor wc;
  const DenseWeight w = dense ? dense_weight_arg(op, "weight", weight, cout, cin, wc) : DenseWeight{};
  if (!dense) wc = weight.contiguous();
  std::optional<at::Tensor> bc, rc;
  if (bias) bc = bias->contiguous();
  if (residual) rc = residual->contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = empty_float(out_sizes, at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return fmt == at::MemoryFormat::ChannelsLast ? y : y.contiguous(fmt);

  const int m = dense ? static_cast<int>(tile) : weight.size(0) == 16 ? 2 : 4;
  const WinogradGeometry g = winograd_geometry(x.size(0), x.size(2), x.size(3), cin, cout, m);
  const float* b = bc ? bc->data_ptr<float>() : nullptr;
  const float* r = rc ? rc->data_ptr<float>() : nullptr;
  const float* u = dense ? nullptr : wc.data_ptr<float>();
  winograd_forward(xc.data_ptr<float>(), u, w, b, r, relu, g, m, y.data_ptr<float>());
  return fmt == at::MemoryFormat::ChannelsLast ? y : y.contiguous(fmt);
}

// conv3x3_winograd_plan: how conv3x3_winograd would share out a conv of x's sizes [N, C_in, H, W] on
// `threads` threads, for tests and for reading a thread count's parallelism: [blocks, splits, tiles a
// block, per_panel, own_u, sliced, input channels a slice, tiles].
std::vector<int64_t> conv3x3_winograd_plan(c10::IntArrayRef x_size, int64_t out_channels, int64_t tile, bool dense,
                                           int64_t threads) {
  constexpr const char* op = "hrnet_fast::conv3x3_winograd_plan";
  TORCH_CHECK(x_size.size() == 4 && out_channels > 0 && threads > 0, op, ": x_size must be [N, C_in, H, W], "
              "out_channels and threads positive, got ", x_size, ", ", out_channels, ", ", threads);
  TORCH_CHECK(tile == 2 || tile == 4, op, ": tile must be 2 or 4, got ", tile);
  const WinogradGeometry g = winograd_geometry(x_size[0], x_size[2], x_size[3], x_size[1], out_channels,
                                               static_cast<int>(tile));
  const WinogradPlan p = plan_winograd(g, static_cast<int>(tile), dense, threads,
                                       winograd_kernels(active_cpu_isa()).gemm_panels);
  return {p.blocks, p.splits, p.tb, p.per_panel, p.own_u, p.sliced, p.slice, g.tiles};
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("conv3x3_winograd", &hrnet_fast::conv3x3_winograd_cpu); }

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  m.def("conv3x3_winograd_plan(int[] x_size, int out_channels, int tile, bool dense, int threads) -> int[]",
        &hrnet_fast::conv3x3_winograd_plan);
  // whether the split fills the team (plan_winograd); `use` switches it, for comparisons
  m.def("conv3x3_winograd_fill_team(bool? use=None) -> bool", &hrnet_fast::conv3x3_winograd_fill_team);
  // whether its task counts fit teams of 3 and more (team_fit, the tiles split on 3+ threads); `use` switches it
  m.def("conv3x3_winograd_fit_team(bool? use=None) -> bool", &hrnet_fast::conv3x3_winograd_fit_team);
  // whether the split gives each thread a block of tiles and every panel's transform (own_panels)
  m.def("conv3x3_winograd_own_panels(bool? use=None) -> bool", &hrnet_fast::conv3x3_winograd_own_panels);
  // whether a GEMM call takes four weight panels where U is whole before the tasks (else two)
  m.def("conv3x3_winograd_four_panels(bool? use=None) -> bool", &hrnet_fast::conv3x3_winograd_four_panels);
}
