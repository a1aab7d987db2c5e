// What a CPU graph's replay (csrc/cpu/cpu_graph.cpp) uses of the cpu backend's caching allocator
// (csrc/cpu/cpu_arena.cpp): a memory plan per recorded graph.
#pragma once

#include <memory>

namespace hrnet_fast {

// One recorded graph's memory plan: its replays' blocks laid out in one buffer (a slab) by when each is
// alive, learned from a replay and used by the ones after it. Opaque; shared by the graph and its slabs.
struct ReplayPlan;
std::shared_ptr<ReplayPlan> make_replay_plan();

// While alive on a thread that replays a graph with the arena installed (inside an optimized model's
// forward), that thread's allocations the arena caches are numbered: the first such replay of a plan
// learns them, later ones are served from a slab of their own at the planned offsets (any request that
// does not match the plan is served as before).
class ReplayScope {
 public:
  explicit ReplayScope(const std::shared_ptr<ReplayPlan>& plan);
  ~ReplayScope();
  ReplayScope(const ReplayScope&) = delete;
  ReplayScope& operator=(const ReplayScope&) = delete;

 private:
  bool active_ = false;
};

}  // namespace hrnet_fast
