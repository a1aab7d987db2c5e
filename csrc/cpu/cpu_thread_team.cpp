// cpu_thread_team(int threads) -> int: how many OpenMP threads the *calling* thread's parallel regions
// use from now on (torch's intra-op pool with OpenMP, oneDNN's convs, our kernels), returning what it
// was; 0 asks without changing it. -1 where torch is not built with OpenMP (the setting is then not
// per thread, and the task runner of hrnet_fast/fused/cpu_tasks.py stays off).
//
// Why not torch.set_num_threads: it also sets a process-wide count that every thread adopts on its
// first parallel region (and MKL's), so threads splitting the cores between them would override each
// other. OpenMP's team size (nthreads-var) is a per-thread setting: each task thread sets its own share.
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if AT_PARALLEL_OPENMP
#include <omp.h>
#endif

#if AT_MKL_ENABLED() && defined(__GNUC__)
// MKL's per-thread thread count, its C interface (mkl_service.h maps mkl_set_num_threads_local to it; the
// lower-case symbol is the Fortran one, which takes a pointer). libtorch exports it where torch links
// MKL; weak, so a build whose torch does not resolves it to null instead of failing to load.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace hrnet_fast {
namespace {

int64_t cpu_thread_team(int64_t threads) {
  TORCH_CHECK(threads >= 0, "hrnet_fast::cpu_thread_team: threads must be >= 0 (0: only report), got ", threads);
#if AT_PARALLEL_OPENMP
  // A thread's first parallel region sets its team to torch's process-wide count, which would undo the
  // setting below, once per copy of the inline at::internal::lazy_init_num_threads (its thread_local
  // flag): libtorch's (run by at::get_num_threads) and this library's own (run by every at::parallel_for
  // compiled here). Both run first. Without the second, a new thread's first Winograd conv sized its
  // scratch for the team set here, then ran with torch's count, two threads sharing one slot.
  at::internal::lazy_init_num_threads();
  const int64_t previous = at::get_num_threads();
  if (threads > 0) {
    omp_set_num_threads(static_cast<int>(threads));
#if AT_MKL_ENABLED() && defined(__GNUC__)
    // MKL (torch's BLAS on x86: aten::mm, which the fusions' low-resolution 1x1 convs run) keeps a
    // per-thread count of its own, which the lazy init above sets to torch's process-wide count. Left at
    // that, a task worker's first sgemm started a GNU OpenMP team of that size, so a pool of threads for
    // that worker; with more OpenMP threads than CPUs, libgomp spins 100 times instead of ~300,000 before
    // sleeping, in every pool of the process, for good: W32 at batch 1 on 2 threads, run with tasks off,
    // went from 63 to 94-126 ms a forward once a tasks forward had run in the process (its OpenMP
    // thread slept and woke ~950 times a forward, 0 before). tests/test_cpu_tasks.py checks it.
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(static_cast<int>(threads));
#endif
  }
  return previous;
#else
  return -1;
#endif
}

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  m.def("cpu_thread_team(int threads) -> int", &hrnet_fast::cpu_thread_team);
}
