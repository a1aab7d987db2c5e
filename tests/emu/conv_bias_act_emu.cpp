// Runs the real CUDA epilogue kernel conv_bias_act_epilogue_kernel<float, float>
// (csrc/kernels/conv_bias_act.h) on the CPU through cuda_emu.h. Built by tests/test_conv_bias_act.py
// with plain g++ and called via ctypes; `out` holds the bias-free conv output and is updated in place.
#include "cuda_emu.h"
#include "kernels/conv_bias_act.h"

extern "C" int cba_emu_run(float* out, const float* bias, const float* residual, long long numel, long long channels,
                           long long hw, int channels_last, int relu, long long blocks, int threads) {
  using namespace hrnet_fast;
  if (numel < 0 || channels < 1 || hw < 1) return 1;
  // blocks/threads <= 0: the launch shape the CUDA entry point uses.
  const unsigned nb = static_cast<unsigned>(blocks > 0 ? blocks : conv_bias_act_blocks(numel));
  const unsigned nt = static_cast<unsigned>(threads > 0 ? threads : kCbaThreads);
  emu_launch(dim3(nb), dim3(nt), conv_bias_act_epilogue_kernel<float, float>, out, bias, residual,
             static_cast<int64_t>(numel), static_cast<int64_t>(channels), static_cast<int64_t>(hw),
             channels_last != 0, relu != 0);
  return 0;
}
