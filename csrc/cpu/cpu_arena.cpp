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
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace hrnet_fast {
namespace {

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
    void* p = take_cached(size);  // may be larger: size becomes the block's
    if (p == nullptr) p = c10::alloc_cpu(size);  // torch's own: aligned, and torch's error when out of memory
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_[p] = size;
      in_use_ += size;
      peak_in_use_ = std::max(peak_in_use_, in_use_);
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
    {
      std::lock_guard<std::mutex> lock(mutex_);
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
    return static_cast<int64_t>(cached_);
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
      for (const Block& b : lru_) blocks.push_back(b.p);
      free_.clear();
      lru_.clear();
      freed = cached_;
      cached_ = 0;
    }
    for (void* p : blocks) c10::free_cpu(p);
    return static_cast<int64_t>(freed);
  }

 private:
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
  int depth_ = 0;
  c10::Allocator* previous_ = nullptr;
};

// Never destroyed: blocks it handed out may be freed at any time, process exit included.
Arena& arena() {
  static Arena* const a = new Arena();
  return *a;
}

void release(void* p) { arena().take_back(p); }

void cpu_arena_scope(bool enter) { arena().scope(enter); }

// [bytes held in free blocks, 1 if installed as torch's CPU allocator now else 0, blocks allocated anew so far]
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
  // [bytes held in free blocks, whether installed now, blocks allocated anew (no free one of the size) so far]
  m.def("cpu_arena_stats() -> int[]", &hrnet_fast::cpu_arena_stats);
  // Frees the free blocks (as torch.cuda.empty_cache does for CUDA); returns the bytes freed.
  m.def("cpu_arena_release() -> int", &hrnet_fast::cpu_arena_release);
}
