// lane_split (csrc/cpu/lane_split.h): the split conv of winograd_branches' two lanes, a conv at a time
// toward equal lanes, per set of branches; and the ops that show, forget or force it.
#include "cpu/lane_split.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <sstream>

namespace hrnet_fast {
namespace {

std::mutex split_mutex;

std::map<std::vector<int64_t>, int64_t>& splits() {
  static auto* const s = new std::map<std::vector<int64_t>, int64_t>();  // never destroyed: calls may outlive exit
  return *s;
}

std::atomic<int64_t> forced{-1};  // winograd_branches_split_at: -1 measured

// "key: k" a line, for logs and tests
std::string winograd_branches_split_points() {
  std::lock_guard<std::mutex> lock(split_mutex);
  std::ostringstream out;
  for (const auto& [key, k] : splits()) {
    for (size_t i = 0; i < key.size(); ++i) out << (i ? "," : "") << key[i];
    out << ": " << k << "\n";
  }
  return out.str();
}

void winograd_branches_split_reset() {
  std::lock_guard<std::mutex> lock(split_mutex);
  splits().clear();
}

// -1: measured (the default); else that conv (at most the chain's convs) for every call
void winograd_branches_split_at(int64_t k) {
  TORCH_CHECK(k >= -1, "hrnet_fast::winograd_branches_split_at: k must be -1 (measured) or a conv index, got ", k);
  forced.store(k);
}

int64_t lane_split_search(double first_other, double second_other, double per_conv, int64_t convs, int64_t start,
                          bool shared);

}  // namespace

int64_t lane_split(const std::vector<int64_t>& key, int64_t convs, int64_t lowest) {
  const int64_t f = forced.load();
  if (f >= 0) return std::max(lowest, std::min(f, convs));
  std::lock_guard<std::mutex> lock(split_mutex);
  auto it = splits().find(key);
  if (it == splits().end()) it = splits().emplace(key, convs).first;
  return std::max(lowest, std::min(it->second, convs));
}

void record_lane_times(const std::vector<int64_t>& key, int64_t k, int64_t convs, const LaneTimes& t,
                       int64_t lowest) {
  if (forced.load() >= 0 || t.per_conv <= 0) return;
  std::lock_guard<std::mutex> lock(split_mutex);
  auto it = splits().find(key);
  if (it == splits().end() || it->second != k) return;  // another call moved it meanwhile
  const double d = t.second_end - t.first_end;
  if (t.together >= 0) {
    // Shared: the first lane ending half a conv after the second means it reached the tail after the
    // second had run all of it (or its own share came late).
    if (t.waited > t.per_conv / 2 || d < -t.per_conv / 2) {
      if (k > lowest) --it->second;
    } else if (t.together > 2 * t.per_conv && k < convs) {
      ++it->second;
    }
    return;
  }
  // A conv moved from one lane to the other changes their difference d by twice its time, which
  // shortens the later lane only where |d| > per_conv. The second lane waiting for the first's
  // share means the first is behind however the ends compare.
  if (t.waited > t.per_conv / 2 || d < -t.per_conv) {
    if (k > lowest) --it->second;
  } else if (d > t.per_conv && k < convs) {
    ++it->second;
  }
}

namespace {

// One run of the lanes as a model: the first lane k convs of per_conv, then first_other; the second
// second_other, then the other convs - k (shared: after the first's k). Shared: whichever lane reaches those
// convs first runs them, the other joins it when it comes (the rest then at half the time).
LaneTimes model_lanes(double first_other, double second_other, double per_conv, int64_t convs, int64_t k,
                      bool shared) {
  const double own = static_cast<double>(k) * per_conv, tail = static_cast<double>(convs - k) * per_conv;
  if (!shared) return {own + first_other, second_other + tail, per_conv, 0.0};  // (the wait left out)
  const double waited = std::max(0.0, own - second_other);
  const double first = own + first_other, second = second_other + waited;  // each lane at the tail
  const double early = std::min(first, second), late = std::max(first, second);
  if (early + tail <= late)  // the early lane ran all of the tail before the other came
    return {first <= second ? early + tail : first, first <= second ? second : early + tail, per_conv, waited, 0.0};
  const double together = (tail - (late - early)) / 2;
  return {late + together, late + together, per_conv, waited, together};
}

// The split record_lane_times settles on against model_lanes instead of a clock, for tests. Starts at
// `start` (convs where negative, as a new key does).
int64_t lane_split_search(double first_other, double second_other, double per_conv, int64_t convs, int64_t start,
                          bool shared) {
  constexpr const char* op = "hrnet_fast::winograd_branches_split_search";
  TORCH_CHECK(convs >= 1 && per_conv > 0 && first_other >= 0 && second_other >= 0 && start <= convs, op,
              ": convs must be positive, per_conv positive, the other times non-negative and start at most convs, got ",
              convs, ", ", per_conv, ", ", first_other, ", ", second_other, ", ", start);
  TORCH_CHECK(forced.load() < 0, op, ": a split is forced (winograd_branches_split_at); set -1 first");
  const std::vector<int64_t> key = {-1, convs};  // no real key starts with -1 (the first is a weight's address)
  {
    std::lock_guard<std::mutex> lock(split_mutex);
    splits()[key] = start < 0 ? convs : start;
  }
  int64_t k = lane_split(key, convs);
  for (int64_t step = 0; step <= 2 * convs + 2; ++step) {  // a conv a call: settled within convs steps
    record_lane_times(key, k, convs, model_lanes(first_other, second_other, per_conv, convs, k, shared));
    k = lane_split(key, convs);
  }
  std::lock_guard<std::mutex> lock(split_mutex);
  splits().erase(key);
  return k;
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // the split convs winograd_branches' two lanes have settled on so far, "key: k" a line (key: the
  // branches' shapes, convs and tiles)
  m.def("winograd_branches_split_points() -> str", &hrnet_fast::winograd_branches_split_points);
  // forget them (the next calls start again from no split)
  m.def("winograd_branches_split_reset() -> ()", &hrnet_fast::winograd_branches_split_reset);
  // force the split at conv k for every call (-1: measured again), for tests and comparisons
  m.def("winograd_branches_split_at(int k) -> ()", &hrnet_fast::winograd_branches_split_at);
  // the split the measurement settles on against a model of the lanes' times (tests)
  m.def("winograd_branches_split_search(float first_other, float second_other, float per_conv, int convs, "
        "int start=-1, bool shared=False) -> int",
        &hrnet_fast::lane_split_search);
}
