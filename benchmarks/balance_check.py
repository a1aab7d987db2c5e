"""W32 forwards with the branches' measured split switched on (csrc/cpu/branch_balance.cpp), against eager:
the check for the 16-core fault of the GPU machine's Xeon (benchmarks/GPU-NOTES.md, run 11), where the
search, now off by default, died in winograd_branches within three forwards. Prints each forward's
largest difference from eager and, at the end, every search's record; a fault shows as faulthandler's
traceback (and, under gdb or ASan, the native one: benchmarks/gpu_run.sh's `balance` step).

    python benchmarks/balance_check.py --threads 16 --batch 1 8 --forwards 12 --cpu-graph off on
"""
from __future__ import annotations

import argparse
import faulthandler
import time

import torch

import hrnet_fast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--forwards", type=int, default=12, help="forwards of each optimized copy")
    p.add_argument("--cpu-graph", nargs="+", choices=["on", "off"], default=["off", "on"])
    p.add_argument("--balance", choices=["on", "off"], default="on", help="the measured split (off: the control)")
    args = p.parse_args()
    faulthandler.enable()
    torch.set_num_threads(args.threads)
    torch.ops.hrnet_fast.winograd_branches_balance(args.balance == "on")
    torch.manual_seed(0)
    model = hrnet_fast.pose_hrnet_w32().eval()
    print(f"threads {torch.get_num_threads()}, balance {args.balance}, cpu variant "
          f"{torch.ops.hrnet_fast.cpu_isa()}", flush=True)
    with torch.no_grad():
        for batch in args.batch:
            x = torch.randn(batch, 3, 256, 192)
            ref = model(x)
            scale = ref.abs().max().item()
            for graph in args.cpu_graph:
                torch.ops.hrnet_fast.winograd_branches_balance_reset()
                fused = hrnet_fast.optimize(model, cpu_graph=graph == "on")
                for i in range(args.forwards):
                    t = time.perf_counter()
                    out = fused(x)
                    ms = (time.perf_counter() - t) * 1e3
                    diff = (out - ref).abs().max().item()
                    print(f"batch {batch} cpu_graph {graph} forward {i}: {ms:.1f} ms, max diff {diff:.2e}"
                          f"{'' if diff <= 1e-4 * scale else '  BEYOND 1e-4'}", flush=True)
                print(torch.ops.hrnet_fast.winograd_branches_balanced(), flush=True)
                del fused
    print("balance_check: done", flush=True)


if __name__ == "__main__":
    main()
