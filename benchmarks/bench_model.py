"""Whole-model benchmark: the same code as `hrnet-fast bench` (see `--help`), runnable from a checkout.

    python benchmarks/bench_model.py --model w32 --batch 1 8
"""
from __future__ import annotations

import sys

from hrnet_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
