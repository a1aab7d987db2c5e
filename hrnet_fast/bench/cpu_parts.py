"""Where the cpu backend's thread scaling is lost: W32's forward timed part by part (stem, the four
stages with their transitions, the head) at several thread counts, Winograd variants and batches.

    python -m hrnet_fast.bench.cpu_parts [--threads 1 4 8 16] [--batch 1 8] [--isa avx2 avx512] [--out DIR]

One process, one optimize()d model; the configurations take turns over --rounds rounds. A part's time
is from the first call into it to the first call into the next (forward hooks on the top-level
modules), so the parts add up to the forward. Printed: median ms per part, and each part's parallel
efficiency against the smallest thread count, t(T0) * T0 / (T * t(T)). Also written as JSON to DIR.
With --profile, the same op by op (scaling_table: each op call timed, at every thread count and batch),
most time lost to imperfect scaling first, written to DIR/cpu_parts_ops.txt.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import hrnet_fast
from hrnet_fast.bench.model import randomize
from hrnet_fast.fused.blocks import ChunkedStage, WinogradBlocks

try:
    import resource  # Unix only: _minor_faults
except ImportError:
    resource = None

# The run-time on/off settings that --fill-team, --fit-team, --own-panels, --four-panels, --side-by-side,
# --model-split, --balance, --lanes, --split and --share-tail compare:
# (column, the op that sets and reads it). --one-op is the modules' own attribute (WinogradBlocks.one_op).
SWITCHES = {
    "fill_team": ("fill", lambda v=None: torch.ops.hrnet_fast.conv3x3_winograd_fill_team(v)),
    "fit_team": ("fit", lambda v=None: torch.ops.hrnet_fast.conv3x3_winograd_fit_team(v)),
    "own_panels": ("own panels", lambda v=None: torch.ops.hrnet_fast.conv3x3_winograd_own_panels(v)),
    "four_panels": ("four panels", lambda v=None: torch.ops.hrnet_fast.conv3x3_winograd_four_panels(v)),
    "side_by_side": ("side by side", lambda v=None: torch.ops.hrnet_fast.winograd_branches_side_by_side(v)),
    "model_split": ("model split", lambda v=None: torch.ops.hrnet_fast.winograd_branches_model_split(v)),
    "balance": ("balance", lambda v=None: torch.ops.hrnet_fast.winograd_branches_balance(v)),
    "lanes": ("lanes", lambda v=None: torch.ops.hrnet_fast.winograd_branches_lanes(v)),
    "split": ("split", lambda v=None: torch.ops.hrnet_fast.winograd_branches_split(v)),
    "share_tail": ("share tail", lambda v=None: torch.ops.hrnet_fast.winograd_branches_share_tail(v)),
}
NAMES = ("fill_team", "fit_team", "own_panels", "four_panels", "one_op", "side_by_side", "model_split", "balance",
         "lanes", "split", "share_tail")  # the columns, in order
WHAT = {
    "fill_team": "the Winograd split's filling of idle threads (conv3x3_winograd_fill_team)",
    "fit_team": "the Winograd split's task counts fitted to teams of 3 and more (conv3x3_winograd_fit_team)",
    "own_panels": "a block of tiles a thread, each transforming every weight panel, where each gets 24 tiles or "
                  "more (conv3x3_winograd_own_panels)",
    "four_panels": "four weight panels a Winograd GEMM call where U is whole before the tasks, else two "
                   "(conv3x3_winograd_four_panels)",
    "one_op": "each branch's BasicBlocks as one op (WinogradBlocks.one_op; a module's branches one winograd_branches "
              "call; off: block by block)",
    "side_by_side": "a module's branches side by side on sub-teams of the threads (winograd_branches_side_by_side)",
    "model_split": "their threads shared by their plans' modelled cost (winograd_branches_model_split; off: by "
                   "their direct convs' multiply-adds)",
    "balance": "their threads shared by what each branch took, searched over the first calls (winograd_branches_balance; "
               "off: by the plans' modelled cost)",
    "lanes": "on 2 threads the branches in two lanes, the last alone (winograd_branches_lanes; with the split off, "
             "four small ones only)",
    "split": "on 2 threads every module's branches in two lanes, the first branch's chain split between them at the "
             "conv that balances them (winograd_branches_split; off: only small ones side by side)",
    "share_tail": "with that split, the chain's convs after it shared by both lanes a task at a time, so they end "
                  "together (winograd_branches_share_tail; off: the second lane runs them alone)",
}

# Forwards before the first round's timed ones, per configuration: at least WARMUP (one-off costs), then
# while a search for the branches' split is still going (BranchBalance: up to 26 calls of a module's
# shapes, and stage 2 is one module a forward), at most MAX_WARMUP.
WARMUP, MAX_WARMUP = 2, 30


def _searching() -> bool:
    """Whether a search for a split between branches side by side has not settled yet."""
    return "searching" in torch.ops.hrnet_fast.winograd_branches_balanced()

PARTS = {"conv1": "stem", "layer1": "stage1", "transition1": "stage2", "stage2": "stage2", "transition2": "stage3",
         "stage3": "stage3", "transition3": "stage4", "stage4": "stage4", "final_layer": "head"}


class PartClock:
    """Timestamps of the first call into each part of one forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.marks: list[tuple[str, float]] = []
        model.register_forward_pre_hook(lambda m, a: self._start())
        model.register_forward_hook(lambda m, a, o: self._mark("end"))
        for name, child in model.named_children():
            if name not in PARTS:
                continue
            # a ModuleList is not called itself: its entries are
            mods = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
            for mod in mods:
                if mod is not None:
                    mod.register_forward_pre_hook(lambda m, a, part=PARTS[name]: self._mark(part))

    def _start(self) -> None:
        self.marks.clear()
        self._mark("stem")

    def _mark(self, part: str) -> None:
        if not self.marks or self.marks[-1][0] != part:
            self.marks.append((part, time.perf_counter()))

    def parts_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (part, t0), (_, t1) in zip(self.marks, self.marks[1:]):
            out[part] = out.get(part, 0.0) + (t1 - t0) * 1e3
        return out


