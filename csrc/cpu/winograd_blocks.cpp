// winograd_blocks on CPU: n ResNet BasicBlocks with identity shortcuts, x <- relu(conv(relu(conv(x, w1) + b1),
// w2) + b2 + x), every conv 3x3, stride 1, C -> C, by Winograd F(m x m, 3 x 3) (the tasks of
// csrc/cpu/conv3x3_winograd.cpp), all 2n convs in one parallel region with a barrier after each
// (WinogradChain, csrc/cpu/winograd_chain.h).
//
// Why: an HRNet branch is 4 such blocks, and at batch 1 each of its convs is ~100-300 us. Here the shape
// is checked and planned, the scratch and the 3 activation buffers allocated, and the threads started
// once for all 2n convs: W32 on 2 threads 1.015x at batch 1, 1.017x at batch 8, one thread 1.035x
// (README, "Winograd on the CPU"). The results are the same bits as the 2n conv3x3_winograd calls.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/winograd_chain.h"

namespace hrnet_fast {
namespace {

at::Tensor winograd_blocks_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases, int64_t tile) {
  at::internal::lazy_init_num_threads();  // this library's first-region set-up before the team is read
  WinogradChain chain("hrnet_fast::winograd_blocks (cpu)", x, weights, biases, tile, at::get_num_threads());
  run_chain(chain);
  return chain.result();
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_IMPL(hrnet_fast, CPU, m) { m.impl("winograd_blocks", &hrnet_fast::winograd_blocks_cpu); }
