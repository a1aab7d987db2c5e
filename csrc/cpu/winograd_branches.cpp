// winograd_branches on CPU: an HR module's branches, each a chain of BasicBlocks as winograd_blocks runs
// it, side by side on shares of the threads: one parallel region, each branch's threads a sub-team of
// it with a barrier of its own between that branch's convs (WinogradChain, csrc/cpu/winograd_chain.h).
//
// Why: on 16 threads W32 at batch 1 stopped gaining after 8 (README, "Threads"): a branch conv at
// batch 1 has 12 to 192 tiles, too little to split 16 ways well, while its module has 2 to 4 such
// branches that need not wait for each other. Split between branches, each conv runs on 4 threads
// instead of 16. Where every branch gets at least 2 threads (threads >= 2 x branches), all of them so,
// the threads shared by their plans' modelled cost (csrc/cpu/branch_split.h; or, switched on, then by
// what each branch took: csrc/cpu/branch_balance.h);
// on 2 threads, all of them in two lanes of a thread each, the first branch's chain split between the
// lanes at the conv that balances them (csrc/cpu/lane_split.h); otherwise the branches run one after
// another, each on all the threads, as winograd_blocks. (Python-level tasks running
// blocks side by side on a thread each measured slower than each op split two ways: README, "Threads:
// branches side by side"; within one region, with no op between a branch's convs, two small branches
// gain.) No OpenMP team but the calling thread's: the sub-teams are ranges of its threads (a task
// worker making its own team would start an OpenMP pool of its own, README, "On 16 cores, tasks
// lost"). A branch whose U is transformed up front (W32's 32-channel one at batch 1 on sub-teams of 2
// to 8) has its sub-team transform it, a share of the input channels each, and meet before the tasks.
// The results are the same bits as one winograd_blocks call a branch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <numeric>
#include <optional>
#include <thread>
#include <vector>

#include "cpu/branch_balance.h"
#include "cpu/branch_split.h"
#include "cpu/cpu_switch.h"
#include "cpu/lane_split.h"
#include "cpu/winograd_chain.h"

