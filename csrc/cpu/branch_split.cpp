// model_split (csrc/cpu/branch_split.h): the threads' split between branches side by side that the
// plans' cost model (winograd_plan_cost) says ends soonest.
//
// Why: shared by multiply-adds alone (split_team), W32's branches got 4 + 4 + 4 + 4 of 16 threads and
// its three-branch modules 6 + 5 + 5; but a branch's convs are not worth their multiply-adds (its
// 256-channel 8x6 one runs F(2x2) at batch 1, 1.78x the GEMM work of the others), and a team of 5, 6
// or 7 threads often gets no more from a conv's plan than one of 4 (csrc/cpu/winograd_cost.cpp).
// Each branch's time on t threads modelled for every t, the least time of the slowest branch is
// found exactly by dynamic programming over the branches and the threads given so far, then, of the
// splits that reach it, the one with the least time in all; unless the split by multiply-adds is
// modelled within 5% of it. Against each thread's share timed on one core
// (conv3x3_winograd_thread_times; benchmarks/bench_branch_split.py, AMD EPYC; a split's time: its
// slowest branch's), W32's modules of 2, 3 and 4 branches at batch 1 and 8 on 8 to 32 threads: the
// split differs from the multiply-add one in 9 of 30 cases, 1.18-1.86x faster in 8 (four branches at
// batch 1 on 16 threads, 3 + 4 + 3 + 6: 1.27x), 0.96x in one (two at batch 8 on 24, within that
// machine's noise: 0.79-1.34x from one set of times to the next).
#include "cpu/branch_split.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

#include "cpu/branch_balance.h"
#include "cpu/cpu_isa.h"
#include "cpu/winograd_driver.h"

namespace hrnet_fast {
namespace {

// Where the split by multiply-adds is modelled within this much of the best, it is kept: the model is
// rough (~10%). Without it, the model's best for W32's two branches at batch 8, 7 + 5 of 12 threads and
// 17 + 15 of 32 (modelled 1.6% and 0.2% faster than 6 + 6 and 16 + 16), ran 0.87x and 0.93x as fast
// on each thread's share timed on one core.
constexpr double kKeepWithin = 1.05;

std::vector<int64_t> solve(const std::vector<BranchShape>& branches, int64_t threads) {
  const int64_t nb = static_cast<int64_t>(branches.size());
  const int panels = winograd_kernels(active_cpu_isa()).gemm_panels;
  // cost[b][t]: branch b's convs on t threads
  std::vector<std::vector<double>> cost(nb, std::vector<double>(threads + 1, 0.0));
  std::vector<double> macs(nb);
  for (int64_t b = 0; b < nb; ++b) {
    const BranchShape& s = branches[b];
    macs[b] = s.direct_macs() * static_cast<double>(s.convs);
    for (int64_t t = 1; t <= threads; ++t)
      cost[b][t] = static_cast<double>(s.convs) * winograd_plan_cost(s.g, s.m, t, panels);
  }
  auto slowest = [&](const std::vector<int64_t>& team) {
    double most = 0.0;
    for (int64_t b = 0; b < nb; ++b) most = std::max(most, cost[b][team[b]]);
    return most;
  };
  // First the least time of the slowest branch: least[b][n], of branches 0..b on n threads in all.
  constexpr double kNever = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> least(nb, std::vector<double>(threads + 1, kNever));
  for (int64_t n = 1; n <= threads; ++n) least[0][n] = cost[0][n];
  for (int64_t b = 1; b < nb; ++b)
    for (int64_t n = b + 1; n <= threads; ++n)
      for (int64_t t = 1; t <= n - b; ++t)
        least[b][n] = std::min(least[b][n], std::max(least[b - 1][n - t], cost[b][t]));
  const double bound = least[nb - 1][threads];
  const std::vector<int64_t> by_macs = split_team(threads, macs);
  if (slowest(by_macs) <= kKeepWithin * bound) return by_macs;
  // Then, of the splits where no branch takes longer, the one with the least time in all (the others'
  // threads where they do the most good): sum[b][n] and branch b's share there, pick[b][n].
  std::vector<std::vector<double>> sum(nb, std::vector<double>(threads + 1, kNever));
  std::vector<std::vector<int64_t>> pick(nb, std::vector<int64_t>(threads + 1, 0));
  for (int64_t n = 1; n <= threads; ++n)
    if (cost[0][n] <= bound) {
      sum[0][n] = cost[0][n];
      pick[0][n] = n;
    }
  for (int64_t b = 1; b < nb; ++b)
    for (int64_t n = b + 1; n <= threads; ++n)
      for (int64_t t = 1; t <= n - b; ++t)
        if (cost[b][t] <= bound && sum[b - 1][n - t] + cost[b][t] < sum[b][n]) {
          sum[b][n] = sum[b - 1][n - t] + cost[b][t];
          pick[b][n] = t;
        }
  std::vector<int64_t> team(nb);
  for (int64_t b = nb - 1, n = threads; b >= 0; --b) {
    team[b] = pick[b][n];
    n -= team[b];
  }
  return team;
}

}  // namespace

// Splits model_split remembers at most (a model's modules, input sizes and thread counts: a few dozen).
constexpr size_t kMaxKnownSplits = 4096;

std::vector<int64_t> model_split(const std::vector<BranchShape>& branches, int64_t threads) {
  // the plans depend on the shapes, the thread counts, the CPU's kernels and the plan's switches
  std::vector<int64_t> key = {threads, static_cast<int64_t>(active_cpu_isa()), winograd_plan_switches()};
  for (const BranchShape& s : branches)
    key.insert(key.end(), {s.g.n, s.g.h, s.g.w, s.g.cin, s.g.cout, s.m, s.convs});
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::vector<int64_t>> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(key);
  if (it == known.end()) {
    // a server fed images of ever new sizes would otherwise keep a split per size forever; a split is
    // solved again in microseconds, so past the bound all are forgotten at once
    if (known.size() >= kMaxKnownSplits) known.clear();
    it = known.emplace(key, solve(branches, threads)).first;
  }
  return it->second;
}

}  // namespace hrnet_fast
