"""Task parallelism for the cpu backend: independent chains of work (an HR module's branches, then its
fused outputs; stage 1's chunks of a batch) run side by side on threads of their own, each thread with
a share of the caller's OpenMP threads.

Why: every op of the cpu backend splits its own work between torch's threads, and at batch 1 most of
HRNet's convs are too small to split well. W32's 64-channel 32x24 Winograd conv took 197 us on one
thread and 146-178 us on two, while two such convs, each on one thread of its own, took 112-146 us a
conv. Off by default all the same (optimize's `tasks`, README "Threads"): the 1.3-1.8x that a W32
forward gained from them on 2 threads was measured against ops slowed by them (see "When").

How: `run_chains` hands the chains to min(threads, chains) workers: the calling thread and threads of
a shared pool. Each worker sets its own OpenMP team (torch.ops.hrnet_fast.cpu_thread_team, a per-thread
setting) to its share of the caller's threads, then repeatedly takes the next step of the chain with
the most steps left that no other worker is running, so one long chain does not finish last alone;
when no step is left for the others, the last steps take the threads the idle workers leave.
Chains nest: a worker given several threads may fan out again. Outputs are bit-identical to running
the chains one after another: each step is the same op calls on the same inputs, and the cpu backend's
kernels (ours and oneDNN's) give the same bits at any thread count (tests/test_cpu_tasks.py).

When: only where asked for (optimize(tasks=True)). A worker with a team of several makes GNU OpenMP
(torch's) start a thread pool for that worker; with those pools, OpenMP manages more threads than
there are CPUs, and then every idle OpenMP thread spins 100 times instead of ~300,000 before it
sleeps, so nearly every parallel region of every op in the process (eager's too) waits for threads to
wake up, for as long as the process lives; and as teams grow and shrink, OpenMP ends and starts
threads. So a worker's team is its share and never more (only the caller, whose pool exists anyway,
takes idle workers' threads for a last step), and its MKL count too (cpu_thread_team): a worker's
sgemm used to start a pool of torch's thread count even on a team of one. On the GPU machine's 16 cores
(Intel, 2026-11-26, benchmarks/GPU-NOTES.md) W32 at batch 1 with tasks took 42.7 ms at 16 threads
and 62.0 at 8; each op splitting its own work, no tasks, with OpenMP's threads spinning, 28.3 and
33.8. Here, 2 threads, with that sgemm pool gone (2026-11-26 19:30 UTC, in turns in one process):
tasks 1.23x slower than none at batch 1 (20 of 20 rounds) and 1.10x at batch 8 (10 of 10).

Where not: ops on other threads would escape what is per thread here, so the chains run one after
another in the caller under torch.compile, an active TorchDispatchMode or TorchFunctionMode (op
counters, fake tensors, `with torch.device(...)`) or the profiler (which records the calling thread
only), and on builds of torch without OpenMP.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

Step = Callable[[Any], Any]
Chain = tuple[Sequence[Step], Any]  # the steps, applied in order to the chain's input

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    # a forked child has none of the parent's threads: it starts a pool of its own when it needs one
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                # nested chains and several callers may each hold workers: room for more than the cores
                _pool = ThreadPoolExecutor(max_workers=4 * (os.cpu_count() or 1) + 4, thread_name_prefix="hrnet_fast_cpu")
    return _pool


def team() -> int:
    """The calling thread's OpenMP team size (torch.get_num_threads() there), or 1 when it has none of
    its own (torch without OpenMP): the threads run_chains may share out."""
    n = int(torch.ops.hrnet_fast.cpu_thread_team(0))
    return max(n, 1)


# Up to this many threads every task worker's team is a single thread, so no worker starts an OpenMP
# pool of its own (module docstring, "When"); above, some may, and then every op in the process slows.
POOL_FREE_THREADS = 2


def may_fan_out() -> bool:
    """Whether work may leave the calling thread (module docstring, "Where not")."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0  # infra modes (fake tensors) included
        or torch._C._is_torch_function_mode_enabled()
        or torch.autograd._profiler_enabled()
    )


