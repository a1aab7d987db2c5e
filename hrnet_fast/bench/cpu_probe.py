"""What a CPU's cores can give at all: N processes at once, one thread each, each running an fp32 GEMM
(compute) and then an elementwise add over large tensors (memory bandwidth); their rates summed.

    python -m hrnet_fast.bench.cpu_probe [--procs 1 2 4 8 16] [--seconds 1.5]

Separate single-threaded processes, so no library's threading is measured: if the GEMM's sum stops
growing from 8 to 16 processes, the 16 logical CPUs are 8 cores' SMT siblings (a hypervisor's lscpu
need not say so); if the add's sum stops growing, the memory bus is full. A model's thread scaling is
then read against these. (torch.mm's own threads are no such probe: on this project's 2-core Xeon one
2048^3 product ran at 180 GFLOP/s on 1 thread and on 2, while two processes ran 175 each.)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence

import torch

GEMM_N = 1024            # an n x n x n product: 12 MB of operands, compute-bound on any core
ADD_MIB = 64             # MiB per tensor of out = a + b, beyond any core's share of the caches


def rate(fn: Callable[[], object], work: float, start: float, seconds: float) -> float:
    """Work per second of fn() (`work` units a call) called over and over from time `start` (waited
    for) until `seconds` have passed."""
    while time.time() < start:
        time.sleep(0.001)
    n = 0
    while time.time() < start + seconds:
        fn()
        n += 1
    return work * n / (time.time() - start)


def _worker(seconds: float, ready: "mp.synchronize.Barrier", results: "mp.Queue[tuple[float, float]]") -> None:
    torch.set_num_threads(1)
    a, b, c = (torch.randn(GEMM_N, GEMM_N) for _ in range(3))
    n = ADD_MIB * 2**20 // 4
    x, y, z = torch.ones(n), torch.ones(n), torch.empty(n)
    ready.wait()  # every process set up: the phases start together
    start = time.time()
    gemm = rate(lambda: torch.mm(a, b, out=c), 2 * GEMM_N**3, start, seconds)
    add = rate(lambda: torch.add(x, y, out=z), 3 * n * 4, start + seconds + 0.3, seconds)
    results.put((gemm, add))


def probe(procs: int, seconds: float = 1.5) -> tuple[float, float]:
    """(GFLOP/s, GB/s) summed over `procs` single-threaded processes running at once, each phase
    `seconds` long."""
    # spawned, not forked: a fork of a process whose OpenMP pool has run can hang in the child
    ctx = mp.get_context("spawn")
    results, ready = ctx.Queue(), ctx.Barrier(procs)
    workers = [ctx.Process(target=_worker, args=(seconds, ready, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    rates = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return sum(r[0] for r in rates) / 1e9, sum(r[1] for r in rates) / 1e9


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=1.5, help="each phase's length (GEMM, then add)")
    args = p.parse_args(argv)
    print(f"{os.cpu_count()} logical CPUs; torch {torch.__version__}; single-threaded processes at once")
    print("| processes | GEMM GFLOP/s | per process | add GB/s | per process |")
    print("|--:|--:|--:|--:|--:|")
    for n in args.procs:
        g, b = probe(n, args.seconds)
        print(f"| {n} | {g:.0f} | {g / n:.0f} | {b:.1f} | {b / n:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
