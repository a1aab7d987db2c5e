"""The threads' split between an HR module's branches side by side, on more threads than this machine has.

winograd_branches runs W32's branches side by side on shares of the threads; a split is as fast as its
slowest branch, and a branch on t threads as its slowest thread's share of each conv. This times every
share, one after another on one core (torch.ops.hrnet_fast.conv3x3_winograd_thread_times), of each of
W32's four branch convs planned for 1 to --most threads, and compares for W32's modules of 2, 3 and 4
branches: the split by multiply-adds (equal for W32: 4 each of 16), the split the extension uses
(winograd_branches_plan: the plans' modelled cost, csrc/cpu/branch_split.cpp), and the best split by
these times. One core sees each share's own work, not what many cores share (memory bandwidth, the
caches, reading what other cores wrote), so these are what the splits leave idle, not a forecast.

    .venv/bin/python benchmarks/bench_branch_split.py [--batch 1 8] [--threads 8 12 16 24 32] [--out f.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

import hrnet_fast  # noqa: F401  (loads the extension's ops)
from hrnet_fast.ops.winograd import choose_tile

W32 = [(32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6)]  # each branch's C, H, W at 256x192


def share_times(batch: int, most: int, repeats: int) -> dict[int, list[float]]:
    """Per branch (by channels), the slowest share's time (us) of one of its convs on 1..most threads."""
    torch.manual_seed(0)
    out = {}
    for c, h, w in W32:
        x, weight = torch.randn(batch, c, h, w), torch.randn(c, c, 3, 3) * 0.05
        tile = choose_tile(x.shape, c)
        out[c] = [max(torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, weight, tile, t, repeats))
                  for t in range(1, most + 1)]
    return out


def splits(threads: int, parts: int):
    """Every split of `threads` into `parts` shares of at least one."""
    for cuts in itertools.combinations(range(1, threads), parts - 1):
        yield [b - a for a, b in zip((0, *cuts), (*cuts, threads))]


def span(xs: list[float]) -> str:
    """Speed-ups over the sets: their median and range, as 1.14x or 1.14x (1.12-1.16)."""
    mid, lo, hi = f"{statistics.median(xs):.2f}", f"{min(xs):.2f}", f"{max(xs):.2f}"
    return f"{mid}x" if lo == hi else f"{mid}x ({lo}-{hi})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    p.add_argument("--repeats", type=int, default=15, help="runs of each conv; each share's median")
    p.add_argument("--sets", type=int, default=5,
                   help="independent sets of those times; each speed-up's median and range over them")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    most = max(args.threads)
    record = []
    print("| batch | branches | threads | by multiply-adds | ours | speed-up | best by these times | speed-up |")
    print("|--:|--:|--:|---|---|--:|---|--:|")
    for batch in args.batch:
        sets = [share_times(batch, most, args.repeats) for _ in range(args.sets)]
        for nb in (4, 3, 2):
            shapes = W32[:nb]
            sizes = [[batch, c, h, w] for c, h, w in shapes]
            tiles = [choose_tile(s, s[1]) for s in sizes]
            for threads in args.threads:
                if threads < 2 * nb:
                    continue
                plan = torch.ops.hrnet_fast.winograd_branches_plan
                switch = torch.ops.hrnet_fast.winograd_branches_model_split
                before = switch()
                switch(False)
                by_macs = plan(sizes, [8] * nb, threads, tiles)
                switch(before)
                ours = plan(sizes, [8] * nb, threads, tiles)
                row = {"batch": batch, "branches": nb, "threads": threads, "by_macs": by_macs, "ours": ours, "sets": []}
                for times in sets:
                    def slowest(split: list[int], times=times) -> float:
                        return max(times[c][t - 1] for (c, _, _), t in zip(shapes, split))
                    best = min(splits(threads, nb), key=slowest)
                    row["sets"].append({"us": [slowest(by_macs), slowest(ours), slowest(best)], "best": best})
                record.append(row)
                ours_x = [s["us"][0] / s["us"][1] for s in row["sets"]]
                best_x = [s["us"][0] / s["us"][2] for s in row["sets"]]
                bests = sorted({str(s["best"]) for s in row["sets"]})
                print(f"| {batch} | {nb} | {threads} | {by_macs} | {ours} | {span(ours_x)} | {', '.join(bests)} "
                      f"| {span(best_x)} |")
    if args.out:
        args.out.write_text(json.dumps({"us": "the slowest branch's slowest share, one core: by multiply-adds, "
                                              "ours, best", "rows": record}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
