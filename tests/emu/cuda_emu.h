// Test-only CUDA emulation for g++: enough of CUDA's launch model (__global__, threadIdx,
// blockIdx, blockDim, gridDim) to run a kernel that uses no __syncthreads or shared memory on the
// CPU, one (block, thread) after another. Grid sizes and bounds checks run exactly as written.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers only"
#endif

#define HF_CUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// One emulated thread runs at a time, so plain globals stand in for the built-in registers.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// kernel<<<grid, block>>>(args...): every (block, thread) in turn, x fastest.
template <typename... Params, typename... Args>
void emu_launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx)
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx) {
              blockIdx = dim3(bx, by, bz);
              threadIdx = dim3(tx, ty, tz);
              kernel(args...);
            }
}