namespace hrnet_fast {
namespace {

// On 2 threads (fewer than two a branch), with the lanes' split switched off (below), the first two
// branches run side by side on a thread each where neither branch's convs take more than this many
// multiply-adds, and the others after them on both threads: at batch 1 a conv split two ways loses a
// quarter of its time to the split (the two threads meet after every conv, and each reads the
// channels of x the other wrote from the other's cache; W32's 64-channel branch alone: 1178 us on one
// thread, 880 on two), more than running two branches of about equal work at once loses to their
// difference (32 and 64 channels: 1335 and 1178 us). W32 (28 M multiply-adds a conv at batch 1, 2
// threads of an Intel Xeon, the two ways in turns in one process): batch 1 1.057x faster (36 of 40),
// batch 2 (57 M) 1.061x (10 of 12), batch 4 (113 M) 1.002x (7 of 12), batch 8 0.983x (3 of 8); W48 at
// batch 1 (64 M) 1.004x (17 of 30). Unbalanced, the pair gains nothing from batch 4 on; with the
// split balancing the lanes, every batch gains (winograd_branches_split).
constexpr double kPairMacs = 60e6;

// Four such branches on 2 threads (W32's stage 4 at batch 1) run in two lanes instead: the last on one
// thread, the first three one after another on the other. Equal multiply-adds are not equal time: on
// one thread W32's branches take 1.36, 1.20, 1.64 and 3.70 ms at batch 1 (the last, 8x6, makes F(2x2)
// tiles and streams its 2.4 MB weights for 12 of them: csrc/cpu/branch_balance.h), so 3.70 against
// 4.20 ms, where the first two side by side and the others split two ways took about 1.36 + 1.0 +
// 2.2. W32 at batch 1, the two ways in turns in one process: 1.027x and 1.028x faster (32 and 35 of
// 40), batch 2 1.009x (12 of 20). With the split switched on (the default) every number of branches
// and every batch runs in two lanes so; off, four small ones as here, three as two side by side and
// the third after them (in lanes whole, W32's stage 3: 1.64 against 2.56 ms, 0.995x, 18 of 40).
CpuSwitch lanes_switch;

bool winograd_branches_lanes(std::optional<bool> use) { return lanes_switch.set(use); }

// Whether branches may run side by side (on by default; off for comparing in one process)
CpuSwitch side_by_side;

bool winograd_branches_side_by_side(std::optional<bool> use) { return side_by_side.set(use); }

// Whether the branches run in two lanes on 2 threads at any size, the first branch's chain split
// between them where they balance better so (csrc/cpu/lane_split.h); on by default, off for comparing
// in one process: then only small branches run side by side, as above. W32 on 2 threads of an Intel
// Xeon, on and off in turns in one process (same bits): batch 1 1.025x faster (48 of 60), batch 2
// 1.085x (20 of 20), batch 4 1.026x (9 of 12), batch 8 1.043x and 1.050x (11 of 12, 9 of 10), settled
// at the first branch's conv 6 of 8 in stage 3 at batch 1 (8, no split, in most of stage 4), 5 and 4
// at batch 8; the arena held as much (batch 8: 82 MiB against 84). W48 at batch 1 1.034x (18 of 20),
// batch 8 1.061x (5 of 6); HRNetV2-W48 at 512x512, batch 1, 1.067x (6 of 6).
CpuSwitch split_switch;

bool winograd_branches_split(std::optional<bool> use) { return split_switch.set(use); }

// Whether the two lanes share the split chain's tail [split, n) (on by default; off for comparing in
// one process): both lanes end with it, each conv's tasks taken one at a time by whichever lane is
// there, so the lanes end within a task of each other wherever both reach the tail before it is
// done, where a whole conv moved between them left up to half a conv's difference, and the second
// lane, after its own branch, waited for the first's share of the chain where the first had more to
// do (W32 at batch 8, 2 threads of an Intel Xeon: 3.5 ms a forward lost so in 8 modules, the 2-branch
// one's lanes 7.3 and 9.8 ms at split 6, 8.7 and 9.9 at 7; shared, 8.4-8.8 both). Same bits: a task
// computes its tiles alike on either thread. Two copies of W32 in one process, shared and not, in
// turns: batch 8 1.016x and 1.008x faster (11 of 16, 7 of 12), batch 1 1.000x and 1.011x (30 of 60,
// 27 of 40), where the lanes had ended 0.45 ms apart a forward in all; W48 batch 1 1.020x (21 of 30),
// batch 8 1.005x (6 of 8); HRNetV2-W48 at 512x512, batch 1, 0.998x (4 of 10).
CpuSwitch share_switch;

bool winograd_branches_share_tail(std::optional<bool> use) { return share_switch.set(use); }

// Whether branches side by side share the threads by their plans' modelled cost (model_split,
// csrc/cpu/branch_split.h; on by default) or, off, by their direct convs' multiply-adds (split_team,
// as before the twenty-eighth session), for comparing in one process.
CpuSwitch model_switch;

bool winograd_branches_model_split(std::optional<bool> use) { return model_switch.set(use); }

// Convs [begin, end) of chain `chain` (an index into the chains side by side); shared: by both lanes
// (share_switch), a task at a time.
struct Segment {
  int64_t chain, begin, end;
  bool shared = false;
};

// What each sub-team runs, one segment after another. On 2 threads with every branch on a thread of its
// own (branch_teams gives that only for the lanes): the first lane the first chain's convs [0, split),
// then the chains between; the second the last chain, then the first's convs [split, n) (split = n: as
// the lanes above), which the first lane joins at its end where `shared`. Else a whole chain a sub-team.
std::vector<std::vector<Segment>> branch_lanes(const std::vector<int64_t>& convs, int64_t threads, int64_t split,
                                               bool shared = false) {
  const int64_t chains = static_cast<int64_t>(convs.size());
  std::vector<std::vector<Segment>> lanes;
  if (threads == 2 && chains >= 2) {
    lanes.resize(2);
    if (split > 0) lanes[0].push_back({0, 0, split});
    for (int64_t k = 1; k + 1 < chains; ++k) lanes[0].push_back({k, 0, convs[k]});
    lanes[1].push_back({chains - 1, 0, convs[chains - 1]});
    if (split < convs[0]) {
      lanes[1].push_back({0, split, convs[0], shared});
      if (shared && !lanes[0].empty()) lanes[0].push_back({0, split, convs[0], true});
    }
    if (lanes[0].empty()) lanes.erase(lanes.begin());  // the whole first chain after the last
    return lanes;
  }
  for (int64_t k = 0; k < chains; ++k) lanes.push_back({{k, 0, convs[k]}});
  return lanes;
}

// Waits until done() is true: spins, then yields (threads may outnumber cores: tests run 16 on 2).
template <typename F>
void spin_until(const F& done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 2048)
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

// The state of a chain's shared tail (share_switch): per conv, its tasks taken and finished so far and
// its U (a dense weight transformed up front, shared_u) 0 not begun, 1 being transformed, 2 ready.
struct SharedTail {
  // a vector's atomics are value-initialized: zeros
  explicit SharedTail(int64_t convs) : taken(convs), finished(convs), u_state(convs) {}
  std::vector<std::atomic<int64_t>> taken, finished;
  std::vector<std::atomic<int>> u_state;
  std::atomic<const float*> u{nullptr};
  double end = 0.0;  // when its last conv was done (by now())
};

// A lane's part of chain's shared convs [begin, end): each conv once `done` (the chain's convs done)
// reaches it, its U transformed by the first lane there (the other waits), then tasks taken one at a
// time with this lane's scratch slot; the lane that finishes a conv's last task marks it done. Each
// conv's tasks start only after the one before is done, so its U's scratch is free again.
template <typename Now>
void run_shared(const WinogradChain& chain, SharedTail& st, std::atomic<int64_t>& done, int64_t begin, int64_t end,
                int64_t slot, const Now& now) {
  const int64_t tasks = chain.runner().tasks();
  const bool shared_u = chain.runner().shared_u();
  for (int64_t i = begin; i < end; ++i) {
    spin_until([&] { return done.load(std::memory_order_acquire) >= i; });
    if (st.taken[i].load(std::memory_order_relaxed) >= tasks) continue;  // the other lane has them all
    const float* u = nullptr;
    if (shared_u) {
      int idle = 0;
      if (st.u_state[i].compare_exchange_strong(idle, 1, std::memory_order_acq_rel)) {
        u = chain.transform_u_part(i, 0, 1);
        st.u.store(u, std::memory_order_relaxed);
        st.u_state[i].store(2, std::memory_order_release);
      } else {
        spin_until([&] { return st.u_state[i].load(std::memory_order_acquire) == 2; });
        u = st.u.load(std::memory_order_relaxed);
      }
    }
    for (int64_t t; (t = st.taken[i].fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      chain.run(i, slot, t, t + 1, u);
      if (st.finished[i].fetch_add(1, std::memory_order_acq_rel) + 1 == tasks) {
        if (i + 1 == end) st.end = now();
        done.store(i + 1, std::memory_order_release);
      }
    }
  }
}

// A sub-team's barrier: the last of its n threads to arrive starts the next generation.
struct alignas(64) SubTeamBarrier {
  std::atomic<int> arrived{0};
  std::atomic<int> generation{0};
  int n = 1;
  void wait() {
    const int g = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      arrived.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
      return;
    }
    spin_until([&] { return generation.load(std::memory_order_acquire) != g; });
  }
};

// Branch b's threads when its chain runs side by side with others (team[b]), or 0: after those, on
// all the threads. shapes: each branch's conv geometry, tile and convs.
std::vector<int64_t> branch_teams(const std::vector<BranchShape>& shapes, int64_t threads) {
  const int64_t branches = static_cast<int64_t>(shapes.size());
  std::vector<int64_t> team(branches, 0);
  if (!side_by_side.on() || branches < 2) return team;
  // multiply-adds of one of each branch's direct convs (what decides the pairs on 2 threads, measured so)
  std::vector<double> macs(branches);
  for (int64_t b = 0; b < branches; ++b) macs[b] = shapes[b].direct_macs();
  if (threads >= 2 * branches) {
    if (model_switch.on()) return model_split(shapes, threads);
    std::vector<double> work(branches);
    for (int64_t b = 0; b < branches; ++b) work[b] = macs[b] * static_cast<double>(shapes[b].convs);
    return split_team(threads, work);
  }
  const bool small = *std::max_element(macs.begin(), macs.end()) <= kPairMacs;
  if (threads == 2 && lanes_switch.on() && (split_switch.on() || (small && branches == 4)))
    return std::vector<int64_t>(branches, 1);  // in two lanes (branch_lanes)
  if (threads == 2 && std::max(macs[0], macs[1]) <= kPairMacs) team[0] = team[1] = 1;
  return team;
}

// Each branch's shape for branch_teams: its input's sizes [N, C, H, W] (C -> C convs), tile and convs;
// null where a size is not 4-D (the chains' own checks refuse it).
std::optional<std::vector<BranchShape>> branch_shapes(const std::vector<at::IntArrayRef>& sizes, at::IntArrayRef tiles,
                                                      at::IntArrayRef convs) {
  std::vector<BranchShape> shapes;
  for (size_t b = 0; b < sizes.size(); ++b) {
    const auto& s = sizes[b];
    if (s.size() != 4 || (tiles[b] != 2 && tiles[b] != 4)) return std::nullopt;
    const int m = static_cast<int>(tiles[b]);
    shapes.push_back({winograd_geometry(s[0], s[2], s[3], s[1], s[1], m), m, convs[b]});
  }
  return shapes;
}

// winograd_branches_plan: branch_teams for inputs of these sizes ([N, C, H, W] each) and tiles (4 each
// where not given), for tests
std::vector<int64_t> winograd_branches_plan(const std::vector<std::vector<int64_t>>& x_sizes, at::IntArrayRef convs,
                                            int64_t threads, at::OptionalIntArrayRef tiles) {
  constexpr const char* op = "hrnet_fast::winograd_branches_plan";
  TORCH_CHECK(x_sizes.size() == convs.size() && threads > 0, op, ": x_sizes and convs must be one a branch and "
              "threads positive, got ", x_sizes.size(), ", ", convs.size(), ", ", threads);
  TORCH_CHECK(!tiles || tiles->size() == x_sizes.size(), op, ": tiles must be one a branch, got ", tiles->size(),
              " for ", x_sizes.size(), " branches");
  const std::vector<int64_t> fours(x_sizes.size(), 4);
  const at::IntArrayRef t = tiles ? *tiles : at::IntArrayRef(fours);
  for (size_t b = 0; b < x_sizes.size(); ++b) {
    TORCH_CHECK(x_sizes[b].size() == 4, op, ": each x size must be [N, C, H, W], got ", x_sizes[b]);
    TORCH_CHECK(t[b] == 2 || t[b] == 4, op, ": tiles must be 2 or 4, got ", t[b]);
  }
  return branch_teams(*branch_shapes(std::vector<at::IntArrayRef>(x_sizes.begin(), x_sizes.end()), t, convs), threads);
}

std::vector<at::Tensor> winograd_branches_cpu(at::TensorList xs, at::TensorList weights, at::TensorList biases,
                                              at::IntArrayRef convs, at::IntArrayRef tiles) {
  constexpr const char* op = "hrnet_fast::winograd_branches (cpu)";
  const int64_t branches = static_cast<int64_t>(xs.size());
  TORCH_CHECK(branches >= 1 && static_cast<int64_t>(convs.size()) == branches &&
                  static_cast<int64_t>(tiles.size()) == branches,
              op, ": xs, convs and tiles must be one a branch (at least one), got ", branches, ", ", convs.size(),
              " and ", tiles.size());
  int64_t total = 0;
  for (int64_t c : convs) {
    TORCH_CHECK(c >= 2 && c % 2 == 0, op, ": convs must be two a block for each branch, got ", convs);
    total += c;
  }
  TORCH_CHECK(total == static_cast<int64_t>(weights.size()) && weights.size() == biases.size(), op,
              ": weights and biases must hold sum(convs) = ", total, " each, got ", weights.size(), " and ",
              biases.size());
  at::internal::lazy_init_num_threads();  // this library's first-region set-up before the team is read
  const int64_t threads = at::get_num_threads();
  const bool nested = at::in_parallel_region() || omp_in_parallel();
  std::vector<at::IntArrayRef> sizes;
  for (const at::Tensor& x : xs) sizes.push_back(x.sizes());
  const std::optional<std::vector<BranchShape>> shapes = branch_shapes(sizes, tiles, convs);
  std::vector<int64_t> team = nested || !shapes ? std::vector<int64_t>(branches, 0) : branch_teams(*shapes, threads);
  // Where every branch has threads of its own, their split is measured (csrc/cpu/branch_balance.h):
  // this set of branches' search, keyed by the thread count and each branch's shape, convs and tile.
  std::vector<int64_t> key;
  const bool balanced = branches >= 2 && threads >= 2 * branches && team[0] > 0;
  if (balanced) {
    key.push_back(threads);
    for (int64_t b = 0; b < branches; ++b) {
      key.insert(key.end(), xs[b].sizes().begin(), xs[b].sizes().end());
      key.push_back(convs[b]);
      key.push_back(tiles[b]);
    }
    team = balanced_teams(key, threads, team);
  }
  auto chain = [&](int64_t b, int64_t team_size, int64_t slots) {
    const int64_t off = std::accumulate(convs.begin(), convs.begin() + b, int64_t{0});
    return WinogradChain(op, xs[b], weights.slice(off, convs[b]), biases.slice(off, convs[b]), tiles[b], team_size,
                         slots);
  };
  std::vector<int64_t> apart;  // the branches side by side, in order
  for (int64_t b = 0; b < branches; ++b)
    if (team[b] > 0) apart.push_back(b);
  // Two lanes on 2 threads (branch_lanes): where the first chain's tail may be shared (its split is
  // known only below), the chain holds a scratch slot for each lane
  const bool two_lanes = threads == 2 && apart.size() >= 2 && team[apart[0]] == 1;
  const bool share = two_lanes && split_switch.on() && share_switch.on();
  std::vector<WinogradChain> chains;  // theirs
  for (int64_t b : apart) chains.push_back(chain(b, team[b], share && b == apart[0] ? 2 : 0));
  if (std::any_of(chains.begin(), chains.end(), [](const WinogradChain& c) { return c.empty(); })) {
    chains.clear();  // an empty input among them: all one after another
    apart.clear();
  }
  std::vector<at::Tensor> out(branches);
  if (!apart.empty()) {
    const int64_t n = static_cast<int64_t>(apart.size());
    std::vector<int64_t> chain_convs(n);
    for (int64_t k = 0; k < n; ++k) chain_convs[k] = chains[k].convs();
    // Two lanes on 2 threads: where the first chain is split between them (lane_split), keyed by the
    // branches' shapes, convs and tiles, and by where the first weight is: a model's modules of the
    // same shapes settle apart (W32's stage 4 at batch 1: the first module's lanes 4.7 and 4.0 ms,
    // the last's 4.1 and 4.2, its inputs and weights coming from elsewhere in the caches)
    std::vector<int64_t> split_key;
    int64_t split = chain_convs[0];
    if (two_lanes && split_switch.on()) {
      split_key.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(chains[0].weight(0).data)));
      for (int64_t b : apart) {
        split_key.insert(split_key.end(), xs[b].sizes().begin(), xs[b].sizes().end());
        split_key.push_back(convs[b]);
        split_key.push_back(tiles[b]);
      }
      split = lane_split(split_key, chain_convs[0], n == 2 ? 1 : 0);  // two branches: the first lane keeps a conv
    }
    // a chain whose tasks each take their U range by range (own_u) is never shared a task at a time
    const bool shared = share && !split_key.empty() && split < chain_convs[0] && !chains[0].runner().plan().own_u;
    const std::vector<std::vector<Segment>> lanes = branch_lanes(chain_convs, threads, split, shared);
    const int64_t nl = static_cast<int64_t>(lanes.size());
    std::vector<int64_t> first(nl + 1, 0);  // lane l's threads: [first[l], first[l + 1])
    for (int64_t l = 0; l < nl; ++l) first[l + 1] = first[l] + team[apart[lanes[l][0].chain]];
    std::vector<SubTeamBarrier> barriers(nl);
    for (int64_t l = 0; l < nl; ++l) barriers[l].n = static_cast<int>(first[l + 1] - first[l]);
    // each chain's convs done so far: a segment that starts past conv 0 waits for the ones before it
    std::vector<std::atomic<int64_t>> done(n);  // value-initialized: zeros
    std::atomic<bool> short_team{false};
    std::vector<double> elapsed(n, 0.0);  // where balanced: each chain's time from here to its last barrier, in us
    std::vector<double> lane_end(nl, 0.0), lane_waited(nl, 0.0), split_time(nl, 0.0);  // us; split_time: the first chain's share
    std::vector<double> at_tail(nl, 0.0);  // us: when each lane began the shared tail
    SharedTail tail(shared ? chain_convs[0] : 0);
    const auto t0 = std::chrono::steady_clock::now();
    auto since = [&t0] { return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count(); };
#pragma omp parallel num_threads(static_cast<int>(first[nl]))
    {
      const int64_t tid = omp_get_thread_num();
      if (omp_get_num_threads() != first[nl]) {
        // a smaller team than asked for (an OpenMP thread limit): one thread runs everything
        if (tid == 0) short_team.store(true);
      } else {
        const int64_t l = std::upper_bound(first.begin(), first.end(), tid) - first.begin() - 1;
        const int64_t local = tid - first[l], size = first[l + 1] - first[l];
        for (const Segment& seg : lanes[l]) {
          const WinogradChain& mine = chains[seg.chain];
          if (seg.begin > 0) {  // the other lane's share of this chain first
            const double ready = since();
            spin_until([&] { return done[seg.chain].load(std::memory_order_acquire) >= seg.begin; });
            if (local == 0) lane_waited[l] = since() - ready;
          }
          const double start = since();
          if (seg.shared) {  // a lane of one thread each (two_lanes): slot l
            at_tail[l] = start;
            run_shared(mine, tail, done[seg.chain], seg.begin, seg.end, l, since);
            continue;
          }
          const bool shared_u = mine.runner().shared_u();
          const int64_t tasks = mine.runner().tasks(), chunk = (tasks + size - 1) / size;
          const int64_t begin = std::min(tasks, local * chunk), end = std::min(tasks, begin + chunk);
          for (int64_t i = seg.begin; i < seg.end; ++i) {
            const float* u = nullptr;
            if (shared_u) {  // U transformed up front: the sub-team a share of its input channels each, then met
              u = mine.transform_u_part(i, local, size);
              barriers[l].wait();
            }
            if (begin < end) mine.run(i, local, begin, end, u);
            barriers[l].wait();
            if (local == 0) done[seg.chain].store(i + 1, std::memory_order_release);
          }
          if (local == 0) {
            if (seg.chain == 0) split_time[l] = since() - start;
            if (balanced && seg.end == chain_convs[seg.chain]) elapsed[seg.chain] = since();
          }
        }
        if (local == 0) lane_end[l] = since();
      }
    }
    if (short_team.load()) {
      for (const WinogradChain& c : chains)
        for (int64_t i = 0; i < c.convs(); ++i)
          c.run(i, 0, 0, c.runner().tasks(), c.runner().shared_u() ? c.transform_u_part(i, 0, 1) : nullptr);
    } else if (balanced) {
      record_branch_times(key, team, elapsed);
    } else if (!split_key.empty() && nl == 2) {
      // the split chain's time a conv, from the first lane's share, else from the second's (or the tail
      // both shared, from the first lane there)
      const double tail_convs = static_cast<double>(chain_convs[0] - split);
      const double joined = std::max(at_tail[0], at_tail[1]);
      const double per_conv = split > 0 ? split_time[0] / static_cast<double>(split)
                              : shared  ? (tail.end - std::min(at_tail[0], at_tail[1])) / tail_convs
                                        : split_time[1] / tail_convs;
      const double together = shared ? std::max(0.0, tail.end - joined) : -1.0;
      record_lane_times(split_key, split, chain_convs[0],
                        LaneTimes{lane_end[0], lane_end[1], per_conv, lane_waited[1], together}, n == 2 ? 1 : 0);
    }
    for (int64_t k = 0; k < n; ++k) out[apart[k]] = chains[k].result();
    chains.clear();
  }
  // the rest one after another, each on all the threads, one chain's buffers alive at a time (as winograd_blocks)
  for (int64_t b = 0; b < branches; ++b) {
    if (out[b].defined()) continue;
    WinogradChain c = chain(b, threads, 0);
    run_chain(c);
    out[b] = c.result();
  }
  return out;
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("winograd_branches", &hrnet_fast::winograd_branches_cpu); }

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // whether winograd_branches may run branches side by side on shares of the threads; `use` switches it
  m.def("winograd_branches_side_by_side(bool? use=None) -> bool", &hrnet_fast::winograd_branches_side_by_side);
  // whether branches on 2 threads run in two lanes (the last alone, then the first's rest; with the split
  // off only four small ones); `use` switches it
  m.def("winograd_branches_lanes(bool? use=None) -> bool", &hrnet_fast::winograd_branches_lanes);
  // whether those two lanes split the first branch between them, at a conv measured to balance them
  // (csrc/cpu/lane_split.h); `use` switches it
  m.def("winograd_branches_split(bool? use=None) -> bool", &hrnet_fast::winograd_branches_split);
  // whether the two lanes share the split chain's tail (share_switch)
  m.def("winograd_branches_share_tail(bool? use=None) -> bool", &hrnet_fast::winograd_branches_share_tail);
  // whether their threads are shared by their plans' modelled cost (else the direct convs' multiply-adds);
  // `use` switches it
  m.def("winograd_branches_model_split(bool? use=None) -> bool", &hrnet_fast::winograd_branches_model_split);
  // the threads each branch would run side by side on (0: after those, on all of them)
  m.def("winograd_branches_plan(int[][] x_sizes, int[] convs, int threads, int[]? tiles=None) -> int[]",
        &hrnet_fast::winograd_branches_plan);
}