def _is_tensor_list(a: object) -> bool:
    return isinstance(a, (list, tuple)) and len(a) > 0 and all(isinstance(t, torch.Tensor) for t in a)


def _shapes(a: torch.Tensor | list[torch.Tensor]) -> str:
    """"1x32x64x48" for a tensor; a list's shapes in brackets, up to 4 (a module's winograd_branches call:
    its inputs' shapes tell its stage), else its first and its count."""
    if isinstance(a, torch.Tensor):
        return "x".join(map(str, a.shape))
    shapes = ["x".join(map(str, t.shape)) for t in a]
    return "[" + (" ".join(shapes) if len(shapes) <= 4 else f"{shapes[0]} ... ({len(shapes)})") + "]"


class _OpClock:
    """{(op, input shapes): [calls, ms, page faults]} of the ops a forward calls from Python, each timed
    around its call (its parallel region's join included), with the process's minor page faults in it
    (on 16 threads the first transition's conv faulted in its 35 MB of scratch every forward: README,
    "Threads", run 10). A dispatch mode, not torch.profiler: under the profiler stage 1's 1x1 convs took
    2-14 ms a forward more at random (seen on 2 threads, 2026-11-27), which this timing does not show."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                f0 = _minor_faults()
                t0 = time.perf_counter()
                out = func(*args, **(kwargs or {}))
                dt = (time.perf_counter() - t0) * 1e3
                faults = _minor_faults() - f0
                shapes = ",".join(_shapes(a) for a in args if isinstance(a, torch.Tensor) or _is_tensor_list(a))
                cell = ops.setdefault((str(func.overloadpacket), shapes), [0.0, 0.0, 0.0])
                cell[0] += 1
                cell[1] += dt
                cell[2] += faults
                return out

        self.mode = Mode()


def _minor_faults() -> int:
    """The process's minor page faults so far (getrusage; 0 where there is none)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _op_times(model: torch.nn.Module, x: torch.Tensor, forwards: int) -> tuple[dict[tuple[str, str], list[float]], float]:
    """{(op, input shapes): [calls, ms, page faults]} per forward (_OpClock), and the forwards' wall ms each."""
    model(x)
    clock = _OpClock()
    with clock.mode:
        t0 = time.perf_counter()
        for _ in range(forwards):
            model(x)
        wall = (time.perf_counter() - t0) * 1e3 / forwards
    return {k: [v / forwards for v in cell] for k, cell in clock.ops.items()}, wall


def op_scaling(model: torch.nn.Module, x: torch.Tensor, threads: list[int], forwards: int = 3, rows: int = 20) -> str:
    """Where the threads are lost, op by op, at batch x.shape[0]: scaling_table of each op's time at
    every thread count (timed around each call, _OpClock)."""
    times, walls = {}, {}
    with torch.inference_mode():
        for t in threads:
            torch.set_num_threads(t)
            times[t], walls[t] = _op_times(model, x, forwards)
    return scaling_table(times, walls, x.shape[0], rows) + fault_lines(times, x.shape[0])


def fault_lines(times: dict[int, dict[tuple[str, str], list[float]]], batch: int, ops: int = 3) -> str:
    """A line a thread count: the minor page faults a forward's ops took, and the ops that took most
    (those with at least one: a forward in steady state should take none, its memory coming from the
    caching allocator)."""
    lines = []
    for t in sorted(times):
        faulting = sorted(((v[2], k) for k, v in times[t].items() if len(v) > 2 and v[2] >= 0.5), reverse=True)
        top = "; ".join(f"{k[0]} {k[1][:60]}: {n:.0f}" for n, k in faulting[:ops])
        lines.append(f"batch {batch}, {t} threads: {sum(n for n, _ in faulting):.0f} page faults a forward"
                     + (f" ({top})" if top else ""))
    return "\n".join(lines) + "\n"


