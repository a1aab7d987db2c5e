// How winograd_branches shares the threads between branches side by side: first in proportion to their
// multiply-adds, then by what each branch's sub-team took (csrc/cpu/branch_balance.cpp).
//
// Why measured: equal multiply-adds are not equal time. One thread of this project's Xeon, W32's
// branches of 8 convs (each conv 28 M multiply-adds at batch 1): 32 channels 1.36 ms, 64 1.20,
// 128 1.64, 256 3.70 at batch 1; 9.7, 7.6, 8.8 and 16.2 ms at batch 8 (the 256-channel branch's
// 8x6 maps make F(2x2) tiles, 1.78x the GEMM work of F(4x4), and at batch 1 its 2.4 MB weight is
// read for 12 tiles). Split 4 + 4 + 4 + 4 by multiply-adds on 16 threads, stage 4 waits for that
// branch, about twice the others. Its cost differs between CPUs (caches, bandwidth), so it is
// measured on the machine: no model of it to keep true.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hrnet_fast {

// threads split between branches by `work` (at least one each): the split whose slowest branch, taking
// work / threads, is fastest
std::vector<int64_t> split_team(int64_t threads, const std::vector<double>& work);

// The search for one set of branches (a key: their shapes and the thread count). Each split is run
// kSamples times; from each run's per-branch times the next split shares the threads by the
// thread-time each branch took (elapsed x its threads), whose fixed point gives the branches equal
// times. It stops where a split comes back or after kMaxSplits, keeping the fastest split run
// (the median of its runs' slowest branch), so it ends no slower than where it started.
class BranchBalance {
 public:
  static constexpr int kSamples = 2;
  static constexpr int kMaxSplits = 4;

  BranchBalance(int64_t threads, std::vector<int64_t> start);
  // the split to run now (the settled one once settled)
  const std::vector<int64_t>& current() const { return current_; }
  bool settled() const { return settled_; }
  // one run of current(): each branch's elapsed time (any unit)
  void record(const std::vector<double>& elapsed);
  // "a,b,c (makespan) -> ..." of the splits tried, for logs
  std::string describe() const;

 private:
  int64_t threads_;
  std::vector<int64_t> current_;
  std::vector<std::vector<double>> samples_;
  std::vector<std::pair<std::vector<int64_t>, double>> tried_;  // split, median makespan
  bool settled_ = false;
};

// The split winograd_branches runs now for branches of this key (their shapes, convs, tiles and the
// thread count), `start` (the multiply-add split) the first time; and a run's times of it, recorded.
std::vector<int64_t> balanced_teams(const std::vector<int64_t>& key, int64_t threads, const std::vector<int64_t>& start);
void record_branch_times(const std::vector<int64_t>& key, const std::vector<int64_t>& teams,
                         const std::vector<double>& elapsed);

}  // namespace hrnet_fast
