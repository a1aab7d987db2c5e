"""conv3x3_winograd against oneDNN's direct convolution, on the 3x3 stride-1 convs of HRNet-W32 256x192.

Side by side in one process (torch.utils.benchmark, 2 threads), every conv with bias, ReLU and (where
HRNet has one) the residual fused: eager channels_last, our conv_bias_act (oneDNN, weights pre-packed
for the shape), and conv3x3_winograd with F(2x2,3x3), F(4x4,3x3) and the tile `choose_tile` picks,
each given the weight transformed ahead ("winograd") or dense, transformed by the kernel on each call
("dense": what optimize() runs, the OIHW weight read in place; "dense IHWO" and "dense panel-major":
the same conv reading the other layouts the kernel takes).

In the model every conv has its own weights, so they come from memory rather than cache; the
Winograd weights are 1.8x (F(2x2)) or 4x (F(4x4)) the size of the direct ones, which matters at
batch 1. Each contender therefore cycles through a pool of distinct weights bigger than the L3
cache (`--warm`: one weight, cache-resident). time_ms is the best round's median.

    .venv/bin/python benchmarks/bench_conv3x3_winograd.py [--batch 1 8] [--rounds 3] [--warm] [--quick]
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrnet_fast.bench.op_args import op_bench_parser
from hrnet_fast.bench.timing import take_turns
from hrnet_fast.ops.conv import prepack
from hrnet_fast.ops.winograd import choose_tile, panel_major, transform_weight

POOL_BYTES = 64 << 20  # twice this machine's 32 MiB L3
MAX_POOL = 256


@dataclass(frozen=True)
class Shape:
    name: str
    channels: int
    hw: tuple[int, int]
    residual: bool

    def gflop(self, batch: int) -> float:
        return 2 * batch * self.channels**2 * 9 * self.hw[0] * self.hw[1] / 1e9


SHAPES = [
    Shape("stage1 64 @64x48", 64, (64, 48), False),
    Shape("branch1 32 @64x48 +res", 32, (64, 48), True),
    Shape("branch2 64 @32x24", 64, (32, 24), False),
    Shape("branch3 128 @16x12 +res", 128, (16, 12), True),
    Shape("branch4 256 @8x6", 256, (8, 6), False),
]


def contenders(s: Shape, batch: int, warm: bool) -> dict[str, tuple[str, dict]]:
    """name -> (timed statement, globals) for one shape and batch."""
    g = torch.Generator().manual_seed(0)
    c, cl = s.channels, torch.channels_last
    x = torch.randn(batch, c, *s.hw, generator=g).contiguous(memory_format=cl)
    b = torch.randn(c, generator=g)
    r = torch.randn(batch, c, *s.hw, generator=g).contiguous(memory_format=cl) if s.residual else None
    pool = 1 if warm else min(MAX_POOL, max(2, -(-POOL_BYTES // (36 * 4 * c * c))))
    dense = [torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5) for _ in range(pool)]
    auto = choose_tile(x.shape, c)
    weights = {
        "eager CL": [w.contiguous(memory_format=cl) for w in dense],
        "oneDNN packed": [prepack(w, x.shape, 1, 1) for w in dense],
        "winograd F(2x2)": [transform_weight(w, 2) for w in dense],
        "winograd F(4x4)": [transform_weight(w, 4) for w in dense],
        # OIHW, read in place: as optimize() keeps them
        "dense F(2x2)": dense,
        "dense F(4x4)": dense,
        f"dense auto=F({auto}x{auto})": dense,
        # the same at the tile chosen, from the other layouts the kernel reads in place
        f"dense IHWO auto=F({auto}x{auto})": [w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2) for w in dense],
        f"dense panel-major auto=F({auto}x{auto})": [panel_major(w) for w in dense],
    }
    weights[f"winograd auto=F({auto}x{auto})"] = weights[f"winograd F({auto}x{auto})"]
    ops = torch.ops.hrnet_fast

    def eager(w):
        y = F.conv2d(x, w, b, padding=1)
        return torch.relu(y + r if r is not None else y)

    def dense_fn(m: int):  # the kernel transforms the dense weight on each call (what optimize() runs)
        return lambda w: ops.conv3x3_winograd(x, w, c, b, r, True, m)

    fns = {"eager CL": eager, "oneDNN packed": lambda w: ops.conv_bias_act(x, w, b, [1, 1], [1, 1], r, True),
           "dense F(2x2)": dense_fn(2), "dense F(4x4)": dense_fn(4), f"dense auto=F({auto}x{auto})": dense_fn(auto),
           f"dense IHWO auto=F({auto}x{auto})": dense_fn(auto), f"dense panel-major auto=F({auto}x{auto})": dense_fn(auto)}
    # every contender must compute the same thing before it is timed
    want = F.conv2d(x.double(), dense[0].double(), b.double(), padding=1)
    want = torch.relu(want + r.double() if r is not None else want)
    out = {}
    for name, ws in weights.items():
        fn = fns.get(name, lambda w: ops.conv3x3_winograd(x, w, c, b, r, True))
        err = (fn(ws[0]).double() - want).abs().max().item()
        assert err <= 2e-5 * want.abs().max().item(), (name, err)
        out[name] = ("fn(next(ws))", dict(fn=fn, ws=itertools.cycle(ws)))
    return out


def main() -> None:
    ap = op_bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--warm", action="store_true", help="one cache-resident weight per contender")
    ap.add_argument("--quick", action="store_true", help="two shapes, batch 1: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [SHAPES[1], SHAPES[4]] if args.quick else SHAPES
    batches = [1] if args.quick else args.batch

    rows = []
    with torch.inference_mode():
        for batch in batches:
            for s in shapes:
                per_round = take_turns(contenders(s, batch, args.warm), args.rounds, args.min_run_time, args.threads, s.name)
                base = min(per_round["eager CL"])
                for name, meds in per_round.items():
                    best = min(meds)
                    rows.append(dict(
                        contender=name.split("=")[0], shape=s.name, batch=batch, case=f"b{batch} {s.name}",
                        time_ms=best * 1e3, median_ms=sorted(meds)[len(meds) // 2] * 1e3,
                        gflops=s.gflop(batch) / best, speedup_vs_eager=base / best, note=name,
                    ))
                    print(f"b{batch} {s.name:24s} {name:22s} {best * 1e6:9.1f} us {rows[-1]['gflops']:6.1f} "
                          f"GFLOP/s (direct-conv FLOPs) x{rows[-1]['speedup_vs_eager']:.2f}", flush=True)
    total: dict[tuple[int, str], float] = {}
    for r in rows:
        total[(r["batch"], r["contender"])] = total.get((r["batch"], r["contender"]), 0.0) + r["time_ms"]
    for (batch, name), ms in total.items():
        rows.append(dict(contender=name, shape="sum of shapes", batch=batch, time_ms=ms,
                         speedup_vs_eager=total[(batch, "eager CL")] / ms))
    from hrnet_fast.bench.record import format_table, write_results

    print(format_table([r for r in rows if r["shape"] == "sum of shapes"], ["batch", "contender", "time_ms", "speedup_vs_eager"]))
    config = dict(threads=args.threads, batches=batches, shapes=[s.name for s in shapes], dtype="float32",
                  rounds=args.rounds, weights="warm (one)" if args.warm else f"cold (pool > {POOL_BYTES >> 20} MiB)",
                  time_ms="best of the rounds' medians", gflops="direct-convolution FLOPs / time")
    paths = write_results("conv3x3_winograd_cpu" + ("_quick" if args.quick else ""), config, rows, metric="gflops",
                          group="case")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
