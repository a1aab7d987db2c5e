"""Per-call times: torch.utils.benchmark on CPU, triton.testing.do_bench (CUDA events) on GPU; median and IQR.

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


def summarize(times_ms: list[float]) -> dict[str, Any]:
    """Median, inter-quartile range and count of per-call times (ms)."""
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


def sample_cpu(fn: Callable[[], Any], min_run_time: float, threads: int) -> list[float]:
    """Per-call times (ms) of fn() from Timer.blocked_autorange with `threads` torch threads.

    One untimed call first: another contender may have just evicted this one's weights from cache.
    """
    warmup(fn, 1)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return [t * 1e3 for t in m.times]  # per call: blocked_autorange divides each block by its size


def take_turns(
    contenders: dict[str, tuple[str, dict[str, Any]]], rounds: int, min_run_time: float, threads: int, label: str = ""
) -> dict[str, list[float]]:
    """Per-round median seconds of each contender's (statement, globals), the contenders taking turns
    round after round: a burst of load from another process then hits one round of each, and the
    best round shows what the code itself costs. `min_run_time` is per contender, over all rounds."""
    timers = {
        name: tbench.Timer(stmt, globals=glb, num_threads=threads, label=label, sub_label=name)
        for name, (stmt, glb) in contenders.items()
    }
    per_round: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, t in timers.items():
            per_round[name].append(t.blocked_autorange(min_run_time=min_run_time / rounds).median)
    return per_round


def sample_cuda(fn: Callable[[], Any], min_run_time: float) -> list[float]:
    """Per-call CUDA-event times (ms) of fn() (triton.testing.do_bench when installed: it also flushes L2)."""
    warmup(fn, 3)
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return [float(t) for t in do_bench(fn, warmup=25, rep=max(1, int(min_run_time * 1e3)), return_mode="all")]
    times: list[float] = []
    while sum(times) < min_run_time * 1e3 or len(times) < 5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_graph(fn: Callable[[], Any]) -> tuple[Callable[[], Any], Any]:
    """Capture fn() (static inputs) in a CUDA graph: (replay, the graph's static output)."""
    from hrnet_fast.graphs import capture

    graph, out = capture(fn, warmup_calls=3)
    return graph.replay, out
