// Run-time choice of the CPU kernels' instruction set (see cpu_isa.h), and the op that reports or
// forces it: torch.ops.hrnet_fast.cpu_isa(str? use=None) -> str.
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

namespace hrnet_fast {
namespace {

constexpr const char* kNames[] = {"base", "avx2", "avx512"};

// Whether the CPU can run `isa` (the OS saving the wide registers included: GCC's
// __builtin_cpu_supports checks the XCR0 bits for AVX and AVX-512).
bool cpu_runs(CpuIsa isa) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case CpuIsa::base: return true;
    case CpuIsa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == CpuIsa::base;
#endif
}

bool built(CpuIsa isa) { return winograd_kernels(isa).m4 != nullptr; }

// Empty when `isa` can run here, else why not.
std::string why_not(CpuIsa isa) {
  if (!built(isa)) return std::string("this build has no ") + kNames[static_cast<int>(isa)] + " kernels (not an x86-64 build)";
  if (!cpu_runs(isa)) return std::string("this CPU does not report ") + kNames[static_cast<int>(isa)];
  return "";
}

std::optional<CpuIsa> parse(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kNames[i]) return static_cast<CpuIsa>(i);
  return std::nullopt;
}

CpuIsa best() {
  for (CpuIsa isa : {CpuIsa::avx512, CpuIsa::avx2})
    if (why_not(isa).empty()) return isa;
  return CpuIsa::base;
}

CpuIsa checked(const std::string& name, const char* source) {
  const std::optional<CpuIsa> isa = parse(name);
  TORCH_CHECK(isa.has_value(), "hrnet_fast: ", source, " must be one of base, avx2, avx512, got '", name, "'");
  const std::string why = why_not(*isa);
  TORCH_CHECK(why.empty(), "hrnet_fast: ", source, "=", name, " cannot run: ", why);
  return *isa;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("HRNET_FAST_CPU_ISA");
    return static_cast<int>(env != nullptr && *env != '\0' ? checked(env, "HRNET_FAST_CPU_ISA") : best());
  }()};
  return isa;
}

std::string cpu_isa_op(std::optional<std::string> use) {
  if (use.has_value()) active().store(static_cast<int>(checked(*use, "cpu_isa(use)")));
  return kNames[active().load()];
}

}  // namespace

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(active().load(std::memory_order_relaxed)); }

WinogradKernels winograd_kernels(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return winograd_kernels_avx512();
    case CpuIsa::avx2: return winograd_kernels_avx2();
    default: return winograd_kernels_base();
  }
}

}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  // The CPU kernels' instruction set: returns the one in use; `use` forces another (for tests and
  // comparisons; refused, with the reason, where the CPU or the build cannot run it).
  m.def("cpu_isa(str? use=None) -> str", &hrnet_fast::cpu_isa_op);
}
