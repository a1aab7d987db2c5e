// Runs the real CUDA kernel fuse_multi_res_kernel<float> (csrc/kernels/fuse_multi_res.h) on the
// CPU through cuda_emu.h. Built by tests/test_fuse_multi_res.py with plain g++ and called via
// ctypes; the low-res inputs come in already projected (float32, in the output's layout).
#include "cuda_emu.h"
#include "kernels/fuse_multi_res.h"

extern "C" int fmr_emu_run(const float* base, float* out, const float* bias, long long n, long long c,
                           long long h, long long w, int nhwc, int relu, int k, const float* const* low,
                           const long long* low_h, const long long* low_w, long long blocks, int threads) {
  using namespace hrnet_fast;
  if (k < 0 || k > kFmrMaxLowres) return 1;
  FmrParams<float> p{};
  p.base = base, p.out = out, p.bias = bias;
  p.n = n, p.c = c, p.h = h, p.w = w;
  p.nhwc = nhwc != 0, p.relu = relu != 0, p.k = k;
  for (int i = 0; i < k; ++i) {
    p.low[i] = FmrLowres{low[i], low_h[i], low_w[i], fmr_scale(low_h[i], h), fmr_scale(low_w[i], w)};
  }
  // blocks <= 0: the launch shape the CUDA entry point uses (fmr_blocks, kFmrThreads).
  const unsigned nb = static_cast<unsigned>(blocks > 0 ? blocks : fmr_blocks(n * c * h * w));
  const unsigned nt = static_cast<unsigned>(threads > 0 ? threads : kFmrThreads);
  emu_launch(dim3(nb), dim3(nt), fuse_multi_res_kernel<float>, p);
  return 0;
}
