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

int64_t lane_split_search(double first_other, double second_other, double per_conv, int64_t convs, int64_t start);

}  // namespace

int64_t lane_split(const std::vector<int64_t>& key, int64_t convs, int64_t lowest) {
  const int64_t f = forced.load();
  if (f >= 0) return std::max(lowest, std::min(f, convs));
  std::lock_guard<std::mutex> lock(split_mutex);
  auto it = splits().find(key);
  if (it == splits().end()) it = splits().emplace(key, convs).first;
  return std::max(lowest, std::min(it->second, convs));
}

void record_lane_times(const std::vector<int64_t>& key, int64_t k, int64_t convs, double first_end, double second_end,
                       double per_conv, double waited, int64_t lowest) {
  if (forced.load() >= 0 || per_conv <= 0) return;
  std::lock_guard<std::mutex> lock(split_mutex);
  auto it = splits().find(key);
  if (it == splits().end() || it->second != k) return;  // another call moved it meanwhile
  // A conv moved from one lane to the other changes their difference d by twice its time, which
  // shortens the later lane only where |d| > per_conv. The second lane waiting for the first's
  // share means the first is behind however the ends compare.
  const double d = second_end - first_end;
  if (waited > per_conv / 2 || d < -per_conv) {
    if (k > lowest) --it->second;
  } else if (d > per_conv && k < convs) {
    ++it->second;
  }
}

namespace {

// The split record_lane_times settles on against a model of the lanes instead of a clock, for tests:
// the first lane takes k convs of per_conv, then first_other; the second second_other, then the other
// convs - k. Starts at `start` (convs where negative, as a new key does).
int64_t lane_split_search(double first_other, double second_other, double per_conv, int64_t convs, int64_t start) {
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
    record_lane_times(key, k, convs, k * per_conv + first_other, second_other + (convs - k) * per_conv, per_conv, 0.0);
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
        "int start=-1) -> int",
        &hrnet_fast::lane_split_search);
}
