"""Where a GPU forward's time goes: torch.profiler's kernel table for eager and each hrnet_fast backend.

    python -m hrnet_fast.bench.kernel_profile --batch 1 64 --dtype float16 --out profile.txt

For each (contender, batch): kernels launched per forward, summed GPU kernel time per forward, the
wall time per forward (host included), and the kernels that take the most GPU time (for cuDNN:
which kernels it chose). The same seeded W32 model as `hrnet-fast bench`.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hrnet_fast.bench import contenders as C
from hrnet_fast.bench.model import build_model, randomize

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def profile_forward(fn: Callable[[], Any], iters: int = 5, row_limit: int = 12) -> dict[str, Any]:
    """Kernels and GPU time per forward of fn (after warm-up), and the table of the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels) / iters
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=row_limit, max_name_column_width=70)
    return {"kernels_per_forward": len(kernels) / iters, "gpu_ms": gpu_us / 1e3, "wall_ms": wall_ms, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hrnet_fast.bench.kernel_profile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="w32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.add_argument("--contenders", default="eager,eager_cl,hrnet_fast_cuda,hrnet_fast_cuda_streams,hrnet_fast_triton")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in C.CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; choose from {','.join(C.CONTENDERS)}")
    if not torch.cuda.is_available():
        print("kernel_profile: error: needs a CUDA device", file=sys.stderr)
        return 2
    size = (256, 192)
    model = randomize(build_model(args.model), size, seed=0).cuda()
    dtype = DTYPES[args.dtype]
    eager = copy.deepcopy(model).to(dtype)
    lines: list[str] = []
    summary: list[str] = []
    with C.make_workdir() as workdir:
        for batch in args.batch:
            x = torch.randn(batch, 3, *size, device="cuda", dtype=dtype)
            ctx = C.Context(eager, model, x, dtype, torch.get_num_threads(), Path(workdir))
            for name in names:
                try:
                    prep = C.CONTENDERS[name](ctx)  # the same preparation as `hrnet-fast bench`
                except C.Skip as e:
                    summary.append(f"{name} batch {batch}: skipped ({e})")
                    continue
                r = profile_forward(prep)
                head = (f"{name} batch {batch} {args.dtype}: {r['kernels_per_forward']:.0f} kernels/forward, "
                        f"GPU {r['gpu_ms']:.3f} ms/forward, wall {r['wall_ms']:.3f} ms/forward")
                summary.append(head)
                lines += ["=" * len(head), head, r["table"]]
    report = "\n".join(lines + ["", "summary:"] + summary)
    print(report)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