class _Run:
    """The shared state of one run_chains call."""

    def __init__(self, chains: Sequence[Chain], threads: int) -> None:
        self.threads = threads  # the caller's, shared out
        self.in_use = 0  # threads of the steps running now
        self.steps = [list(s) for s, _ in chains]
        self.values = [v for _, v in chains]
        self.next = [0] * len(chains)
        self.busy = [False] * len(chains)
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        # inference tensors and grad mode are per thread: workers run under the caller's
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()

    def _take(self, share: int, grow: bool) -> tuple[int, int] | None:
        """(the chain whose next step this worker runs, the threads to run it with), or None when
        there is nothing left for it. The threads are the worker's share, or, for the caller (`grow`),
        every thread no running step holds when no other step is left for idle workers to take (the
        last chain's tail): a pool worker given more would start an OpenMP pool of its own (module
        docstring, "When")."""
        with self.cond:
            while True:
                if self.error is not None:
                    return None
                best, left, others = None, 0, 0
                for c, steps in enumerate(self.steps):
                    n = len(steps) - self.next[c]
                    if n and not self.busy[c]:
                        others += 1
                        if n >= left:  # ties: the later chain (lower resolution)
                            best, left = c, n
                if best is not None and not grow and others == 1 and self.in_use == 0:
                    # the last chain with steps left, and nothing running: the caller's worker takes it
                    # with every thread (it is waiting, or about to ask); a pool worker would run it
                    # on its share alone, which it could otherwise win by racing the caller to it
                    return None
                if best is not None:
                    team = share if others > 1 or not grow else max(share, self.threads - self.in_use)
                    self.busy[best] = True
                    self.in_use += team
                    return best, team
                if all(n == len(s) for n, s in zip(self.next, self.steps)):
                    return None
                self.cond.wait()

    def work(self, share: int, grow: bool = False) -> None:
        """One worker: steps until none is left, each with the OpenMP team _take gives it (`grow`: the
        caller's worker, which may take the idle workers' threads for a chain's tail)."""
        previous, current = torch.ops.hrnet_fast.cpu_thread_team(share), share
        try:
            with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad):
                while (taken := self._take(share, grow)) is not None:
                    c, team = taken
                    if team != current:
                        torch.ops.hrnet_fast.cpu_thread_team(team)
                        current = team
                    value = self.steps[c][self.next[c]](self.values[c])
                    with self.cond:
                        self.values[c] = value
                        self.next[c] += 1
                        self.busy[c] = False
                        self.in_use -= team
                        self.cond.notify_all()
        except BaseException as e:  # a step's error, or an interrupt while waiting: the others stop too
            with self.cond:
                self.error = self.error or e
                self.cond.notify_all()
            raise
        finally:
            torch.ops.hrnet_fast.cpu_thread_team(previous)


def run_chains(chains: Sequence[Chain]) -> list[Any]:
    """Each chain's steps applied in order to its input, the chains side by side (module docstring);
    the chains' results, in order. Sequential in the caller where work may not leave it."""
    threads = team() if chains and may_fan_out() else 1
    workers = min(threads, len(chains))
    if workers < 2:
        out = []
        for steps, value in chains:
            for step in steps:
                value = step(value)
            out.append(value)
        return out
    run = _Run(chains, threads)
    shares = [threads // workers + (k < threads % workers) for k in range(workers)]
    futures: list[Future] = [_executor().submit(run.work, s) for s in shares[1:]]
    try:
        run.work(shares[0], grow=True)
    finally:
        # The caller's loop ends only when every step is done or running on a started worker: a
        # worker still queued (a busy pool) is cancelled, one started finishes its step.
        for f in futures:
            if not f.cancel():
                f.exception()
    if run.error is not None:
        raise run.error
    return run.values


def split_batch(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """x as `parts` near-equal pieces along dim 0 (views)."""
    n = x.shape[0]
    return list(x.split([n // parts + (k < n % parts) for k in range(parts)]))
