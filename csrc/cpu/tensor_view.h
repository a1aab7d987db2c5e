// Cheap tensor views for the CPU kernels' per-call set-up. Why: in a forward the set-up runs with its
// caches cold (the kernels before it filled them), and every tensor op it makes (a permuted view to
// ask is_contiguous, a dispatched at::empty) touches more code and objects: W32 at batch 1 on 2
// threads spent 5.7 us a conv3x3_winograd call making `weight.permute(...)` alone (rdtsc inside the
// op, 2026-11-27), of a ~150 us call.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>

namespace hrnet_fast {

// Whether t.permute(order).is_contiguous(), without making the view: its elements lie densely with
// dimension order[0] outermost and order[N-1] innermost (a dimension of size 1 may have any stride,
// as is_contiguous allows).
template <size_t N>
inline bool dense_in_order(const at::Tensor& t, const std::array<int, N>& order) {
  if (t.dim() != static_cast<int64_t>(N)) return false;
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  for (size_t i = N; i-- > 0;) {
    const int d = order[i];
    const int64_t size = t.size(d);
    if (size != 1 && t.stride(d) != expected) return false;
    expected *= size;
  }
  return true;
}

// An uninitialised float32 CPU tensor, without a dispatcher call: for outputs and scratch the kernel
// writes in full before anyone reads them.
inline at::Tensor empty_float(c10::IntArrayRef sizes,
                              at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  return at::Tensor(at::detail::empty_cpu(sizes, at::kFloat, false, format));
}

}  // namespace hrnet_fast
