"""fuse_multi_res on CPU against the official eager upsample path, on every fusion of HRNet-W32 256x192.

Side by side in one process (torch.utils.benchmark, 2 threads): the eager sequence the official
HighResolutionModule runs for output i (Conv2d 1x1 -> BatchNorm2d (eval) -> Upsample nearest per
lower-resolution branch j > i, added one by one, then ReLU), in NCHW, against our cpu op with BN
folded, in NCHW and channels_last. The contenders take turns for several rounds and median_ms is
the best round's median (the machine is shared: load then hits every contender alike). Peak memory: bytes the CPU allocator holds above what was live
before the call, highest point during one call (the profiler's allocation events, profile_memory=True,
which also see the op's internal C++ allocations); the output itself is counted in both.

    .venv/bin/python benchmarks/bench_fuse_multi_res.py [--batch 1 8] [--rounds 5] [--min-run-time 0.5]
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from hrnet_fast.bench.op_args import op_bench_parser
from hrnet_fast.bench.record import format_table, write_results
from hrnet_fast.bench.timing import take_turns
from hrnet_fast.fused.folding import fold_conv_bn
from hrnet_fast.ops import fuse_multi_res, fuse_multi_res_reference
from hrnet_fast.profile import peak_bytes

BRANCHES = [(32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6)]  # W32 at 256x192: (C, H, W)
# (branches in the stage, output i) and how many times a forward runs it (modules per stage; the
# last stage-4 module keeps output 0 only).
FUSIONS = [((2, 0), 1), ((3, 0), 4), ((3, 1), 4), ((4, 0), 3), ((4, 1), 2), ((4, 2), 2)]


def build(stage: int, i: int, batch: int) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable, all computing output i of a fusion layer (checked equal)."""
    g = torch.Generator().manual_seed(0)
    c, h, w = BRANCHES[i]
    base = torch.randn(batch, c, h, w, generator=g)
    xs, layers, wf, bf = [], [], [], torch.zeros(c)
    for j in range(i + 1, stage):
        cj, hj, wj = BRANCHES[j]
        xs.append(torch.randn(batch, cj, hj, wj, generator=g))
        conv, bn = torch.nn.Conv2d(cj, c, 1, bias=False), torch.nn.BatchNorm2d(c)
        with torch.no_grad():
            conv.weight.normal_(0, cj**-0.5, generator=g)
            bn.running_mean.uniform_(-0.1, 0.1, generator=g)
            bn.running_var.uniform_(0.5, 1.5, generator=g)
        layers.append(torch.nn.Sequential(conv, bn, torch.nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")).eval())
        wj, bj = fold_conv_bn(conv, bn)  # BN folded, as optimize() does
        wf.append(wj[:, :, 0, 0])
        bf = bf + bj

    def eager() -> torch.Tensor:  # HighResolutionModule._forward's fuse loop for output i
        y = base
        for x, layer in zip(xs, layers):
            y = y + layer(x)
        return torch.relu(y)

    cl = torch.channels_last
    base_cl, xs_cl = base.contiguous(memory_format=cl), [x.contiguous(memory_format=cl) for x in xs]
    fns = {
        "eager NCHW": eager,
        "ours NCHW": lambda: fuse_multi_res(base, xs, wf, bf, backend="cpu"),
        "ours CL": lambda: fuse_multi_res(base_cl, xs_cl, wf, bf, backend="cpu"),
    }
    want = fuse_multi_res_reference(base, xs, wf, bf)
    for name, fn in fns.items():  # every contender computes the same thing before it is timed
        torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4, msg=name)
    return fns


def main() -> None:
    ap = op_bench_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            for (stage, i), calls in FUSIONS:
                shape = f"s{stage} out{i} <- {stage - i - 1} lowres"
                fns = build(stage, i, batch)
                per_round = take_turns({name: ("fn()", {"fn": fn}) for name, fn in fns.items()}, args.rounds,
                                       args.min_run_time, args.threads, shape)
                eager_ms = min(per_round["eager NCHW"]) * 1e3
                for name, fn in fns.items():
                    ms = min(per_round[name]) * 1e3
                    rows.append(dict(contender=name, shape=shape, batch=batch, calls_per_forward=calls,
                                     median_ms=ms, speedup_vs_eager=eager_ms / ms, peak_mib=peak_bytes(fn) / 2**20))
                    r = rows[-1]
                    print(f"b{batch} {shape:22s} {name:11s} {ms * 1e3:8.1f} us  x{r['speedup_vs_eager']:5.2f}  "
                          f"peak {r['peak_mib']:6.2f} MiB", flush=True)
    for weighted in (False, True):
        totals: dict[tuple[int, str], list[float]] = {}
        for r in list(rows):
            if "calls_per_forward" not in r:
                continue
            n = r["calls_per_forward"] if weighted else 1
            acc = totals.setdefault((r["batch"], r["contender"]), [0.0, 0.0])
            acc[0] += n * r["median_ms"]
            acc[1] = max(acc[1], r["peak_mib"])
        for (batch, name), (ms, peak) in totals.items():
            rows.append(dict(contender=name, batch=batch, median_ms=ms, peak_mib=peak,
                             shape="per forward (x calls)" if weighted else "sum of shapes",
                             speedup_vs_eager=totals[(batch, "eager NCHW")][0] / ms))
    for r in rows:  # the chart groups bars by case: batch and shape together
        r["case"] = f"b{r['batch']} {r['shape']}"
    columns = ["batch", "shape", "contender", "median_ms", "speedup_vs_eager", "peak_mib"]
    print(format_table(rows, columns))
    config = dict(threads=args.threads, batches=args.batch, branches=BRANCHES, dtype="float32", rounds=args.rounds,
                  median_ms="best of the rounds' medians",
                  peak_memory="max CPU-allocator total during one call minus the total before it (profiler)")
    print("wrote", *write_results("fuse_multi_res_cpu", config, rows, group="case"))


if __name__ == "__main__":
    main()
