"""Resident memory of a whole process serving HRNet on the CPU, one fresh process per contender.

The in-process `hrnet-fast bench` reports what each prepared model holds (`held_mib`), but its RSS
column grows with every contender loaded before it. This runs each contender alone, as a user's
server would: import, build the model (random weights and BN statistics), prepare it, two forwards
at the given batch, then read the process's resident memory now and at its peak (VmRSS and VmHWM of
/proc/self/status). ONNX Runtime's process imports onnxruntime and numpy only (the model is exported
by this parent process first), as a deployment of it would.

    .venv/bin/python benchmarks/bench_rss.py [--model w32] [--batch 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONTENDERS = ("eager", "hrnet_fast_cpu", "hrnet_fast_cpu_no_winograd", "onnxruntime")

_CHILD = r"""
import json, sys
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
name, model_spec, size, batch, threads, onnx_path = sys.argv[1:7]
h, w = map(int, size.split("x")); batch, threads = int(batch), int(threads)
if name == "onnxruntime":
    import numpy as np, onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, h, w), dtype=np.float32)
    for _ in range(2): sess.run(None, {sess.get_inputs()[0].name: x})
else:
    import torch, hrnet_fast
    from hrnet_fast.bench.model import build_model, randomize
    torch.set_num_threads(threads)
    model = randomize(build_model(model_spec), (h, w)).eval()
    if name != "eager":
        model = hrnet_fast.optimize(model, backend="cpu", winograd=name == "hrnet_fast_cpu")
    x = torch.randn(batch, 3, h, w)
    with torch.inference_mode():
        for _ in range(2): model(x)
print(json.dumps(status()))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="w32")
    ap.add_argument("--input-size", default="256x192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from hrnet_fast.bench.model import build_model, randomize
    from hrnet_fast.bench.record import format_table

    h, w = map(int, args.input_size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hrnet_fast_rss_") as tmp:
        onnx_path = str(Path(tmp) / "model.onnx")
        model = randomize(build_model(args.model), (h, w)).eval()
        with open("/dev/null", "w") as quiet:
            import contextlib

            with contextlib.redirect_stdout(quiet):
                torch.onnx.export(model, (torch.randn(args.batch, 3, h, w),), onnx_path, input_names=["x"])
        for name in CONTENDERS:
            cmd = [sys.executable, "-c", _CHILD, name, args.model, args.input_size, str(args.batch), str(args.threads), onnx_path]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            mem = json.loads(out)
            rows.append(dict(contender=name, batch=args.batch, rss_mib=round(mem["VmRSS"], 1), peak_rss_mib=round(mem["VmHWM"], 1)))
            print(rows[-1], flush=True)
    print(format_table(rows, ["contender", "batch", "rss_mib", "peak_rss_mib"]))


if __name__ == "__main__":
    main()
