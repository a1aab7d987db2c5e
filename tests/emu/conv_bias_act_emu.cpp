// Runs the real CUDA epilogue kernel conv_bias_act_epilogue_kernel (csrc/kernels/conv_bias_act.h) for
// float32 on the CPU through cuda_emu.h, with the plan the CUDA entry point makes. Built by
// tests/test_conv_bias_act.py with plain g++ and called via ctypes; `out` holds the bias-free conv
// output and is updated in place.
#include "cuda_emu.h"
#include "kernels/conv_bias_act.h"

namespace {
int g_last_plan = 0;  // bit 0: the vector kernel ran; bit 1: 64-bit indices
}

// force: bit 0 takes the element-per-thread kernel, bit 1 64-bit indices (else the entry point's plan).
extern "C" int conv_bias_act_emu_run(float* out, const float* bias, const float* residual, long long numel, long long channels,
                           long long hw, int channels_last, int relu, long long blocks, int threads, int force) {
  using namespace hrnet_fast;
  if (numel < 0 || channels < 1 || hw < 1) return 1;
  ElementwisePlan plan = conv_bias_act_epilogue_plan(out, residual, numel, channels, channels_last != 0);
  if (force & 1) plan = ElementwisePlan{false, plan.wide, numel};
  if (force & 2) plan.wide = true;
  g_last_plan = (plan.vector ? 1 : 0) | (plan.wide ? 2 : 0);
  conv_bias_act_epilogue_dispatch<float, float>(plan, [&](auto kernel, auto units) {
    // blocks/threads <= 0: the launch shape the CUDA entry point uses.
    const unsigned nb = static_cast<unsigned>(blocks > 0 ? blocks : elementwise_blocks(units));
    const unsigned nt = static_cast<unsigned>(threads > 0 ? threads : kElementwiseThreads);
    emu_launch(dim3(nb), dim3(nt), kernel, out, bias, residual, units, static_cast<int64_t>(channels),
               static_cast<int64_t>(hw), channels_last != 0, relu != 0);
  });
  return 0;
}

extern "C" int conv_bias_act_emu_last_plan() { return g_last_plan; }
