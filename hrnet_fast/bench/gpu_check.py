"""`make gpu-check`: on a machine with an NVIDIA GPU and a CUDA PyTorch, check an install end to end.

    python -m hrnet_fast.bench.gpu_check --out DIR [--budget-s 520] [--skip memcheck,bench_fp32]

Steps, in order, each under its own time limit (and together under --budget-s):
  build       the extension, in place, against the installed torch (`setup.py build_ext --inplace`)
  tests       the GPU tests (`pytest -m cuda`, in parallel processes where pytest-xdist is installed)
  cpu_tests   the CPU kernels' tests and whole models on the cpu backend, under the best variant this CPU
              runs (the GPU machine's CPU is an Intel Xeon, this project's own an AMD EPYC)
  profile     the kernel-time table of one forward per contender (hrnet_fast.bench.kernel_profile)
  host_cost   the host time of one op call, layer by layer (hrnet_fast.bench.triton_host_cost)
  bench_fp16  `hrnet-fast bench --device cuda`, W32 256x192, batch 1 and 64, every GPU contender,
              CUDA-graph replays of the PyTorch ones, torch.compile in reduce-overhead mode
  bench_direct the Triton backend against eager again, fp16, with HRNET_FAST_TRITON_DIRECT_LAUNCH=1 (its
              conv launched through the kept compiled launcher: off by default until measured), into DIR/direct
  memcheck    a subset of the op tests under `compute-sanitizer --tool memcheck`
  bench_fp32  the benchmark again in float32
  bench_seg   HRNetV2-W48 segmentation at 512x1024, float16, batch 1 (`--model seg_w48`)
  cpu_threads the CPU benchmark at 1, 4, 8 and 16 threads (hrnet_fast.bench.cpu_threads: the GPU
              machine's cores, for the CPU thread-scaling table; --cpu-threads picks the counts: all
              four take ~10 minutes there, so give them two calls)
  cpu_parts   the cpu backend part by part at those thread counts, AVX2 and AVX-512, batch 1 and 8, and
              an op table at the two largest counts (hrnet_fast.bench.cpu_parts: where the scaling is lost)
Everything goes to DIR: gpu_check.log (every step's output), gpu_check.json (device, versions,
each step's status, time and test counts), the benchmarks' JSON and PNG, profile.txt. A short table
is printed last. Exit code: 0 all ran and passed, 1 a step failed, 2 bad arguments, 3 no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("build", "tests", "cpu_tests", "profile", "host_cost", "bench_fp16", "bench_direct", "memcheck", "bench_fp32", "bench_seg",
         "cpu_threads", "cpu_parts")
# Each step's own limit in seconds; the run's --budget-s caps them further.
LIMITS = {"build": 240, "tests": 300, "cpu_tests": 120, "profile": 90, "host_cost": 60, "bench_fp16": 200,
          "bench_direct": 90, "memcheck": 120, "bench_fp32": 150, "bench_seg": 200, "cpu_threads": 540, "cpu_parts": 150}
# What cpu_tests runs: the ISA variants, the Winograd op, the task chains and optimize() of whole models.
CPU_TEST_FILES = ("tests/test_cpu_isa.py", "tests/test_conv3x3_winograd.py", "tests/test_cpu_tasks.py", "tests/test_optimize.py")
# The op tests memcheck runs: every op, backend and case once, fp16 channels_last (the fast path), with bias.
MEMCHECK_K = "cl and fp16 and ((test_conv_bias_act and bias_res_relu) or (test_fuse_multi_res and bias and not nobias))"
BENCH_CONTENDERS = "eager,eager_cl,compile,hrnet_fast_cuda,hrnet_fast_cuda_streams,hrnet_fast_triton"


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def _pytest_counts(text: str) -> dict[str, int]:
    """{"passed": 412, "failed": 2, ...} from pytest's last summary line."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    if not lines:
        return {}
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", lines[-1])}


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _xdist_version() -> tuple[int, ...]:
    import importlib.metadata

    try:
        return tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("pytest-xdist"))[:2])
    except importlib.metadata.PackageNotFoundError:
        return ()


def _sanitizer() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = Path(home) / "bin" / "compute-sanitizer"
    return str(cand) if cand.exists() else shutil.which("compute-sanitizer")