def scaling_table(times: dict[int, dict[tuple[str, str], list[float]]], walls: dict[int, float], batch: int,
                  rows: int = 20) -> str:
    """Markdown: each op's (by input shapes) ms per forward at every thread count with its parallel
    efficiency against the smallest count T0, and the ms it loses at the largest T against perfect
    scaling, t(T) - t(T0) T0 / T; most lost first, then all ops together and the forward's wall time
    (the rest: Python, and the timing's own ~10 us a call)."""
    threads = sorted(times)
    t0, tn = threads[0], threads[-1]
    keys = set().union(*times.values())

    def ms(t: int, k: tuple[str, str]) -> float:
        return times[t].get(k, [0.0, 0.0])[1]

    def lost(k: tuple[str, str]) -> float:
        return ms(tn, k) - ms(t0, k) * t0 / tn

    def cells(values: dict[int, float]) -> str:
        return " | ".join(f"{values[t]:.2f} ({values[t0] * t0 / (t * values[t]):.0%})" if values[t] > 0 else ""
                          for t in threads)

    lines = [f"\nbatch {batch}: ops by time lost at {tn} threads against perfect scaling from {t0}",
             "| op | input shapes | calls | " + " | ".join(f"{t} thr ms (eff.)" for t in threads) + f" | lost at {tn} ms |",
             "|" + "---|" * (len(threads) + 4)]
    for k in sorted(keys, key=lost, reverse=True)[:rows]:
        calls = max(times[t].get(k, [0.0])[0] for t in threads)
        lines.append(f"| {k[0]} | {k[1][:60]} | {calls:g} | {cells({t: ms(t, k) for t in threads})} | {lost(k):.2f} |")
    total = {t: sum(v[1] for v in times[t].values()) for t in threads}
    lines.append(f"| all ops | | | {cells(total)} | {total[tn] - total[t0] * t0 / tn:.2f} |")
    lines.append(f"| forward (wall) | | | {cells(walls)} | {walls[tn] - walls[t0] * t0 / tn:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--isa", nargs="+", default=["avx2", "avx512"], help="Winograd variants (those this CPU runs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="timed forwards per configuration and round")
    for name in NAMES:  # each "on", "off" or both, taking turns in this process; by default as it is now
        now = "on" if name not in SWITCHES or SWITCHES[name][1]() else "off"
        other = "off" if now == "on" else "on"
        p.add_argument(f"--{name.replace('_', '-')}", nargs="+", choices=("on", "off"), default=[now],
                       help=f"{WHAT[name]}: {now} (the default), {other}, or both, in turns")
    p.add_argument("--chunk-mib", type=int, nargs="+", default=None,
                   help="stage 1's chunk budget (ChunkedStage.CHUNK_BYTES, in MiB; default its own), one or more in turns")
    p.add_argument("--tasks", choices=("on", "off"), default="off",
                   help="optimize's tasks: off (its default: each op splits its own work) or on")
    p.add_argument("--profile", action="store_true",
                   help="also the ops' scaling (each op call timed, a few forwards at each batch and thread count): "
                        "each op's time at every count and what it loses against perfect scaling")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = [t for t in args.threads if t <= cores]
    # the variant and thread count in use before the timing switches between them, put back after it so
    # that the JSON's machine info and anything run later in the process see the CPU's own choice
    default_isa, default_threads = torch.ops.hrnet_fast.cpu_isa(), torch.get_num_threads()
    defaults = {name: op() for name, (_, op) in SWITCHES.items()}
    try:
        return _run(args, threads, cores, default_isa)
    finally:
        torch.ops.hrnet_fast.cpu_isa(default_isa)
        for name, (_, op) in SWITCHES.items():
            op(defaults[name])
        torch.set_num_threads(default_threads)


def _run(args: argparse.Namespace, threads: list[int], cores: int, default_isa: str) -> int:
    """main's work once the arguments are read: time, print, write; the variant switched per config."""
    isas = []
    for isa in args.isa:
        try:
            torch.ops.hrnet_fast.cpu_isa(isa)
            isas.append(isa)
        except RuntimeError as e:
            print(f"{isa} left out: {str(e).splitlines()[0]}")
    if not threads or not isas:
        print(f"nothing to time: thread counts {args.threads} on {cores} cores, variants {args.isa}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    tasks = args.tasks == "on"
    # the weights `hrnet-fast bench` times (He-normal, calibrated BN), so the two agree on what is timed
    # Python forwards (cpu_graph=False): the parts are timed by hooks on the top-level modules, which a
    # CPU-graph replay does not call, so the totals here lack the graphs' gain (README, "CPU graphs")
    model = hrnet_fast.optimize(randomize(hrnet_fast.pose_hrnet_w32().eval(), (256, 192)), backend="cpu", tasks=tasks,
                                cpu_graph=False)
    clock = PartClock(model)
    xs = {b: torch.randn(b, 3, 256, 192) for b in args.batch}
    # the switches' settings to compare, one tuple of "on"/"off" in NAMES' order each
    # and stage 1's chunk budgets (MiB) as the last setting
    stages = [m for m in model.modules() if isinstance(m, ChunkedStage)]
    chunks = list(dict.fromkeys(args.chunk_mib or [ChunkedStage.CHUNK_BYTES >> 20]))
    switches = list(itertools.product(*(dict.fromkeys(getattr(args, name)) for name in NAMES), chunks))
    configs = [(t, isa, b, sw) for b in args.batch for t in threads for isa in isas for sw in switches]
    branches = [m for m in model.modules() if isinstance(m, WinogradBlocks)]

    def switch(*settings: str | int) -> None:
        for name, on in zip(NAMES, settings):
            if name in SWITCHES:
                SWITCHES[name][1](on == "on")
        for m in branches:
            m.one_op = settings[NAMES.index("one_op")] == "on"
        for m in stages:  # an instance's own budget, or the class's where it is the default
            m.__dict__.pop("CHUNK_BYTES", None)
            if int(settings[len(NAMES)]) << 20 != ChunkedStage.CHUNK_BYTES:
                m.CHUNK_BYTES = int(settings[len(NAMES)]) << 20

    samples: dict[tuple, list[dict[str, float]]] = {c: [] for c in configs}
    with torch.inference_mode():
        for r in range(args.rounds):
            for t, isa, b, sw in configs:
                torch.set_num_threads(t)
                torch.ops.hrnet_fast.cpu_isa(isa)
                switch(*sw)
                if r == 0:  # warm-up: one-off costs, and the branches' split searched
                    for k in range(MAX_WARMUP):
                        if k >= WARMUP and not _searching():
                            break
                        model(xs[b])
                for _ in range(args.runs):
                    model(xs[b])
                    samples[(t, isa, b, sw)].append(clock.parts_ms())
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    # the op table below, and the JSON, at the CPU's own variant and the default split
    torch.ops.hrnet_fast.cpu_isa(default_isa)
    switch(*["on"] * len(NAMES), ChunkedStage.CHUNK_BYTES >> 20)
    rows = []
    for (t, isa, b, sw), runs in samples.items():
        med = {part: statistics.median(s[part] for s in runs) for part in runs[0]}
        med["total"] = statistics.median(sum(s.values()) for s in runs)
        rows.append({"threads": t, "isa": isa, "batch": b, **dict(zip(NAMES, sw)), "chunk_mib": sw[-1], "ms": med})
    base = min(threads)
    variant = ("isa", "batch", *NAMES, "chunk_mib")
    ref = {tuple(r[k] for k in variant): r["ms"] for r in rows if r["threads"] == base}
    parts = list(rows[0]["ms"])
    print(f"\nW32 256x192 cpu backend (tasks {args.tasks}), median ms per part (parallel efficiency against {base} thread(s))")
    heads = [SWITCHES[n][0] if n in SWITCHES else n.replace("_", " ") for n in NAMES] + ["chunk MiB"]
    print("| batch | isa | " + " | ".join(heads) + " | threads | " + " | ".join(parts) + " |")
    print("|" + "---|" * (len(parts) + len(NAMES) + 4))
    for r in rows:
        base_ms = ref[tuple(r[k] for k in variant)]
        cells = [f"{r['ms'][k]:.1f} ({base_ms[k] * base / (r['threads'] * r['ms'][k]):.0%})" for k in parts]
        print(f"| {r['batch']} | {r['isa']} | " + " | ".join(r[n] for n in NAMES) + f" | {r['chunk_mib']} | {r['threads']} | "
              + " | ".join(cells) + " |")
    print("\nThe branches' splits searched (threads, then per branch N, C, H, W, convs, tile: each candidate "
          "split with its median slowest branch against the base's, and whether it was kept):")
    print(torch.ops.hrnet_fast.winograd_branches_balanced())
    tables = "".join(op_scaling(model, xs[b], sorted(threads)) for b in args.batch) if args.profile and len(threads) > 1 else ""
    print(tables)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        from hrnet_fast.bench.record import machine_info

        if tables:
            (args.out / "cpu_parts_ops.txt").write_text(tables)

        (args.out / "cpu_parts.json").write_text(json.dumps({"device": machine_info(), "tasks": args.tasks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
