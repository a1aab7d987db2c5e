// How winograd_branches shares the threads between branches side by side: first by their plans'
// modelled cost (csrc/cpu/branch_split.h), then, switched on, by what each branch's sub-team took
// (csrc/cpu/branch_balance.cpp).
//
// Why measured: equal multiply-adds are not equal time. One thread of this project's Xeon, W32's
// branches of 8 convs (each conv 28 M direct multiply-adds at batch 1): 32 channels 1.36 ms, 64 1.20,
// 128 1.64, 256 3.70 at batch 1; 9.7, 7.6, 8.8 and 16.2 ms at batch 8. The GEMMs' multiply-adds
// account for part of it (the 256-channel branch's 8x6 maps make F(2x2) tiles at batch 1, 1.78x the
// GEMM work of F(4x4)), not for the rest (at batch 1 its 2.4 MB weight is read for 12 tiles; 3.1x the
// 64-channel branch's time there, 2.5x on the AMD EPYC). Its cost differs between CPUs (caches,
// bandwidth), so it is measured on the machine: no model of it to keep true.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hrnet_fast {

// threads split between branches by `work` (at least one each): the split whose slowest branch, taking
// work / threads, is fastest
std::vector<int64_t> split_team(int64_t threads, const std::vector<double>& work);

// The search for one set of branches (a key: their shapes and the thread count). The split in use (the
// base, first the multiply-adds' one) runs kSamples times; from its runs' per-branch times a candidate
// shares the threads by the thread-time each branch took (elapsed x its threads), whose fixed point
// gives the branches equal times. Then base and candidate take turns for kPairs pairs of calls, and the
// candidate becomes the base only where it was faster in all but one pair and by kAccept in the median
// pair, so a split that only looked faster (16 cores: one forward's times move 5-10%) is not kept:
// the search ends no slower than it starts. It goes on from an accepted candidate's times, kMaxRounds
// candidates at most, and settles where a candidate is refused or comes back.
class BranchBalance {
 public:
  static constexpr int kSamples = 2;
  static constexpr int kPairs = 4;
  static constexpr int kMaxRounds = 3;
  static constexpr double kAccept = 0.97;

  BranchBalance(int64_t threads, std::vector<int64_t> start);
  // the split to run now: the base, or the candidate on its turn (the settled base once settled)
  const std::vector<int64_t>& current() const { return cand_turn_ ? cand_ : base_; }
  bool settled() const { return settled_; }
  // one run of current(): each branch's elapsed time (any unit)
  void record(const std::vector<double>& elapsed);
  // "base -> candidate (median time ratio, kept or not) -> ...; settled on ...", for logs
  std::string describe() const;

 private:
  std::vector<int64_t> next_candidate(const std::vector<std::vector<double>>& runs, const std::vector<int64_t>& split) const;
  void settle() {
    settled_ = true;
    cand_turn_ = false;
  }

  int64_t threads_;
  std::vector<int64_t> base_, cand_;
  bool cand_turn_ = false, settled_ = false;
  int rounds_ = 0;
  std::vector<std::vector<double>> base_runs_, cand_runs_;  // per run, each branch's time
  std::vector<std::string> log_;
};

// The split winograd_branches runs now for branches of this key (their shapes, convs, tiles and the
// thread count), `start` (the multiply-add split) the first time; and a run's times of it, recorded.
std::vector<int64_t> balanced_teams(const std::vector<int64_t>& key, int64_t threads, const std::vector<int64_t>& start);
void record_branch_times(const std::vector<int64_t>& key, const std::vector<int64_t>& teams,
                         const std::vector<double>& elapsed);

}  // namespace hrnet_fast
