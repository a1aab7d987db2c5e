// cpu_arena: a caching CPU allocator that the cpu backend's optimized models install around each
// forward (hrnet_fast/convert.py, _ForwardScope), so one forward's large activations reuse the blocks
// the last one freed instead of going back to glibc.
//
// Why: glibc serves blocks past its mmap threshold with fresh mappings and trims the top of its heap
// when much is free, so a forward whose tensors are megabytes each (batch 8: 3 to 25 MB) has its
// pages unmapped after use and faulted in, zeroed by the kernel, on the next call: W32 at batch 8 took
// 13,000-16,000 page faults and ~30 ms of system time a forward. ONNX Runtime's arena and Static
// Runtime's caching allocator (torch's own, c10::SetCPUCachingAllocator) exist for the same reason.
//
// What: blocks of at least kMinCached bytes, rounded up to whole pages, are kept on release in a
// free list by size and handed out again for a request they fit best; smaller ones go to the allocator that
// was installed before (glibc's bins serve them without system calls). The arena is installed (as
// torch's CPU allocator) only while an optimized model's forward runs: a block it handed out keeps
// its deleter, so one freed later, anywhere, still comes back here. Allocations are reported to
// torch's memory profiler as the default allocator's are. Free blocks are held until
// cpu_arena_release(), never more of them than the most ever in use at once, nor past kMaxCached: a
// block freed when they are full takes the place of those that have waited longest (a block larger
// than the whole budget is freed at once). Built for glibc (Linux); elsewhere never installed.
//
// Replays (cpu_arena.h): a CPU graph's replay makes the same requests in the same order every time, so
// its blocks are laid out once in one buffer, a slab, at offsets by when each is alive (greedy by size),
// and each later replay is served from a slab of its own. Why: the free blocks' budget above is the
// most ever in use at once, which is the Python forwards' that recorded the graph (they hold more at
// once than its replays), and the blocks kept by best fit serve the replays with room to spare: W32 at
// batch 1 / batch 8 / HRNetV2-W48 at 512x1024 kept 12.3 / 82.1 / 313.3 MiB of free blocks for replays
// that peak at 8.4 / 43.5 / 226.1 (thirtieth session; best fit from no free blocks settled at 13.8 /
// 70.2 / 262.6, whole blocks by exact size would be 16.2 / 81.2 / 369.3). With the plan: 45.2 MiB at
// batch 8 and 221.2 for the segmentation model, and W32's forward as fast (in turns in one process on
// 2 threads: batch 1 0.97-1.03x, batch 8 1.01x). The free blocks are released once a plan is learned,
// and the free slabs are shared: one, the largest, where replays run one at a time, whatever their
// shapes. A request the plan does not foresee (its size or number differs: the thread count changed,
// say), or whose bytes another block still alive overlaps, is served as before, and the plan is
// learned again (kMaxRelearn times at most).
#include "cpu/cpu_arena.h"
#include "cpu/cpu_switch.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>

#include <algorithm>
#include <exception>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace hrnet_fast {

// A recorded graph's memory plan (csrc/cpu/cpu_arena.h), guarded by the arena's mutex. Request k is the
// replaying thread's k-th allocation of kMinCached bytes or more.
struct ReplayPlan {
  enum State { kLearn, kLearning, kPlanned, kGivenUp };
  State state = kLearn;
  int relearned = 0;
  std::vector<size_t> size;      // request k's block, in bytes (whole pages)
  std::vector<int64_t> offset;   // its place in a slab; -1: served as before (it outlived the replay)
  std::vector<std::vector<int32_t>> before;  // the earlier requests whose bytes overlap k's
  size_t slab_bytes = 0;
  // while learning: each request's allocation and free, as events in order (-1: not freed yet)
  std::vector<int64_t> alloc_at, free_at;
  int64_t events = 0;
};

