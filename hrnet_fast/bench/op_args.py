"""The command line every per-op benchmark script shares (benchmarks/bench_<op>.py)."""
from __future__ import annotations

import argparse


def op_bench_parser(description: str) -> argparse.ArgumentParser:
    """--batch, --threads, --min-run-time (over all rounds) and --rounds, with the per-op defaults."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds per contender, over all rounds")
    ap.add_argument("--rounds", type=int, default=5)
    return ap
