"""The Winograd plans fitted to teams of 3 and more threads (conv3x3_winograd_fit_team), on one core.

plan_winograd's task counts used to leave threads idle on teams of 3 to 15 (tasks between one and two a
thread: some threads took two, others none), and split W32's 64-channel 32x24 conv by channels on 3 and
4 threads. `conv3x3_winograd_fit_team` switches the fitted plans on and off. This times each thread's
share of each conv both ways, one after another on one core (conv3x3_winograd_thread_times), with the
caches as the shares before left them (warm) and evicted before each share (cold: each share's data
from L3 at best), and prints, for W32's (and --widths') branch convs and transition conv on 3 to 16
threads, each plan that changes and its slowest share both ways; then, for W32's modules of 2 to 4
branches side by side, the slowest branch under each way's own split of the threads
(winograd_branches_plan) and plans. One core sees each share's own work, not what many cores share,
so these say what the plans leave idle, not what 16 cores will take.

    .venv/bin/python benchmarks/bench_fit_team.py [--batch 1 8] [--threads 3 4 6 8 12 16] [--out f.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch

import hrnet_fast  # noqa: F401  (loads the extension's ops)
from hrnet_fast.ops.winograd import choose_tile

OPS = torch.ops.hrnet_fast
EVICT = 4 << 20  # bytes streamed before each share in the cold runs: 2x the largest L2 here


def convs(width: int) -> list[tuple[int, int, int, int]]:
    """(C_in, C_out, H, W) of a width's branch convs at 256x192, and its transition's 256 -> width conv."""
    return [(width << i, width << i, 64 >> i, 48 >> i) for i in range(4)] + [(256, width, 64, 48)]


@contextlib.contextmanager
def fitted(on: bool):
    """conv3x3_winograd_fit_team set to `on` inside, put back after."""
    before = OPS.conv3x3_winograd_fit_team(on)
    try:
        yield
    finally:
        OPS.conv3x3_winograd_fit_team(before)


def shares(x: torch.Tensor, w: torch.Tensor, tile: int, threads: int, fit: bool, repeats: int) -> tuple[float, float]:
    """The slowest share (us) of the conv planned for `threads`, fit_team on or off: (warm, cold)."""
    with fitted(fit):
        return (max(OPS.conv3x3_winograd_thread_times(x, w, tile, threads, repeats)),
                max(OPS.conv3x3_winograd_thread_times(x, w, tile, threads, repeats, None, EVICT)))


def plan(size: list[int], c_out: int, tile: int, threads: int, fit: bool) -> list[int]:
    with fitted(fit):
        return list(OPS.conv3x3_winograd_plan(size, c_out, tile, True, threads)[:6])


def timed(batch: int, cin: int, cout: int, h: int, w: int, teams: list[int], rounds: int, repeats: int) -> dict:
    """Per team size: the plans (off, on) and their slowest shares ((warm, cold) each), both ways in
    turns where the plans differ, once where they do not."""
    x, weight = torch.randn(batch, cin, h, w), torch.randn(cout, cin, 3, 3) * 0.05
    tile = choose_tile(x.shape, cout)
    out = {}
    for t in teams:
        plans = [plan([batch, cin, h, w], cout, tile, t, fit) for fit in (False, True)]
        ways = (False, True) if plans[0] != plans[1] else (True,)
        runs = [[shares(x, weight, tile, t, fit, repeats) for fit in ways] for _ in range(rounds)]
        us = [[statistics.median(r[k][c] for r in runs) for c in (0, 1)] for k in range(len(ways))]
        out[t] = {"tile": tile, "plans": plans, "us": us if len(us) == 2 else us * 2}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--widths", type=int, nargs="+", default=[32])
    p.add_argument("--threads", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8, 10, 12, 16])
    p.add_argument("--modules", type=int, nargs="+", default=[8, 12, 16, 24],
                   help="thread counts for the first width's modules side by side")
    p.add_argument("--repeats", type=int, default=5, help="runs of each conv; each share's median")
    p.add_argument("--rounds", type=int, default=3, help="both ways in turns; the median of the rounds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    record: dict = {"us": "the slowest share on one core, [warm, cold], fit_team off then on", "convs": [],
                    "modules": []}
    print("| batch | conv | threads | plan before | plan | before, warm / cold (us) | fitted | speed-up |")
    print("|--:|---|--:|---|---|--:|--:|--:|")
    mods = []
    for batch in args.batch:
        for width in args.widths:
            branch_teams = list(range(2, max(args.modules) + 1)) if width == args.widths[0] else []
            for cin, cout, h, w in convs(width):
                teams = sorted(set(args.threads) | (set(branch_teams) if cin == cout else set()))
                times = timed(batch, cin, cout, h, w, teams, args.rounds, args.repeats)
                for t in args.threads:
                    e = times[t]
                    if e["plans"][0] == e["plans"][1]:
                        continue
                    off, on = e["us"]
                    record["convs"].append({"batch": batch, "conv": [cin, cout, h, w], "threads": t, **e})
                    print(f"| {batch} | {cin}->{cout} {h}x{w} F({e['tile']}x{e['tile']}) | {t} | {e['plans'][0]} "
                          f"| {e['plans'][1]} | {off[0]:.0f} / {off[1]:.0f} | {on[0]:.0f} / {on[1]:.0f} "
                          f"| {off[0] / on[0]:.2f}x / {off[1] / on[1]:.2f}x |", flush=True)
                if branch_teams and cin == cout:
                    mods.append((batch, cin, times))
    print("\n| batch | branches | threads | split before | split | slowest branch before, warm / cold (us) "
          "| fitted | speed-up |")
    print("|--:|--:|--:|---|---|--:|--:|--:|")
    width = args.widths[0]
    for batch in args.batch:
        times = {c: t for b, c, t in mods if b == batch}
        for nb in (2, 3, 4):
            sizes = [[batch, width << i, 64 >> i, 48 >> i] for i in range(nb)]
            tiles = [choose_tile(s, s[1]) for s in sizes]
            for threads in args.modules:
                if threads < 2 * nb:
                    continue
                split = []
                for fit in (False, True):
                    with fitted(fit):
                        split.append(OPS.winograd_branches_plan(sizes, [8] * nb, threads, tiles))
                slow = [[max(times[s[1]][t]["us"][way][c] for s, t in zip(sizes, split[way])) for c in (0, 1)]
                        for way in (0, 1)]
                record["modules"].append({"batch": batch, "branches": nb, "threads": threads, "splits": split,
                                          "us": slow})
                print(f"| {batch} | {nb} | {threads} | {split[0]} | {split[1]} | {slow[0][0]:.0f} / {slow[0][1]:.0f} "
                      f"| {slow[1][0]:.0f} / {slow[1][1]:.0f} | {slow[0][0] / slow[1][0]:.2f}x / "
                      f"{slow[0][1] / slow[1][1]:.2f}x |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
