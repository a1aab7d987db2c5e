"""CPU thread scaling: `hrnet-fast bench --device cpu` at several thread counts, and the table.

    python -m hrnet_fast.bench.cpu_threads --out DIR [--threads 1 4 8 16] [--batch 1 8]

One `hrnet-fast bench` process per thread count (torch's and ONNX Runtime's intra-op threads both set
to it), W32 256x192 float32, eager / torch.compile / ONNX Runtime / hrnet_fast `cpu` side by side in
each (hrnet_fast first). Each run's JSON goes to DIR/threads_<T>/; the table (median ms per contender, hrnet_fast's
lead over ONNX Runtime, and each contender's parallel efficiency t_1 / (T t_T) against the smallest
thread count run) is printed and written to DIR/cpu_threads.md. A thread count above the machine's
cores is left out with a note. The ONNX model is exported once per batch size and reused by every thread
count (`--onnx-cache` in a temporary folder). Before any timing, throwaway bench runs side by side
(unless `--no-prewarm`) export those models and fill torch.compile's cache for every thread count and
batch: Inductor's CPU code is specialised on the thread count, so each count compiles anew. On the GPU
machine (16 cores) the eight cold compiles and two exports of `--threads 1 4 8 16` took 308 s side by
side, against ~45 s a compile and ~50 s an export alone: about a third saved, and still most of a call,
so give that table two calls (`--threads 1 16`, then `--threads 4 8`). `make gpu-check` runs it on the
GPU machine's 16 cores (step cpu_threads): this project's own machine has 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# no_graph: the Python forward beside the CPU-graph replay, whose gain grows with the thread count
CONTENDERS = "hrnet_fast_cpu,hrnet_fast_cpu_no_graph,hrnet_fast_cpu_tasks,onnxruntime,compile,eager"


def contenders_at(threads: int, compile_threads: Collection[int] | None = None) -> str:
    """The contenders at a thread count: `hrnet_fast_cpu_tasks` (optimize(tasks=True)) only up to
    cpu_tasks.POOL_FREE_THREADS, where its workers start no OpenMP pools (the bench would skip it above);
    torch.compile only at the counts in `compile_threads` (None: every count), since each count is a
    cold compile of its own."""
    from hrnet_fast.fused.cpu_tasks import POOL_FREE_THREADS

    names = CONTENDERS.split(",")
    return ",".join(n for n in names if (n != "hrnet_fast_cpu_tasks" or threads <= POOL_FREE_THREADS)
                    and (n != "compile" or compile_threads is None or threads in compile_threads))


def _bench(python: str, threads: int, batches: Sequence[int], contenders: str, out: Path, onnx_cache: str,
           min_run_time: float, rounds: int) -> list[str]:
    return [python, "-m", "hrnet_fast.cli", "bench", "--device", "cpu", "--threads", str(threads), "--batch",
            *map(str, batches), "--contenders", contenders, "--min-run-time", str(min_run_time), "--rounds",
            str(rounds), "--no-progress", "--out", str(out), "--onnx-cache", onnx_cache]


def prewarm(threads: Sequence[int], batches: Sequence[int], onnx_cache: str, python: str, scratch: Path,
            compile_threads: Collection[int] | None = None) -> None:
    """The one-off work of the timed runs done first, side by side: per batch the ONNX export into
    `onnx_cache`, per thread count and batch torch.compile's kernels into Inductor's cache (whose key
    holds the thread count). Throwaway bench runs whose timings are discarded; one that fails only
    leaves its work to the timed run."""
    jobs = [("onnxruntime", max(threads), b) for b in batches] + [
        ("compile", t, b) for t in threads for b in batches if compile_threads is None or t in compile_threads]
    # compile workers: a few per job, the jobs share the cores (the cache key leaves the count out)
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2"}

    def one(job: tuple[str, int, int]) -> str:
        name, t, b = job
        t0 = time.perf_counter()
        cmd = _bench(python, t, [b], name, scratch / f"{name}_{t}_{b}", onnx_cache, 0.01, 1)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"failed ({proc.stderr.strip().splitlines()[-1:]})"
        return f"cpu_threads: prewarm {name} at {t} threads, batch {b}: {status} in {time.perf_counter() - t0:.0f} s"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, min(len(jobs), (os.cpu_count() or 1) // 2))) as pool:
        for line in pool.map(one, jobs):
            print(line, flush=True)
    print(f"cpu_threads: prewarm done in {time.perf_counter() - t0:.0f} s", flush=True)


def run(out: Path, threads: Sequence[int], batches: Sequence[int], min_run_time: float, python: str,
        warm: bool = True, compile_threads: Collection[int] | None = None) -> dict[int, list[dict]]:
    """Rows of each thread count's bench run (thread counts past the core count are skipped)."""
    cores = os.cpu_count() or 1
    left_out = [t for t in threads if t > cores]
    for t in left_out:
        print(f"cpu_threads: {t} threads left out: this machine has {cores} cores", flush=True)
    threads = [t for t in threads if t <= cores]
    rows: dict[int, list[dict]] = {}
    # The ONNX export (~15 s a batch size for W32) once for all thread counts; kept out of `out`, which
    # the GPU machine sends back
    with tempfile.TemporaryDirectory(prefix="hrnet_fast_onnx_") as onnx_cache:
        if warm and threads:
            with tempfile.TemporaryDirectory(prefix="hrnet_fast_warm_") as scratch:
                prewarm(threads, batches, onnx_cache, python, Path(scratch), compile_threads)
        for t in threads:
            folder = out / f"threads_{t}"
            cmd = _bench(python, t, batches, contenders_at(t, compile_threads), folder, onnx_cache, min_run_time, 2)
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
    # the bench's round-by-round ratio (hrnet_fast.bench.runner._paired), where the run recorded it
    paired = {(t, r["batch"]): r["paired_vs_ort"] for t, rs in rows.items() for r in rs
              if r["contender"] == "hrnet_fast_cpu" and r.get("paired_vs_ort")}
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
            if lead and (t, b) in paired:
                lead += f" (paired {paired[t, b]:.2f}x)"
            lines.append(f"| {b} | {t} | {' | '.join(cells)} | {lead} |")
    return "\n".join(lines) + f"\n\neff.: parallel efficiency, t({base_t}) * {base_t} / (T * t(T)).\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--compile-threads", type=int, nargs="*", default=None,
                   help="thread counts at which torch.compile is timed (default: all): each is a cold compile")
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                   help="no side-by-side ONNX export and torch.compile runs before the timed ones")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(run(args.out, args.threads, args.batch, args.min_run_time, args.python, args.prewarm,
                     args.compile_threads))
    (args.out / "cpu_threads.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
