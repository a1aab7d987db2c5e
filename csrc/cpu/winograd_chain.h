// One chain of ResNet BasicBlocks (an HRNet branch) ready to run: its inputs checked, its weights and
// biases as the kernel reads them, its 3 activation buffers and its Winograd runner planned for a number
// of threads. Used by winograd_blocks (one chain on all the threads) and winograd_branches (a module's
// chains side by side, each on a share of the threads): csrc/cpu/winograd_blocks.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/winograd_driver.h"

namespace hrnet_fast {

class WinogradChain {
 public:
  // `op` names the caller in error messages; `threads`: the team the runner plans for; `slots`: threads
  // it holds scratch for, where more may run its tasks (WinogradRunner's min_slots)
  WinogradChain(const char* op, const at::Tensor& x, at::TensorList weights, at::TensorList biases, int64_t tile,
                int64_t threads, int64_t slots = 0);
  int64_t convs() const { return static_cast<int64_t>(w_.size()); }
  bool empty() const { return mid_.numel() == 0; }
  const WinogradRunner& runner() const { return *runner_; }
  WinogradRunner& runner() { return *runner_; }
  // conv i's input, shortcut (the block's input, on its second conv; else null) and output
  std::tuple<const float*, const float*, float*> io(int64_t i) const;
  // tasks [begin, end) of conv i with the scratch of `slot`; u: conv i's U where the runner wants it
  // transformed up front (shared_u()), else null
  void run(int64_t i, int64_t slot, int64_t begin, int64_t end, const float* u = nullptr) const;
  const DenseWeight& weight(int64_t i) const { return w_[i]; }
  // part `part` of `parts` of conv i's U, where the runner wants it transformed up front (shared_u())
  const float* transform_u_part(int64_t i, int64_t part, int64_t parts) const {
    return runner_->transform_shared_u_part(w_[i], part, parts);
  }
  // the last block's output, in x's memory format
  at::Tensor result() const;

 private:
  std::vector<at::Tensor> kept_;
  std::vector<DenseWeight> w_;
  std::vector<const float*> b_;
  at::Tensor xc_, mid_;
  std::array<at::Tensor, 2> outs_;
  at::MemoryFormat fmt_;
  std::optional<WinogradRunner> runner_;
};

// Runs the whole chain on the calling thread's team (at::get_num_threads(), what `chain` was planned
// for): one parallel region with a barrier between convs, or a region a conv where U is transformed
// up front, or on this thread alone (one slot, or inside a parallel region already).
void run_chain(WinogradChain& chain);

}  // namespace hrnet_fast
