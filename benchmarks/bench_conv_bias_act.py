"""conv_bias_act on CPU against eager Conv+BN(+add)+ReLU, on the conv shapes of HRNet-W32 256x192.

Side by side in one process (torch.utils.benchmark, 2 threads): eager NCHW, eager channels_last,
our cpu op with dense weights and with weights pre-packed by `prepack` (channels_last, and NCHW).
The contenders take turns for several rounds; time_ms is the best round's median (the machine is shared).

    .venv/bin/python benchmarks/bench_conv_bias_act.py [--batch 1 8] [--rounds 5] [--quick]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hrnet_fast.bench.op_args import op_bench_parser
from hrnet_fast.bench.record import format_table, write_results
from hrnet_fast.bench.timing import take_turns
from hrnet_fast.fused.folding import fold_conv_bn
from hrnet_fast.ops.conv import prepack


@dataclass(frozen=True)
class Shape:
    name: str
    c_in: int
    c_out: int
    hw: tuple[int, int]  # input spatial size
    k: int
    stride: int
    residual: bool = False
    relu: bool = True

    @property
    def padding(self) -> int:
        return self.k // 2

    def out_hw(self) -> tuple[int, int]:
        return tuple((s + 2 * self.padding - self.k) // self.stride + 1 for s in self.hw)

    def gflop(self, batch: int) -> float:
        h, w = self.out_hw()
        return 2 * batch * self.c_out * self.c_in * self.k * self.k * h * w / 1e9


# The kinds of conv HRNet-W32 256x192 runs, with their real sizes (branches at 64x48 .. 8x6).
SHAPES = [
    Shape("stem1 3->64 s2", 3, 64, (256, 192), 3, 2),
    Shape("stem2 64->64 s2", 64, 64, (128, 96), 3, 2),
    Shape("l1 1x1 256->64", 256, 64, (64, 48), 1, 1),
    Shape("l1 3x3 64", 64, 64, (64, 48), 3, 1),
    Shape("l1 1x1 64->256 +res", 64, 256, (64, 48), 1, 1, residual=True),
    Shape("b0 3x3 32 +res", 32, 32, (64, 48), 3, 1, residual=True),
    Shape("b1 3x3 64", 64, 64, (32, 24), 3, 1),
    Shape("b2 3x3 128", 128, 128, (16, 12), 3, 1),
    Shape("b3 3x3 256 +res", 256, 256, (8, 6), 3, 1, residual=True),
    Shape("down 32->64 s2", 32, 64, (64, 48), 3, 2, relu=False),
    Shape("fuse 1x1 128->32", 128, 32, (16, 12), 1, 1, relu=False),
    Shape("head 1x1 32->17", 32, 17, (64, 48), 1, 1, relu=False),
]


def contenders(s: Shape, batch: int) -> dict[str, tuple[str, dict]]:
    """name -> (timed statement, globals) for one shape and batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, s.c_in, *s.hw, generator=g)
    w = torch.randn(s.c_out, s.c_in, s.k, s.k, generator=g) / (s.c_in * s.k * s.k) ** 0.5
    conv = torch.nn.Conv2d(s.c_in, s.c_out, s.k, s.stride, s.padding, bias=False)
    bn = torch.nn.BatchNorm2d(s.c_out)
    with torch.no_grad():
        conv.weight.copy_(w)
        bn.running_mean.uniform_(-0.1, 0.1, generator=g)
        bn.running_var.uniform_(0.5, 1.5, generator=g)
    eager = torch.nn.Sequential(conv, bn).eval()
    wf, bf = fold_conv_bn(conv, bn)  # BN folded, as optimize() does
    r = torch.randn(batch, s.c_out, *s.out_hw(), generator=g) if s.residual else None
    cl = torch.channels_last
    xc, rc = x.contiguous(memory_format=cl), (r.contiguous(memory_format=cl) if r is not None else None)
    eager_cl = torch.nn.Sequential(conv, bn).eval().to(memory_format=cl)
    eager_stmt = "y = m(x)\nif r is not None: y = y + r\ny = torch.relu(y) if relu else y"
    op_stmt = "op(x, w, b, st, pd, r, relu)"
    common = dict(torch=torch, relu=s.relu, st=[s.stride] * 2, pd=[s.padding] * 2, op=torch.ops.hrnet_fast.conv_bias_act)
    packed = prepack(wf, xc.shape, s.stride, s.padding)
    # every contender must compute the same thing before it is timed
    want = F.conv2d(x, wf, bf, s.stride, s.padding)
    want = want + r if r is not None else want
    want = torch.relu(want) if s.relu else want
    for wt in (wf, packed):
        got = common["op"](xc, wt, bf, common["st"], common["pd"], rc, s.relu)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    return {
        "eager NCHW": (eager_stmt, dict(common, m=eager, x=x, r=r)),
        "eager CL": (eager_stmt, dict(common, m=eager_cl, x=xc, r=rc)),
        "ours dense CL": (op_stmt, dict(common, x=xc, w=wf, b=bf, r=rc)),
        "ours packed CL": (op_stmt, dict(common, x=xc, w=packed, b=bf, r=rc)),
        "ours packed NCHW": (op_stmt, dict(common, x=x, w=packed, b=bf, r=r)),
    }


def main() -> None:
    ap = op_bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three shapes, batch 1: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[4:5] + SHAPES[6:7] + SHAPES[8:9] if args.quick else SHAPES
    batches = [1] if args.quick else args.batch

    rows = []
    with torch.inference_mode():
        for batch in batches:
            for s in shapes:
                per_round = take_turns(contenders(s, batch), args.rounds, args.min_run_time, args.threads, s.name)
                base = None
                for name, meds in per_round.items():
                    best = min(meds)
                    base = base or best
                    rows.append(dict(
                        contender=name, shape=s.name, batch=batch, case=f"b{batch} {s.name}", time_ms=best * 1e3,
                        median_ms=sorted(meds)[len(meds) // 2] * 1e3, gflops=s.gflop(batch) / best,
                        speedup_vs_eager=base / best,
                    ))
                    print(f"b{batch} {s.name:22s} {name:16s} {best * 1e6:9.1f} us {rows[-1]['gflops']:6.1f} GFLOP/s "
                          f"x{rows[-1]['speedup_vs_eager']:.2f}", flush=True)
    total = {}
    for r in rows:
        total.setdefault((r["batch"], r["contender"]), 0.0)
        total[(r["batch"], r["contender"])] += r["time_ms"]
    for (batch, name), ms in total.items():
        base = total[(batch, "eager NCHW")]
        rows.append(dict(contender=name, shape="sum of shapes", batch=batch, time_ms=ms, speedup_vs_eager=base / ms))
    print(format_table([r for r in rows if r["shape"] == "sum of shapes"],
                       ["batch", "contender", "time_ms", "speedup_vs_eager"]))
    config = dict(threads=args.threads, batches=batches, shapes=[s.name for s in shapes], dtype="float32",
                  rounds=args.rounds, time_ms="best of the rounds' medians")
    paths = write_results("conv_bias_act_cpu" + ("_quick" if args.quick else ""), config, rows, metric="gflops",
                          group="case")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
