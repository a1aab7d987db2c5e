"""Median and IQR of one call: torch.utils.benchmark on CPU, triton.testing.do_bench (CUDA events) on GPU.

Warm-up is always excluded. Times are milliseconds.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on every import
# with a CUDA build of torch on a machine without a GPU: noise on the CLI's stderr, not a problem.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import torch.utils.benchmark as tbench  # noqa: E402


def _summary(times_ms: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return {"median_ms": statistics.median(times_ms), "iqr_ms": q[2] - q[0], "runs": len(times_ms)}


def warmup(fn: Callable[[], Any], calls: int = 2, seconds: float = 0.0) -> None:
    """Call fn at least `calls` times and for at least `seconds`: first-call costs (allocations,
    primitive creation, autotuning, a compiler's background work settling) stay out of the timing."""
    end = time.perf_counter() + seconds
    for _ in range(calls):
        fn()
    while time.perf_counter() < end:
        fn()


def time_cpu(fn: Callable[[], Any], min_run_time: float, threads: int) -> dict[str, Any]:
    """blocked_autorange over fn() with `threads` torch threads, after warm-up."""
    warmup(fn, 2, min(1.0, 0.2 * min_run_time))
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    # each block is number_per_run calls; m.times are per call already
    return _summary([t * 1e3 for t in m.times])


def time_cuda(fn: Callable[[], Any], min_run_time: float) -> dict[str, Any]:
    """CUDA-event times of fn() (triton.testing.do_bench when installed: it also flushes L2)."""
    warmup(fn, 3)
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times = do_bench(fn, warmup=25, rep=max(1, int(min_run_time * 1e3)), return_mode="all")
        return _summary([float(t) for t in times])
    times = []
    budget_ms, spent = min_run_time * 1e3, 0.0
    while spent < budget_ms or len(times) < 5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1]
    return _summary(times)


def cuda_graph(fn: Callable[[], Any]) -> tuple[Callable[[], Any], Any]:
    """Capture fn() (static inputs) in a CUDA graph: (replay, the graph's static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as the CUDA-graph docs ask
        warmup(fn, 3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out