def commands(out: Path, python: str, workers: int, cpu_threads: Sequence[int] = (1, 4, 8, 16),
             compile_threads: Sequence[int] | None = None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The command line and extra environment of every step (cpu_threads: the CPU steps' thread counts;
    compile_threads: those of them at which cpu_threads times torch.compile, None for all)."""
    py = [python]
    plugins = ["-p", "no:cacheprovider", "-p", "no:benchmark"]
    pytest = py + ["-m", "pytest", "-q", "-rfE", "-m", "cuda", "tests/test_cuda.py", *plugins]
    # -v: each result is logged as it lands, so a step stopped for time still names its failures
    tests = [a for a in pytest if a != "-q"] + ["-v", "--durations=8"]
    cpu_tests = py + ["-m", "pytest", "-q", "-rfE", "-m", "not cuda and not triton", *CPU_TEST_FILES, *plugins]
    if workers > 1 and _have("xdist"):
        tests += ["-n", str(workers)]
        cpu_tests += ["-n", str(workers)]
        if _xdist_version() >= (3, 2):
            # chunks of two: each worker starts with one of the slow tests (tests/conftest.py orders them)
            tests += ["--maxschedchunk", "2"]
    if _have("pytest_timeout"):
        tests += ["--timeout", "180"]
    def bench_at(*batches: str, dest: Path = out) -> list[str]:
        return py + ["-m", "hrnet_fast.cli", "bench", "--device", "cuda", "--batch", *batches, "--cuda-graph",
                     "--no-progress", "--min-run-time", "0.6", "--rounds", "2", "--out", str(dest)]

    bench = bench_at("1", "64")
    sanitizer = _sanitizer() or "compute-sanitizer"
    threads = {"OMP_NUM_THREADS": "2"}  # test workers share the cores
    return {
        "build": (py + ["setup.py", "-q", "build_ext", "--inplace"], {"HRNET_FAST_CUDA": "1"}),
        "tests": (tests, threads),
        "cpu_tests": (cpu_tests, threads),
        "bench_fp16": (bench + ["--dtype", "float16", "--contenders", BENCH_CONTENDERS, "--compile-mode", "reduce-overhead"], {}),
        "profile": (py + ["-m", "hrnet_fast.bench.kernel_profile", "--batch", "1", "64", "--dtype", "float16",
                          "--out", str(out / "profile.txt")], {"HRNET_FAST_DEBUG": "1"}),
        "bench_direct": (bench_at("1", "64", dest=out / "direct") + ["--dtype", "float16",
                                                                    "--contenders", "eager,hrnet_fast_triton"],
                         {"HRNET_FAST_TRITON_DIRECT_LAUNCH": "1"}),
        "host_cost": (py + ["-m", "hrnet_fast.bench.triton_host_cost", "--out", str(out / "host_cost.json")], {}),
        # no caching allocator: memcheck sees only cudaMalloc'd bounds, and a cached block hides overruns
        "memcheck": ([sanitizer, "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20"] + pytest
                     + ["-k", MEMCHECK_K],
                     # the autotuner's timing runs would be instrumented too: the fixed tiles suffice here
                     {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "HRNET_FAST_TRITON_AUTOTUNE": "0", **threads}),
        "bench_fp32": (bench + ["--dtype", "float32", "--contenders", "eager,eager_cl,hrnet_fast_cuda,hrnet_fast_cuda_streams,hrnet_fast_triton"], {}),
        # the segmentation net once, at batch 1 (its 512x1024 input is 42x a pose crop's pixels)
        "bench_seg": (bench_at("1") + ["--model", "seg_w48", "--dtype", "float16", "--contenders", BENCH_CONTENDERS,
                                       "--compile-mode", "reduce-overhead"], {}),
        "cpu_threads": (py + ["-m", "hrnet_fast.bench.cpu_threads", "--out", str(out / "cpu_threads"),
                              "--threads", *map(str, cpu_threads), "--min-run-time", "0.8"]
                        + ([] if compile_threads is None else ["--compile-threads", *map(str, compile_threads)]), {}),
        "cpu_parts": (py + ["-m", "hrnet_fast.bench.cpu_parts", "--out", str(out / "cpu_parts"), "--threads",
                            *map(str, cpu_threads), "--rounds", "2", "--profile"], {}),
    }


def gpu_info(python: str) -> dict[str, Any]:
    """Device, driver and versions as the installed torch sees them (in a subprocess: this one stays light)."""
    code = (
        "import json, torch\n"
        "from hrnet_fast.bench.record import machine_info\n"
        "print(json.dumps(machine_info()))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-500:]}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": str(e)}


def run_step(step: Step, cmd: list[str], env: dict[str, str], limit: float, log) -> None:
    log.write(f"\n\n===== {step.name}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        # its own process group: a step that runs out of time is stopped with all its children
        # (test workers, compile workers), which would otherwise go on loading the GPU
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    except OSError as e:
        text, step.status, step.detail = "", "failed", f"could not start: {e}"
    else:
        try:
            text, _ = proc.communicate(timeout=limit)
            step.status = "ok" if proc.returncode == 0 else "failed"
            step.detail = "" if proc.returncode == 0 else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            step.status, step.detail = "timeout", f"stopped after {limit:.0f} s"
    step.seconds = time.perf_counter() - t0
    log.write(text)
    log.write(f"\n===== {step.name}: {step.status} in {step.seconds:.1f} s {step.detail}\n")
    log.flush()
    if step.name in ("tests", "cpu_tests", "memcheck"):
        step.counts = _pytest_counts(text)
        if step.name == "memcheck":
            m = re.search(r"ERROR SUMMARY: (\d+) error", text)
            if m:
                step.counts["memcheck_errors"] = int(m.group(1))
    print(f"[gpu-check] {step.name}: {step.status} in {step.seconds:.0f} s {step.detail}", flush=True)


def bench_table(out: Path) -> str:
    """The benchmark rows in a few columns, from the JSON files the bench steps wrote."""
    from hrnet_fast.bench.record import format_table

    rows = []
    for path in sorted(out.glob("model_*_cuda*.json")) + sorted(out.glob("direct/model_*_cuda*.json")):
        data = json.loads(path.read_text())
        dtype = data.get("config", {}).get("dtype", "?") + (" direct launch" if path.parent != out else "")
        for r in data.get("rows", []):
            rows.append({"dtype": dtype, **{k: r.get(k) for k in ("contender", "batch", "median_ms", "imgs_per_s",
                                                                 "speedup_vs_eager", "peak_mib", "check", "skipped")}})
    return format_table(rows) if rows else "(no benchmark results)"


def summary_table(steps: Sequence[Step]) -> str:
    from hrnet_fast.bench.record import format_table

    return format_table([{"step": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                          "counts": " ".join(f"{k}={v}" for k, v in s.counts.items()), "detail": s.detail} for s in steps])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_fast.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the log, JSON, PNG and profile (created)")
    p.add_argument("--budget-s", type=float, default=520.0, help="seconds for all steps together (default: 520)")
    p.add_argument("--skip", default="", help=f"comma-separated steps to leave out, of {','.join(STEPS)}")
    p.add_argument("--only", default="", help="comma-separated steps to run, in this order (default: all, in the order above)")
    p.add_argument("--python", default=sys.executable, help="the Python that has the CUDA torch (default: this one)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel test processes")
    p.add_argument("--cpu-threads", default="1,4,8,16", help="thread counts of cpu_threads and cpu_parts (default: 1,4,8,16)")
    p.add_argument("--cpu-compile-threads", default=None,
                   help="those of --cpu-threads at which cpu_threads times torch.compile, each a cold compile "
                        "of ~45 s alone (default: all)")
    args = p.parse_args(argv)
    for flag in ("cpu_threads", "cpu_compile_threads"):
        value = getattr(args, flag)
        try:
            setattr(args, flag, None if value is None else [int(t) for t in value.split(",") if t])
        except ValueError:
            p.error(f"--{flag.replace('_', '-')} must be comma-separated integers, got {value!r}")
    if not args.cpu_threads or min(args.cpu_threads) < 1:
        p.error(f"--cpu-threads must name at least one count of 1 or more, got {args.cpu_threads}")
    skip = [s for s in args.skip.split(",") if s]
    only = [s for s in args.only.split(",") if s]
    for flag, names in (("--skip", skip), ("--only", only)):
        bad = [s for s in names if s not in STEPS]
        if bad:
            p.error(f"unknown step(s) {', '.join(bad)} in {flag}; choose from {', '.join(STEPS)}")
    args.order = list(dict.fromkeys(only)) or list(STEPS)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    args.skip = skip
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    info = gpu_info(args.python)
    steps = [Step(name) for name in args.order]
    no_gpu = not (info.get("cuda_device") or {}).get("name")
    cmds = commands(out, args.python, args.workers, args.cpu_threads, args.cpu_compile_threads)
    with open(out / "gpu_check.log", "w", encoding="utf-8") as log:
        log.write(json.dumps(info, indent=1) + "\n")
        for step in steps:
            left = deadline - time.perf_counter()
            if no_gpu:
                step.status = "skipped"
                step.detail = "no CUDA device: torch.cuda.is_available() is False" + (f" ({info['error'][-200:]})" if "error" in info else "")
            elif step.name in args.skip:
                step.status, step.detail = "skipped", "--skip"
            elif step.name == "memcheck" and _sanitizer() is None:
                step.status, step.detail = "skipped", "compute-sanitizer not found (CUDA_HOME/bin or PATH)"
            elif left < 20:
                step.status, step.detail = "skipped", f"--budget-s spent ({left:.0f} s left)"
            else:
                run_step(step, *cmds[step.name], min(LIMITS[step.name], left), log)
    report = {"device": info, "budget_s": args.budget_s, "steps": [asdict(s) for s in steps]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    device = (info.get("cuda_device") or {}).get("name", "no CUDA device")
    print(f"\nhrnet_fast gpu-check on {device}, torch {info.get('versions', {}).get('torch')}, "
          f"triton {info.get('versions', {}).get('triton')}; logs and results in {out}")
    print(bench_table(out))
    print(summary_table(steps))
    if no_gpu:
        return 3
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
