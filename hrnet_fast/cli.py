"""The `hrnet-fast` command line. `hrnet-fast bench` benchmarks the whole model against eager,
torch.compile and ONNX Runtime, prints a table and writes JSON + PNG under --out (default: bench-results/,
which git ignores: the committed reference runs in benchmarks/results/ are written there only on purpose).

Bad arguments exit with code 2 and one line on stderr; a contender that cannot run here becomes
a row that says why. Code 1 means a contender's output disagreed with eager (results still written).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hrnet_fast.bench.contenders import CONTENDERS
from hrnet_fast.bench.model import BenchError, parse_input_size

CONTENDER_NAMES = tuple(CONTENDERS)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump): `prog: error: ...`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text!r}")
    return v


def _contender_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CONTENDER_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown contender(s) {', '.join(bad) or repr(text)}; choose from {','.join(CONTENDER_NAMES)}")
    return list(dict.fromkeys(names))


def _input_size(text: str) -> tuple[int, int]:
    try:
        return parse_input_size(text)
    except BenchError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--input-size ")) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hrnet-fast", description="hrnet_fast: fused kernels for HRNet inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser(
        "bench",
        help="benchmark the whole model against eager, torch.compile and ONNX Runtime",
        description="Benchmark HRNet end to end: each contender is checked against eager, then timed "
        "(warm-up excluded; median and IQR). Table on stdout, JSON + PNG under --out.",
    )
    b.add_argument("--model", default="w32", help="w32, w48 (pose), seg_w48 (HRNetV2-W48, Cityscapes), or an official-format pose or segmentation experiment .yaml (default: w32)")
    b.add_argument("--input-size", type=_input_size, default=None, metavar="HxW",
                   help="input height x width (default: the model's: 256x192 pose, 512x1024 seg_w48, or the YAML's image size)")
    b.add_argument("--batch", type=_positive_int, nargs="+", default=[1], metavar="N", help="batch sizes (default: 1)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when present, else cpu")
    b.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch and ONNX Runtime (default: 2, or the core count if lower)")
    b.add_argument("--contenders", type=_contender_list, default=list(CONTENDER_NAMES), metavar="A,B,...",
                   help=f"comma-separated subset of {', '.join(CONTENDER_NAMES)} (default: all; those that cannot run here are listed as skipped)")
    b.add_argument("--min-run-time", type=_positive_float, default=2.0, metavar="S",
                   help="seconds of timed runs per contender and batch, over all rounds (default: 2)")
    b.add_argument("--rounds", type=_positive_int, default=3,
                   help="contenders take turns over this many timing rounds, so machine load hits all alike (default: 3)")
    b.add_argument("--out", default="bench-results", help="folder for <name>.json and <name>.png (default: bench-results)")
    b.add_argument("--cuda-graph", action="store_true", help="on CUDA, also time a CUDA-graph replay of each PyTorch contender")
    b.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"), default="default",
                   help="torch.compile's mode for the compile contender (reduce-overhead replays CUDA graphs; default: default)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights, BN stats and inputs (default: 0)")
    b.add_argument("--onnx-cache", default=None, metavar="DIR",
                   help="keep the ONNX Runtime contender's exported models in DIR and reuse them in later runs with the "
                        "same weights and input shape (default: export in every run)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _check_out(out: str) -> None:
    """--out must be a folder this process can create and write in."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BenchError(f"--out {out!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise BenchError(f"--out {out!r} is not a writable folder ({e.strerror or e})") from None


def _bench(args: argparse.Namespace) -> int:
    import torch

    from hrnet_fast.bench.model import resolve_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    resolve_model(args.model)  # bad --model fails here, before the heavy imports below
    _check_out(args.out)  # and a bad --out before the run, not after it
    cores = os.cpu_count() or 1
    if args.threads is None:
        args.threads = min(2, cores)
    if args.threads > cores:
        raise BenchError(f"--threads {args.threads} is more than this machine's {cores} cores")

    from hrnet_fast.bench import record, runner
    cfg = runner.BenchConfig(
        model=args.model, input_size=args.input_size, batches=list(dict.fromkeys(args.batch)), device=device,
        dtype=args.dtype, threads=args.threads, contenders=args.contenders, min_run_time=args.min_run_time, rounds=args.rounds,
        cuda_graph=args.cuda_graph, seed=args.seed, compile_mode=args.compile_mode, onnx_cache=args.onnx_cache,
    )
    def checkpoint(name: str, config: dict, rows: list) -> None:  # each finished batch is on disk at once
        record.write_results(name, config, rows, out_dir=args.out)

    name, config, rows = runner.run(cfg, progress=not args.no_progress, on_batch=checkpoint)
    print(f"{name}: {config['model_source']}, input {config['input_size'][0]}x{config['input_size'][1]}, "
          f"{cfg.dtype}, {cfg.device}, {cfg.threads} threads")
    print(record.format_table(rows, [c for c in runner.TABLE_COLUMNS if any(r.get(c) is not None for r in rows)]))
    if any(r.get("ops_per_forward") is not None for r in rows):
        print("ops_per_forward, est_mb: kernel-launching ops and MB read+written per forward (hrnet_fast.profile.count_ops)")
    json_path, png_path = record.write_results(name, config, rows, out_dir=args.out)
    print(f"wrote {json_path} and {png_path}")
    failed = [f"{r['contender']} (batch {r['batch']})" for r in rows if str(r.get("check", "")).startswith("FAIL")]
    if failed:
        print(f"hrnet-fast bench: error: output differs from eager beyond tolerance: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hrnet-fast` console script; returns the exit code instead of raising SystemExit."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own exits (--help: 0, bad argument: 2)
        return int(e.code or 0)
    try:
        if args.command == "bench":
            return _bench(args)
    except BenchError as e:
        print(f"hrnet-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hrnet-fast: interrupted", file=sys.stderr)
        return 130
    print(f"hrnet-fast: error: unknown command {args.command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