namespace {

// One replay's slab, while it runs or any block served from it is alive.
struct SlabUse {
  std::shared_ptr<ReplayPlan> plan;
  void* slab = nullptr;
  size_t bytes = 0;
  std::vector<char> live;  // per request: served from the slab and not freed yet
  int64_t live_count = 0;
  bool ended = false;
};

// The replay running on this thread (ReplayScope), if any.
struct ReplayState {
  std::shared_ptr<ReplayPlan> plan;
  std::shared_ptr<SlabUse> use;  // a planned replay's
  bool learning = false, diverged = false;
  int64_t next = 0;
};
thread_local ReplayState* t_replay = nullptr;

// Whether replays use their memory plans (on by default; off for comparing in one process: then every
// block is served as before).
CpuSwitch plans_switch;

// The most a plan may be learned again after replays that did not match it (the thread count changed
// between calls, say) before it is given up.
constexpr int kMaxRelearn = 3;

// The usable size of a block from c10::alloc_cpu, where the C library tells it (glibc): the check that
// keeps a stale entry safe (Arena::take_back). Elsewhere the arena is never installed.
#if defined(__GLIBC__)
constexpr bool kSupported = true;
size_t usable_size(void* p) { return malloc_usable_size(p); }
#else
constexpr bool kSupported = false;
size_t usable_size(void*) { return 0; }
#endif

constexpr size_t kMinCached = 256 << 10;
constexpr size_t kPage = 4096;
constexpr size_t kMaxCached = size_t(1) << 30;

void release(void* p);

class Arena final : public c10::Allocator {
 public:
  // Every block's context is its data pointer, as ideep's raw_allocate/raw_deallocate (oneDNN's
  // temporaries and packed weights) require of torch's CPU allocator.
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached) return base()->allocate(n);
    size_t size = (n + kPage - 1) / kPage * kPage;
    ReplayState* r = t_replay;
    int64_t k = -1;
    if (r != nullptr) {
      k = r->next++;
      if (void* p = replay_block(*r, k, size)) {
        c10::profiledCPUMemoryReporter().New(p, size);
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
    void* p = take_cached(size);  // may be larger: size becomes the block's
    if (p == nullptr) p = c10::alloc_cpu(size);  // torch's own: aligned, and torch's error when out of memory
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_[p] = size;
      in_use_ += size;
      peak_in_use_ = std::max(peak_in_use_, in_use_);
      if (r != nullptr && r->learning) learning_[p] = {r->plan, k};
    }
    c10::profiledCPUMemoryReporter().New(p, size);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Takes back one of its blocks, or hands a block it did not allocate (a small one, or one the
  // allocator before it made, freed by ideep through whichever allocator is installed) to that one.
  void take_back(void* p) {
    bool mine = false, keep = false;
    std::vector<void*> evicted;
    // released past the lock: the last references to a slab's use and to a plan may go with them
    std::shared_ptr<SlabUse> use;
    std::shared_ptr<ReplayPlan> plan;
    void* slab_freed = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (auto s = slab_blocks_.find(p); s != slab_blocks_.end()) {  // a block of a replay's slab
        use = std::move(s->second.first);
        const int32_t k = s->second.second;
        slab_blocks_.erase(s);
        use->live[k] = 0;
        --use->live_count;
        c10::profiledCPUMemoryReporter().Delete(p);
        if (use->ended && use->live_count == 0) slab_freed = return_slab(*use);
      }
    }
    if (use != nullptr) {
      if (slab_freed != nullptr) c10::free_cpu(slab_freed);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (auto l = learning_.find(p); l != learning_.end()) {  // freed during (or after) a learning replay
        plan = std::move(l->second.first);
        const int64_t k = l->second.second;
        if (plan->state == ReplayPlan::kLearning && k < static_cast<int64_t>(plan->free_at.size()))
          plan->free_at[k] = plan->events++;
        learning_.erase(l);
      }
      auto it = live_.find(p);
      if (it != live_.end()) {
        const size_t size = it->second;
        live_.erase(it);
        in_use_ -= size;
        // A block of ours that ideep freed through the default allocator while we were not installed
        // leaves its entry behind, and the address may since belong to another block: take that one
        // only if it really is as large (then caching it is as safe as caching our own).
        mine = usable_size(p) >= size;
        if (mine) {
          c10::profiledCPUMemoryReporter().Delete(p);
          // Never more in blocks than the most ever in use at once: the blocks of every size at its
          // own busiest moment would add up to more than the forward's peak (HRNetV2-W48 at 512x1024,
          // cached by exact size: 396 MiB held against a 227 MiB peak). Room is made by freeing
          // the blocks that have waited longest: sizes the forward no longer asks for (the first
          // forward's, whose oneDNN weight packing allocates what later ones never do) would
          // otherwise fill the budget for good, and every later forward would fault its activations
          // in afresh (W32 at batch 8: ~8,000 page faults a forward, 11-26 ms of system time).
          const size_t limit = std::min(peak_in_use_ - in_use_, kMaxCached);  // in_use_ <= peak_in_use_ always
          keep = size <= limit;
          while (keep && cached_ + size > limit) {
            // Its entry by size goes first, found by the list position itself: once the list node is
            // popped, that entry's iterator dangles (reading through it was a use after free).
            const auto oldest = lru_.begin();
            auto range = free_.equal_range(oldest->size);
            auto f = std::find_if(range.first, range.second, [&](const auto& e) { return e.second == oldest; });
            TORCH_INTERNAL_ASSERT(f != range.second, "cpu_arena: a free block missing from the size index");
            free_.erase(f);
            cached_ -= oldest->size;
            evicted.push_back(oldest->p);
            lru_.pop_front();
          }
          if (keep) {
            lru_.push_back({p, size});
            free_.emplace(size, std::prev(lru_.end()));
            cached_ += size;
          }
        }
      }
    }
    for (void* q : evicted) c10::free_cpu(q);
    if (!mine) {
      base()->raw_deleter()(p);
    } else if (!keep) {
      c10::free_cpu(p);
    }
  }

  // Install (enter) or uninstall (leave) as torch's CPU allocator; nested and concurrent forwards count.
  void scope(bool enter) {
    if (!kSupported) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (enter) {
      if (depth_++ == 0) {
        previous_ = c10::GetCPUAllocator();
        // Priority 0 is the default allocator's: where something installed its own at a higher
        // priority this does nothing, and the forward runs with that one.
        if (previous_ != this) c10::SetCPUAllocator(this, 0);
      }
    } else if (depth_ > 0 && --depth_ == 0) {
      if (c10::GetCPUAllocator() == this && previous_ != this) c10::SetCPUAllocator(previous_, 0);
    }
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_ + slab_free_bytes_);
  }

