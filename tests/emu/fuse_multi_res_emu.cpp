// Runs the real CUDA kernel fuse_multi_res_kernel<scalar_t> (csrc/kernels/fuse_multi_res.h) on the
// CPU through cuda_emu.h, for float32 and for 16-bit stand-ins of __half / __nv_bfloat16 (same
// explicit float conversions as c10::Half / c10::BFloat16, round to nearest even). Built by
// tests/test_fuse_multi_res.py with plain g++ and called via ctypes; the low-res inputs come in
// already projected (float32, in the output's layout), as the cuBLAS GEMMs leave them.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cuda_emu.h"
#include "kernels/fuse_multi_res.h"

namespace {

// The last run's plan, for the tests to check which kernel ran.
bool g_plan_vector = false, g_plan_wide = false;

struct EmuHalf {
  _Float16 v;
  EmuHalf() = default;
  explicit EmuHalf(float f) : v(static_cast<_Float16>(f)) {}
  explicit operator float() const { return static_cast<float>(v); }
};

struct EmuBFloat16 {
  uint16_t bits;
  EmuBFloat16() = default;
  explicit EmuBFloat16(float f) {  // round to nearest even, as c10::BFloat16 (finite inputs)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(EmuHalf) == 2 && sizeof(EmuBFloat16) == 2, "16-bit storage");

template <typename scalar_t>
void run(const void* base, void* out, const float* bias, long long n, long long c, long long h, long long w,
         int nhwc, int relu, int k, const float* const* low, const long long* low_h, const long long* low_w,
         long long blocks, int threads, int force, int bilinear, int align_corners) {
  using namespace hrnet_fast;
  FuseParams<scalar_t> p{};
  p.base = static_cast<const scalar_t*>(base), p.out = static_cast<scalar_t*>(out), p.bias = bias;
  p.n = n, p.c = c, p.h = h, p.w = w;
  p.nhwc = nhwc != 0, p.relu = relu != 0, p.k = k;
  p.bilinear = bilinear != 0, p.align_corners = align_corners != 0;
  long long largest = n * c * h * w;
  for (int i = 0; i < k; ++i) {
    p.low[i] = bilinear ? FuseLowres{low[i], low_h[i], low_w[i], fuse_linear_scale(low_h[i], h, align_corners != 0),
                                    fuse_linear_scale(low_w[i], w, align_corners != 0)}
                        : FuseLowres{low[i], low_h[i], low_w[i], fuse_scale(low_h[i], h), fuse_scale(low_w[i], w)};
    largest = std::max(largest, n * c * low_h[i] * low_w[i]);
  }
  // The plan the CUDA entry point makes; `force` bit 0 takes the scalar kernel, bit 1 64-bit indices.
  ElementwisePlan plan = fuse_plan(p, largest);
  if (force & 1) plan = ElementwisePlan{false, plan.wide, n * c * h * w};
  if (force & 2) plan.wide = true;
  g_plan_vector = plan.vector;
  g_plan_wide = plan.wide;
  fuse_dispatch(p, plan, [&](auto kernel, const auto& params, auto units) {
    // blocks <= 0: the launch shape the CUDA entry point uses (elementwise_blocks, kElementwiseThreads).
    const unsigned nb = static_cast<unsigned>(blocks > 0 ? blocks : elementwise_blocks(units));
    const unsigned nt = static_cast<unsigned>(threads > 0 ? threads : kElementwiseThreads);
    emu_launch(dim3(nb), dim3(nt), kernel, params, units);
  });
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16 (base and out); bias and the low-res inputs are float32.
// bilinear: 0 nearest, 1 bilinear upsampling (align_corners as F.interpolate's).
extern "C" int fuse_emu_run(int dtype, const void* base, void* out, const float* bias, long long n, long long c,
                           long long h, long long w, int nhwc, int relu, int k, const float* const* low,
                           const long long* low_h, const long long* low_w, long long blocks, int threads, int force,
                           int bilinear, int align_corners) {
  if (k < 0 || k > hrnet_fast::kFuseMaxLowres) return 1;
  switch (dtype) {
    case 0: run<float>(base, out, bias, n, c, h, w, nhwc, relu, k, low, low_h, low_w, blocks, threads, force, bilinear, align_corners); break;
    case 1: run<EmuHalf>(base, out, bias, n, c, h, w, nhwc, relu, k, low, low_h, low_w, blocks, threads, force, bilinear, align_corners); break;
    case 2: run<EmuBFloat16>(base, out, bias, n, c, h, w, nhwc, relu, k, low, low_h, low_w, blocks, threads, force, bilinear, align_corners); break;
    default: return 2;
  }
  return 0;
}

// Which kernel the last run took: bit 0 the vector kernel, bit 1 64-bit indices.
extern "C" int fuse_emu_last_plan() { return (g_plan_vector ? 1 : 0) | (g_plan_wide ? 2 : 0); }
