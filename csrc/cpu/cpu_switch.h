// A process-wide on/off setting of a CPU kernel's choice (on unless constructed off), read on every
// call and flipped by an op of its own, so that the two ways can be compared forward by forward in one
// process: the Winograd split's filling of the team (conv3x3_winograd_fill_team) and its block of tiles
// a thread (conv3x3_winograd_own_panels), its GEMMs' four panels a call (conv3x3_winograd_four_panels),
// branches side by side (winograd_branches_side_by_side), their split by the plans' model
// (winograd_branches_model_split) or measured (winograd_branches_balance) and four in two lanes on 2
// threads (winograd_branches_lanes).
#pragma once

#include <atomic>
#include <optional>

namespace hrnet_fast {

class CpuSwitch {
 public:
  explicit CpuSwitch(bool on = true) : on_(on) {}
  bool on() const { return on_.load(std::memory_order_relaxed); }
  // the op: `use` sets it; returns the setting now
  bool set(std::optional<bool> use) {
    if (use.has_value()) on_.store(*use);
    return on_.load();
  }

 private:
  std::atomic<bool> on_;
};

}  // namespace hrnet_fast
