// How winograd_branches shares the threads between branches side by side, before any measuring
// (csrc/cpu/branch_split.cpp; the measured split that may follow: csrc/cpu/branch_balance.h).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/winograd_isa.h"

namespace hrnet_fast {

// One branch: its convs' geometry, tile (m) and how many convs it chains.
struct BranchShape {
  WinogradGeometry g;
  int m;
  int64_t convs;
  // multiply-adds of one of its convs done directly
  double direct_macs() const { return static_cast<double>(g.n) * g.cin * g.cout * g.h * g.w * 9; }
};

// `threads` split between the branches (at least one each) so that the slowest, each branch's convs
// modelled on its share by winograd_plan_cost, ends soonest; remembered by shape and thread count.
std::vector<int64_t> model_split(const std::vector<BranchShape>& branches, int64_t threads);

}  // namespace hrnet_fast
