"""Where the cpu backend's thread scaling is lost: W32's forward timed part by part (stem, the four
stages with their transitions, the head) at several thread counts, Winograd variants and batches.

    python -m hrnet_fast.bench.cpu_parts [--threads 1 4 8 16] [--batch 1 8] [--isa avx2 avx512] [--out DIR]

One process, one optimize()d model; the configurations take turns over --rounds rounds. A part's time
is from the first call into it to the first call into the next (forward hooks on the top-level
modules), so the parts add up to the forward. Printed: median ms per part, and each part's parallel
efficiency against the smallest thread count, t(T0) * T0 / (T * t(T)). Also written as JSON to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import hrnet_fast
from hrnet_fast.bench.model import randomize

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


def profile_ops(model: torch.nn.Module, x: torch.Tensor, threads: list[int]) -> str:
    """Per thread count, torch.profiler's table of one forward's ops by input shape, most self CPU time
    first. Under the profiler task chains run one after another (cpu_tasks), so with tasks on this
    shows each op split on its own."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    with torch.inference_mode():
        for t in threads:
            torch.set_num_threads(t)
            model(x)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                model(x)
            table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15)
            out.append(f"\n{t} threads, batch {x.shape[0]}:\n{table}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--isa", nargs="+", default=["avx2", "avx512"], help="Winograd variants (those this CPU runs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="timed forwards per configuration and round")
    p.add_argument("--tasks", choices=("on", "off"), default="off",
                   help="optimize's tasks: off (its default: each op splits its own work) or on")
    p.add_argument("--profile", action="store_true",
                   help="also an op table (torch.profiler, one forward at the largest batch) at the two largest "
                        "thread counts, to see which ops lose where a part stops scaling")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = [t for t in args.threads if t <= cores]
    # the variant and thread count in use before the timing switches between them, put back after it so
    # that the JSON's machine info and anything run later in the process see the CPU's own choice
    default_isa, default_threads = torch.ops.hrnet_fast.cpu_isa(), torch.get_num_threads()
    try:
        return _run(args, threads, cores, default_isa)
    finally:
        torch.ops.hrnet_fast.cpu_isa(default_isa)
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
    configs = [(t, isa, b) for b in args.batch for t in threads for isa in isas]
    samples: dict[tuple, list[dict[str, float]]] = {c: [] for c in configs}
    with torch.inference_mode():
        for r in range(args.rounds):
            for t, isa, b in configs:
                torch.set_num_threads(t)
                torch.ops.hrnet_fast.cpu_isa(isa)
                for k in range(args.runs + (2 if r == 0 else 0)):
                    model(xs[b])
                    if r or k >= 2:  # the first round's first two forwards warm up
                        samples[(t, isa, b)].append(clock.parts_ms())
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    torch.ops.hrnet_fast.cpu_isa(default_isa)  # the op table below, and the JSON, at the CPU's own variant
    rows = []
    for (t, isa, b), runs in samples.items():
        med = {part: statistics.median(s[part] for s in runs) for part in runs[0]}
        med["total"] = statistics.median(sum(s.values()) for s in runs)
        rows.append({"threads": t, "isa": isa, "batch": b, "ms": med})
    base = min(threads)
    ref = {(r["isa"], r["batch"]): r["ms"] for r in rows if r["threads"] == base}
    parts = list(rows[0]["ms"])
    print(f"\nW32 256x192 cpu backend (tasks {args.tasks}), median ms per part (parallel efficiency against {base} thread(s))")
    print("| batch | isa | threads | " + " | ".join(parts) + " |")
    print("|" + "---|" * (len(parts) + 3))
    for r in rows:
        base_ms = ref[(r["isa"], r["batch"])]
        cells = [f"{r['ms'][k]:.1f} ({base_ms[k] * base / (r['threads'] * r['ms'][k]):.0%})" for k in parts]
        print(f"| {r['batch']} | {r['isa']} | {r['threads']} | " + " | ".join(cells) + " |")
    tables = profile_ops(model, xs[max(args.batch)], sorted(threads)[-2:]) if args.profile else ""
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
