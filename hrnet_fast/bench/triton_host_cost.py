"""Host time of one Triton op call, split into its layers (needs a CUDA GPU).

Un-graphed at batch 1 the Triton backend is host-bound: ~108 us of host time per op in GPU run 5,
against ~30 for the `cuda` backend's ops (benchmarks/GPU-NOTES.md, run 6). This times, for one W32 conv
(batch 1, fp16, channels_last; its GPU time is a few microseconds) and one fusion, each layer of a
call on its own, so that the differences say where the time goes:

  cuda op       torch.ops.hrnet_fast.conv_bias_act (C++ op, cuDNN)              the reference
  triton op     torch.ops.hrnet_fast.conv_bias_act_triton (torch's triton_op)
  model call    what the optimized model calls (the op's Python function when nothing observes the call)
  triton fn     the op's Python function, without torch's custom-op dispatch
  direct        the same with HRNET_FAST_TRITON_DIRECT_LAUNCH (the compiled launcher kept and called)
  jit launch    kernel[grid](*args, **constexprs): Triton's JITFunction.run
  binder        Triton's argument binder alone (specialisation of ~40 arguments)
  run           the compiled kernel's launcher alone (CompiledKernel.run, arguments bound once)
  empty         torch.empty of the output alone

    python -m hrnet_fast.bench.triton_host_cost [--out FILE.json] [--calls 3000]

(`make gpu-check` runs it as its step `host_cost`.)
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hrnet_fast  # noqa: F401  (registers the ops)
from hrnet_fast.ops._backend import define_triton_ops, kernel


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Host microseconds per call: the GPU work of each call is shorter, so the queue never fills."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def conv_layers() -> dict[str, Callable[[], object]]:
    from triton import knobs
    from triton.runtime.driver import driver

    from hrnet_fast.triton import conv
    from hrnet_fast.triton._common import plain_function

    cl = torch.channels_last
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 64, 32, 24, device="cuda", generator=g, dtype=torch.float16).contiguous(memory_format=cl)
    w = (torch.randn(64, 64, 3, 3, device="cuda", generator=g) / 24).half()
    b = torch.randn(64, device="cuda", generator=g).half()
    w_cl = w.contiguous(memory_format=cl)
    w_packed = w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # [kH, kW, C_in, C_out], as FusedConv packs
    s, p = [1, 1], [1, 1]
    triton_op = torch.ops.hrnet_fast.conv_bias_act_triton.default
    layers: dict[str, Callable[[], object]] = {
        "cuda op": lambda: torch.ops.hrnet_fast.conv_bias_act.default(x, w_cl, b, s, p, None, True),
        "triton op": lambda: triton_op(x, w_packed, b, s, p, None, True),
    }
    model_call = kernel("conv_bias_act", "triton")
    layers["model call"] = lambda: model_call(x, w_packed, b, s, p, None, True)
    fn = plain_function(conv.conv_bias_act_triton)
    layers["triton fn"] = lambda: fn(x, w_packed, b, s, p, None, True)

    def direct() -> torch.Tensor:
        conv.DIRECT_LAUNCH = True
        try:
            return fn(x, w_packed, b, s, p, None, True)
        finally:
            conv.DIRECT_LAUNCH = False

    layers["direct"] = direct
    triton_op(x, w_packed, b, s, p, None, True)  # autotunes this shape once
    out = torch.empty_like(x)
    n, c_out, ho, wo = out.shape
    args = (x, *x.stride(), w_packed, *w_packed.stride(), b, b.stride(0), x, 0, 0, 0, 0, out, *out.stride(),
            n * ho * wo, c_out, 64, 32, 24, ho, wo, 1, 1, 1, 1)
    flags = dict(KH=3, KW=3, HAS_BIAS=True, HAS_RESIDUAL=False, RELU=True, DOT_PRECISION="tf32", INDEX_64=False)
    best = next((v for k, v in conv._BEST.items() if k[0] == torch.float16), None) if conv.autotuning() else None
    tile = best or dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), conv._blocks(n * ho * wo, 64, 64)[:3]),
                        NUM_STAGES=3, num_warps=4)
    grid = (conv.cdiv(n * ho * wo, tile["BLOCK_M"]), conv.cdiv(c_out, tile["BLOCK_N"]))
    jit = conv._conv_bias_act_kernel
    compiled = jit[grid](*args, **flags, **tile)
    layers["jit launch"] = lambda: jit[grid](*args, **flags, **tile)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    binder = jit.device_caches[device][4]
    layers["binder"] = lambda: binder(*args, **flags, **tile)
    bound = tuple(binder(*args, **flags, **tile)[0].values())
    meta = compiled.launch_metadata(grid, stream, *bound)
    layers["run"] = lambda: compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata,
                                         meta, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)
    layers["empty"] = lambda: torch.empty((1, 64, 32, 24), device="cuda", dtype=torch.float16, memory_format=cl)
    return layers


def fuse_layers() -> dict[str, Callable[[], object]]:
    from hrnet_fast.triton import fusion
    from hrnet_fast.triton._common import plain_function

    cl = torch.channels_last
    x = torch.randn(1, 32, 64, 48, device="cuda", dtype=torch.float16).contiguous(memory_format=cl)
    low = [torch.randn(1, c, 64 // f, 48 // f, device="cuda", dtype=torch.float16).contiguous(memory_format=cl)
           for c, f in ((64, 2), (128, 4), (256, 8))]
    ws = [torch.randn(32, t.shape[1], device="cuda", dtype=torch.float16) / 8 for t in low]
    b = torch.randn(32, device="cuda", dtype=torch.float16)
    layers: dict[str, Callable[[], object]] = {
        "cuda op": lambda: torch.ops.hrnet_fast.fuse_multi_res.default(x, low, ws, b, True),
        "triton op": lambda: torch.ops.hrnet_fast.fuse_multi_res_triton.default(x, low, ws, b, True),
    }
    model_call = kernel("fuse_multi_res", "triton")
    layers["model call"] = lambda: model_call(x, low, ws, b, True)
    fn = plain_function(fusion.fuse_multi_res_triton)
    layers["triton fn"] = lambda: fn(x, low, ws, b, True)
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    define_triton_ops()
    results: dict[str, dict[str, float | str]] = {}
    with torch.inference_mode():  # as optimize() runs them: no autograd wrapper
        for op, build in (("conv_bias_act", conv_layers), ("fuse_multi_res", fuse_layers)):
            results[op] = {}
            try:
                layers = build()
            except Exception as e:  # noqa: BLE001  (a measurement script: say what broke, go on)
                results[op]["error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            for name, fn in layers.items():
                try:
                    results[op][name] = round(per_call_us(fn, args.calls), 2)
                except Exception as e:  # noqa: BLE001
                    results[op][name] = f"{type(e).__name__}: {e}"[:300]
    print(f"host us per call, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for op, row in results.items():
        print(f"{op:16s} " + "  ".join(f"{k}: {v}" for k, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "us_per_call": results}, indent=1))


if __name__ == "__main__":
    main()
