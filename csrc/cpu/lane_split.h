// Where winograd_branches splits one branch's chain between its two lanes on 2 threads, measured
// (csrc/cpu/lane_split.cpp).
//
// Why: in two lanes a branch is whole on one thread, and the lanes' times differ by what whole
// branches do. W32 at batch 1, one thread of an Intel Xeon, 8 convs a branch: 32 channels 1.24 ms,
// 64 1.09, 128 1.60, 256 3.00 (the 256-channel one's F(2x2) tiles and 2.4 MB weights a conv), so
// stage 4's lanes {256} and {32, 64, 128} took 3.00 and 3.93 ms alone; in stage 3, where the 32- and
// 64-channel branches ran side by side and the 128-channel one after them on both threads (1.61x
// faster than on one, a conv's split costing its sync), 1.24 + 1.00. With the first branch's chain
// split at conv k, its convs [0, k) first in the first lane and [k, n) last in the second (after
// its own branch), the lanes can be balanced to within one conv of that branch. Its best k depends
// on the machine and on where in the model the module is (in the forward, caches colder, stage 4's
// lanes took 4.1-4.7 and 4.0-4.6 ms, stage 3's settled at conv 6), so each call's lane times move
// the k of its module (keyed by its first weight) a conv at a time. Measured gains: csrc/cpu/winograd_branches.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hrnet_fast {

// The conv at which the first branch's chain (`convs` convs) is split now, for branches of this key:
// `convs` (none on the second lane) the first time, or the split forced by
// winograd_branches_split_at; at least `lowest` (1 where the first lane has nothing else to run).
int64_t lane_split(const std::vector<int64_t>& key, int64_t convs, int64_t lowest = 0);

// One run's lane times, all in the same unit: when each lane ended, the split chain's time a conv, how
// long the second lane waited for the first's share of that chain, and, where the two lanes shared the
// chain's tail [k, n) (winograd_branches_share_tail), how long they ran it together (else negative).
struct LaneTimes {
  double first_end, second_end, per_conv, waited, together = -1.0;
};

// One run with split k: moves k by one, never below `lowest`. Unshared, toward equal lanes where the
// later lane is more than a conv behind. Shared, the lanes end together wherever both reach the tail
// before it is done, so k moves only down where the second lane waited for the first's share or the
// first lane came after the tail was done, and up where they ran more than two convs of it together
// (the tail's convs split between two threads' caches).
void record_lane_times(const std::vector<int64_t>& key, int64_t k, int64_t convs, const LaneTimes& t,
                       int64_t lowest = 0);

}  // namespace hrnet_fast