  int64_t misses() {
    std::lock_guard<std::mutex> lock(mutex_);
    return misses_;
  }

  bool installed() const { return c10::GetCPUAllocator() == this; }

  // Frees every free block; returns the bytes freed.
  int64_t release_all() {
    std::vector<void*> blocks;
    size_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed = cached_ + slab_free_bytes_;
      take_free_blocks(blocks);
      for (const auto& [bytes, slab] : free_slabs_) blocks.push_back(slab);
      free_slabs_.clear();
      slab_free_bytes_ = 0;
      most_slabs_in_use_ = slabs_in_use_;
    }
    for (void* p : blocks) c10::free_cpu(p);
    return static_cast<int64_t>(freed);
  }

  // ReplayScope's start on this thread: learn the plan, use it (a slab checked out), or neither.
  bool replay_begin(ReplayState& r, const std::shared_ptr<ReplayPlan>& plan) {
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (plan->state == ReplayPlan::kLearn) {
        plan->state = ReplayPlan::kLearning;
        plan->size.clear();
        plan->alloc_at.clear();
        plan->free_at.clear();
        plan->events = 0;
        r.learning = true;
      } else if (plan->state == ReplayPlan::kPlanned) {
        r.use = std::make_shared<SlabUse>();
        r.use->plan = plan;
        r.use->bytes = bytes = plan->slab_bytes;
        r.use->live.assign(plan->size.size(), 0);
        // the smallest free slab that holds the plan (a larger one serves as well: another shape's)
        if (auto it = free_slabs_.lower_bound(bytes); it != free_slabs_.end()) {
          r.use->bytes = it->first;
          r.use->slab = it->second;
          slab_free_bytes_ -= it->first;
          free_slabs_.erase(it);
        }
        most_slabs_in_use_ = std::max(most_slabs_in_use_, ++slabs_in_use_);
      } else {
        return false;  // another thread learns it, or it was given up
      }
    }
    r.plan = plan;
    if (r.use != nullptr && r.use->slab == nullptr) {  // none free: a new one, counted as a block allocated anew
      r.use->slab = c10::alloc_cpu(bytes);
      std::lock_guard<std::mutex> lock(mutex_);
      ++misses_;
    }
    return true;
  }

  // ReplayScope's end: a learning replay's plan laid out; a planned replay's slab returned once its
  // blocks are all freed, and its plan learned again where the replay did not match it.
  void replay_end(ReplayState& r, bool failed) {
    std::vector<void*> to_free;
    std::vector<std::shared_ptr<ReplayPlan>> dropped;  // released past the lock
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ReplayPlan& plan = *r.plan;
      if (r.learning) {
        // blocks of this replay still alive (its outputs) outlived it: not the plan's any more
        for (auto it = learning_.begin(); it != learning_.end();) {
          if (it->second.first == r.plan) {
            dropped.push_back(std::move(it->second.first));
            it = learning_.erase(it);
          } else {
            ++it;
          }
        }
        if (failed) {
          plan.state = ReplayPlan::kLearn;  // an exception cut the replay short: learn from the next
        } else {
          lay_out(plan);
          plan.state = plan.slab_bytes > 0 ? ReplayPlan::kPlanned : ReplayPlan::kGivenUp;
          // Free blocks the forwards before the plan left behind (the Python forwards that recorded the
          // graph hold more at once than its replays): what is served as before from now on is re-cached.
          take_free_blocks(to_free);
          peak_in_use_ = in_use_;
        }
      } else {
        SlabUse& use = *r.use;
        use.ended = true;
        if (use.live_count == 0) {
          if (void* q = return_slab(use)) to_free.push_back(q);
        }
        if (r.diverged && plan.state == ReplayPlan::kPlanned)
          plan.state = ++plan.relearned > kMaxRelearn ? ReplayPlan::kGivenUp : ReplayPlan::kLearn;
      }
    }
    for (void* q : to_free) c10::free_cpu(q);
  }

 private:
  // Every free block off the free list, into `blocks` (to free outside the lock); the mutex held.
  void take_free_blocks(std::vector<void*>& blocks) {
    for (const Block& b : lru_) blocks.push_back(b.p);
    free_.clear();
    lru_.clear();
    cached_ = 0;
  }

  // Request k of a planned replay from its slab, or null (learning; past or unlike the plan; outlived
  // the replay when learned; a block its bytes overlap not freed yet: then served as before).
  void* replay_block(ReplayState& r, int64_t k, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (r.learning) {
      ReplayPlan& plan = *r.plan;
      plan.size.push_back(size);
      plan.alloc_at.push_back(plan.events++);
      plan.free_at.push_back(-1);
      return nullptr;
    }
    if (r.use == nullptr) return nullptr;
    const ReplayPlan& plan = *r.plan;
    if (k >= static_cast<int64_t>(plan.size.size()) || plan.size[k] != size) {
      r.diverged = true;
      return nullptr;
    }
    if (plan.offset[k] < 0) return nullptr;
    SlabUse& use = *r.use;
    for (int32_t j : plan.before[k]) {
      if (use.live[j]) {
        r.diverged = true;
        return nullptr;
      }
    }
    use.live[k] = 1;
    ++use.live_count;
    void* p = static_cast<char*>(use.slab) + plan.offset[k];
    slab_blocks_[p] = {r.use, static_cast<int32_t>(k)};
    return p;
  }

  // A slab whose replay ended and whose blocks are all freed, back to the free slabs, which keep no more
  // than the most ever in use at once (one where replays run one at a time, whatever their shapes): the
  // smallest goes first. Returns the one to free (outside the lock), or null.
  void* return_slab(SlabUse& use) {
    void* slab = std::exchange(use.slab, nullptr);
    if (slab == nullptr) return nullptr;
    --slabs_in_use_;
    free_slabs_.emplace(use.bytes, slab);
    slab_free_bytes_ += use.bytes;
    if (static_cast<int64_t>(free_slabs_.size()) <= most_slabs_in_use_) return nullptr;
    const auto smallest = free_slabs_.begin();
    slab = smallest->second;
    slab_free_bytes_ -= smallest->first;
    free_slabs_.erase(smallest);
    return slab;
  }

  // Each request freed within the learning replay gets the lowest offset where its bytes overlap no
  // request alive at the same time that was placed before it, the largest placed first (greedy by
  // size, as TFLite's and ONNX Runtime's static planners); one that outlived the replay (an output) is
  // left to the free blocks.
  static void lay_out(ReplayPlan& plan) {
    const int64_t n = static_cast<int64_t>(plan.size.size());
    plan.offset.assign(n, -1);
    plan.before.assign(n, {});
    std::vector<int32_t> order;
    for (int64_t k = 0; k < n; ++k)
      if (plan.free_at[k] >= 0) order.push_back(static_cast<int32_t>(k));
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return plan.size[a] > plan.size[b]; });
    const auto together = [&](int32_t a, int32_t b) {
      return plan.alloc_at[a] < plan.free_at[b] && plan.alloc_at[b] < plan.free_at[a];
    };
    std::vector<int32_t> placed;
    std::vector<std::pair<int64_t, int64_t>> taken;
    size_t end = 0;
    for (int32_t k : order) {
      taken.clear();
      for (int32_t j : placed)
        if (together(j, k)) taken.push_back({plan.offset[j], plan.offset[j] + static_cast<int64_t>(plan.size[j])});
      std::sort(taken.begin(), taken.end());
      int64_t off = 0;
      for (const auto& [a, b] : taken) {
        if (off + static_cast<int64_t>(plan.size[k]) <= a) break;
        off = std::max(off, b);
      }
      plan.offset[k] = off;
      placed.push_back(k);
      end = std::max(end, static_cast<size_t>(off) + plan.size[k]);
    }
    for (int32_t k : order)
      for (int32_t j : order)
        if (j < k && plan.offset[j] < plan.offset[k] + static_cast<int64_t>(plan.size[k]) &&
            plan.offset[k] < plan.offset[j] + static_cast<int64_t>(plan.size[j]))
          plan.before[k].push_back(j);
    plan.slab_bytes = end;
  }

  // The allocator that was installed before (raw deallocations it owns go back to it).
  c10::Allocator* base() const {
    return previous_ != nullptr && previous_ != this ? previous_ : c10::GetDefaultCPUAllocator();
  }

  // The smallest free block of at least `size` bytes, taken off the free list, its size into `size`;
  // null when there is none.
  //
  // Best fit rather than the exact size: a forward asks for the same sizes in the same order every
  // time, but blocks held by exact size each wait for a request of their own size, and within the
  // budget above those of every size cannot all wait: W32 at batch 8 on 2 threads allocated 54 blocks
  // anew every forward (165 MiB), at batch 1 26 (34 MiB), on 16 threads 20-68; whether those became
  // page faults was up to glibc's heap (0, 2,000 or 7,500 a forward at batch 8 from one process to the
  // next, 6,777 at batch 1 on 16 threads: ~1 us each). Any larger free block serving a request, the
  // same traces replayed settle within a few forwards to none allocated anew, holding about as much
  // (HRNetV2-W48 at 512x1024: 250 MiB against 320 by exact size; W32 at batch 1 14 against 10).
  void* take_cached(size_t& size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it == free_.end()) {
      ++misses_;
      return nullptr;
    }
    void* p = it->second->p;
    size = it->first;
    lru_.erase(it->second);
    free_.erase(it);
    cached_ -= size;
    return p;
  }

  struct Block {
    void* p;
    size_t size;
  };
  std::mutex mutex_;
  std::list<Block> lru_;  // the free blocks, longest waiting first
  std::multimap<size_t, std::list<Block>::iterator> free_;  // the same, by size
  std::unordered_map<void*, size_t> live_;
  size_t cached_ = 0;
  size_t in_use_ = 0, peak_in_use_ = 0;  // bytes of its blocks handed out now, and at most
  int64_t misses_ = 0;  // blocks it had no free one of the size for (so allocated anew)
  // replays' memory plans (cpu_arena.h): blocks served from slabs, blocks of learning replays, free slabs' bytes
  std::unordered_map<void*, std::pair<std::shared_ptr<SlabUse>, int32_t>> slab_blocks_;
  std::unordered_map<void*, std::pair<std::shared_ptr<ReplayPlan>, int64_t>> learning_;
  std::multimap<size_t, void*> free_slabs_;  // by bytes
  size_t slab_free_bytes_ = 0;
  int64_t slabs_in_use_ = 0, most_slabs_in_use_ = 0;
  int depth_ = 0;
  c10::Allocator* previous_ = nullptr;
};

