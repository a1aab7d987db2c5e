"""Where ONNX Runtime is faster or slower than ours: W32's forward part by part (stem, the four stages
with their transitions, the head) for eager, the cpu backend and ONNX Runtime, on the CPU.

    python -m hrnet_fast.bench.ort_parts [--threads 2] [--batch 1 8] [--rounds 5] [--detail]

Ours and eager are timed by cpu_parts' PartClock (hooks on the top-level modules, Python forwards),
ONNX Runtime by its own profiler: each node's kernel time, summed by the part of the model it came
from. The exporter names the ONNX graph's values after torch.export's nodes, whose nn_module_stack
says which module made them, and ONNX Runtime's fused nodes keep the name of their last output
(`relu_14` runs as `relu_14_nchwc`), so each node's time goes to the module of its output: a conv, its
folded BN and its ReLU, fused into one node, all count for that module. ONNX Runtime's times are its
kernels' only (no graph overhead), so its totals run a little under its wall time. --detail also
prints ONNX Runtime's time per module below the parts (each branch and fuse layer of the HR modules).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import hrnet_fast
from hrnet_fast.bench.contenders import _export_into, ort_session_options
from hrnet_fast.bench.cpu_parts import PARTS, PartClock
from hrnet_fast.bench.model import randomize

# the stem's modules besides conv1 (which PARTS names): the pose net's forward calls them before layer1
STEM = ("bn1", "relu", "conv2", "bn2")


def module_of_values(model: nn.Module, x: torch.Tensor, output_names: tuple[str, ...] = ("y",)) -> dict[str, str]:
    """{value name in the exported graph: dotted path of the module that made it} for `model` on `x`,
    from torch.export after the exporter's decompositions (whose node names the ONNX graph keeps; the
    outputs take the names the export gave them, contenders._export_into's "y")."""
    ep = torch.export.export(copy.deepcopy(model), (x,), strict=False).run_decompositions()
    out = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            out[node.name] = list(stack.values())[-1][0]
        if node.op == "output":
            results = [a for a in torch.utils._pytree.tree_leaves(node.args) if isinstance(a, torch.fx.Node)]
            for name, value in zip(output_names, results):
                if value.name in out:
                    out[name] = out[value.name]
    return out


def part_of(path: str) -> str:
    """The part (cpu_parts.PARTS' names) a module path belongs to; "other" for none."""
    top = path.split(".")[0]
    return "stem" if top in STEM else PARTS.get(top, "other")


def node_value(node: str) -> str:
    """The graph value an ONNX Runtime node is named after: `relu_14_nchwc` -> `relu_14`,
    `node_add_12` -> `add_12`."""
    return re.sub(r"_nchwc$", "", re.sub(r"^node_", "", node))


def ort_module_ms(path: Path, x: torch.Tensor, threads: int, runs: int, modules: dict[str, str]) -> dict[str, float]:
    """ONNX Runtime's kernel ms per forward by module path (modules: module_of_values), over `runs`
    profiled runs after two that warm up; nodes of no module under "(none)"."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort_session_options(threads)  # as the bench runs it, profiled
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        for _ in range(2 + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first = starts[2]  # the warm-up runs' nodes are left out
    ms: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            mod = modules.get(node_value(e["name"][: -len("_kernel_time")]), "(none)")
            ms[mod] = ms.get(mod, 0.0) + e["dur"] / 1e3 / runs
    return ms


def by_part(module_ms: dict[str, float]) -> dict[str, float]:
    """module_ms summed by part."""
    out: dict[str, float] = {}
    for mod, ms in module_ms.items():
        part = part_of(mod) if mod != "(none)" else "other"
        out[part] = out.get(part, 0.0) + ms
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5, help="forwards of each contender, in turns")
    p.add_argument("--detail", action="store_true", help="also ONNX Runtime's ms per module")
    args = p.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed (pip install onnxruntime)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the weights `hrnet-fast bench` times (He-normal, calibrated BN)
    eager = randomize(hrnet_fast.pose_hrnet_w32().eval(), (256, 192))
    ours = hrnet_fast.optimize(copy.deepcopy(eager), backend="cpu", cpu_graph=False)
    clocks = {"eager": PartClock(eager), "ours": PartClock(ours)}
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batch:
            x = torch.randn(b, 3, 256, 192)
            modules = module_of_values(eager, x)
            path = _export_into(eager, x, Path(tmp) / f"b{b}")
            ort_ms = ort_module_ms(path, x, args.threads, args.rounds, modules)
            samples: dict[str, list[dict[str, float]]] = {"eager": [], "ours": []}
            with torch.inference_mode():
                for name, model in (("eager", eager), ("ours", ours)):
                    model(x)
                for _ in range(args.rounds):
                    for name, model in (("eager", eager), ("ours", ours)):
                        model(x)
                        samples[name].append(clocks[name].parts_ms())
            med = {name: {part: statistics.median(s[part] for s in runs) for part in runs[0]}
                   for name, runs in samples.items()}
            ort = by_part(ort_ms)
            parts = list(med["ours"]) + sorted(set(ort) - set(med["ours"]))
            print(f"\nW32 256x192, batch {b}, {args.threads} thread(s): median ms per part (ours and eager: Python "
                  f"forwards, cpu_graph=False; ONNX Runtime: its kernels' time)")
            print("| part | eager | ours | ONNX Runtime | ONNX Runtime / ours |")
            print("|---|--:|--:|--:|--:|")
            for part in [*parts, "total"]:
                e, o, r = ((sum(d.values()) if part == "total" else d.get(part, 0.0))
                           for d in (med["eager"], med["ours"], ort))
                print(f"| {part} | {e:.1f} | {o:.1f} | {r:.1f} | {r / o:.2f} |" if o else f"| {part} | {e:.1f} | | {r:.1f} | |")
            if args.detail:
                print("\n| ONNX Runtime module | ms |\n|---|--:|")
                for mod, ms in ort_ms.items():
                    print(f"| {mod} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
