"""CPU thread scaling: `hrnet-fast bench --device cpu` at several thread counts, and the table.

    python -m hrnet_fast.bench.cpu_threads --out DIR [--threads 1 4 8 16] [--batch 1 8]

One `hrnet-fast bench` process per thread count (torch's and ONNX Runtime's intra-op threads both set
to it), W32 256x192 float32, eager / torch.compile / ONNX Runtime / hrnet_fast `cpu` side by side in
each (hrnet_fast first). Each run's JSON goes to DIR/threads_<T>/; the table (median ms per contender, hrnet_fast's
lead over ONNX Runtime, and each contender's parallel efficiency t_1 / (T t_T) against the smallest
thread count run) is printed and written to DIR/cpu_threads.md. A thread count above the machine's
cores is left out with a note. The ONNX model is exported once per batch size and reused by every thread
count (`--onnx-cache` in a temporary folder). `make gpu-check` runs it on the GPU machine's 16 cores (step
cpu_threads): this project's own machine has 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

CONTENDERS = "hrnet_fast_cpu,hrnet_fast_cpu_serial,onnxruntime,compile,eager"


def run(out: Path, threads: Sequence[int], batches: Sequence[int], min_run_time: float, python: str) -> dict[int, list[dict]]:
    """Rows of each thread count's bench run (thread counts past the core count are skipped)."""
    cores = os.cpu_count() or 1
    rows: dict[int, list[dict]] = {}
    # The ONNX export (~15 s a batch size for W32) once for all thread counts; kept out of `out`, which
    # the GPU machine sends back
    with tempfile.TemporaryDirectory(prefix="hrnet_fast_onnx_") as onnx_cache:
        for t in threads:
            if t > cores:
                print(f"cpu_threads: {t} threads left out: this machine has {cores} cores", flush=True)
                continue
            folder = out / f"threads_{t}"
            cmd = [python, "-m", "hrnet_fast.cli", "bench", "--device", "cpu", "--threads", str(t), "--batch",
                   *map(str, batches), "--contenders", CONTENDERS, "--min-run-time", str(min_run_time), "--rounds", "2",
                   "--no-progress", "--out", str(folder), "--onnx-cache", onnx_cache]
            print("cpu_threads:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            (doc,) = [json.loads(p.read_text()) for p in folder.glob("model_*.json")]
            rows[t] = doc["rows"]
    return rows


def table(rows: dict[int, list[dict]]) -> str:
    """Markdown: per batch and thread count, each contender's median ms and parallel efficiency."""
    if not rows:
        return "no thread count ran\n"
    base_t = min(rows)
    ms = {(t, r["batch"], r["contender"]): r["median_ms"] for t, rs in rows.items() for r in rs if r.get("median_ms")}
    names = [c for c in CONTENDERS.split(",") if any(k[2] == c for k in ms)]
    lines = [
        f"| batch | threads | {' | '.join(f'{c} ms (eff.)' for c in names)} | hrnet_fast vs ONNX Runtime |",
        "|" + "---|" * (len(names) + 3),
    ]
    for b in sorted({k[1] for k in ms}):
        for t in sorted(rows):
            cells = []
            for c in names:
                v, v1 = ms.get((t, b, c)), ms.get((base_t, b, c))
                cells.append("" if v is None else f"{v:.1f} ({v1 * base_t / (t * v):.0%})" if v1 else f"{v:.1f}")
            ours, ort = ms.get((t, b, "hrnet_fast_cpu")), ms.get((t, b, "onnxruntime"))
            lead = f"{ort / ours:.2f}x" if ours and ort else ""
            lines.append(f"| {b} | {t} | {' | '.join(cells)} | {lead} |")
    return "\n".join(lines) + f"\n\neff.: parallel efficiency, t({base_t}) * {base_t} / (T * t(T)).\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(run(args.out, args.threads, args.batch, args.min_run_time, args.python))
    (args.out / "cpu_threads.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