// Never destroyed: blocks it handed out may be freed at any time, process exit included.
Arena& arena() {
  static Arena* const a = new Arena();
  return *a;
}

void release(void* p) { arena().take_back(p); }

}  // namespace

std::shared_ptr<ReplayPlan> make_replay_plan() { return std::make_shared<ReplayPlan>(); }

ReplayScope::ReplayScope(const std::shared_ptr<ReplayPlan>& plan) {
  // only where the arena serves this thread's allocations, and not inside another replay
  if (!kSupported || plan == nullptr || t_replay != nullptr || !plans_switch.on() || !arena().installed()) return;
  auto r = std::make_unique<ReplayState>();
  if (!arena().replay_begin(*r, plan)) return;
  t_replay = r.release();
  active_ = true;
}

ReplayScope::~ReplayScope() {
  if (!active_) return;
  ReplayState* r = std::exchange(t_replay, nullptr);
  arena().replay_end(*r, std::uncaught_exceptions() > 0);
  delete r;
}

namespace {

void cpu_arena_scope(bool enter) { arena().scope(enter); }

bool cpu_arena_replay_plans(std::optional<bool> use) { return plans_switch.set(use); }

// [bytes held in free blocks and free slabs, 1 if installed as torch's CPU allocator now else 0, blocks (and
// slabs) allocated anew so far]
std::vector<int64_t> cpu_arena_stats() {
  return {arena().cached_bytes(), arena().installed() ? 1 : 0, arena().misses()};
}

int64_t cpu_arena_release() { return arena().release_all(); }

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // Install (enter=True) or uninstall the caching allocator around a forward; counted, so nested and
  // concurrent forwards keep it installed until the last one leaves.
  m.def("cpu_arena_scope(bool enter) -> ()", &hrnet_fast::cpu_arena_scope);
  // [bytes held in free blocks and slabs, whether installed now, blocks (and slabs) allocated anew so far]
  m.def("cpu_arena_stats() -> int[]", &hrnet_fast::cpu_arena_stats);
  // Frees the free blocks and slabs (as torch.cuda.empty_cache does for CUDA); returns the bytes freed.
  m.def("cpu_arena_release() -> int", &hrnet_fast::cpu_arena_release);
  // whether CPU graphs' replays run in slabs laid out by their memory plans (cpu_arena.h); `use` switches it
  m.def("cpu_arena_replay_plans(bool? use=None) -> bool", &hrnet_fast::cpu_arena_replay_plans);
}
