"""Compile hrnet_fast's Triton kernels for an H100 (sm_90) on a machine without a GPU, and report what
the tensor-core code looks like: Triton lowers them to PTX and runs its bundled ptxas, which needs no
device. Run by tests/test_triton_sm90_compile.py in a process of its own (without TRITON_INTERPRET,
which would replace the kernels by interpreted ones); prints one JSON object.

    .venv/bin/python tests/triton_sm90.py
"""
from __future__ import annotations

import inspect
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hrnet_fast.triton.conv import _conv_bias_act_kernel
from hrnet_fast.triton.fusion import _fuse_multi_res_kernel

TARGET = GPUTarget("cuda", 90, 32)
# the fusion kernel's float arguments (the interpolation scales) and pointers without a _ptr suffix
FLOATS = {f"s{a}{k}" for a in "hw" for k in range(3)}
POINTERS = {"x0", "x1", "x2"}


def _compile(kernel, constexprs: dict, dtype: str, num_warps: int) -> dict:
    """Compile `kernel` with these constexprs, pointers to `dtype`, ints i32; what its PTX holds."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr") or name in POINTERS:
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    ptx = triton.compile(src, target=TARGET, options={"num_warps": num_warps}).asm["ptx"]
    wgmma = [line.split()[0] for line in ptx.splitlines() if "wgmma.mma_async" in line]
    return {"wgmma": len(wgmma), "kinds": sorted(set(wgmma))}


def main() -> None:
    conv = dict(KH=3, KW=3, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True, INDEX_64=False,
                BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, NUM_STAGES=3)
    fusion = dict(NUM_LOWRES=2, HAS_BIAS=True, RELU=True, BLOCK_P=64, BLOCK_C=64, BLOCK_K=32, ALIGN_CORNERS=False)
    out = {"triton": triton.__version__}
    for prec in ("tf32_rna", "tf32x3", "ieee"):
        out[f"conv fp32 {prec}"] = _compile(_conv_bias_act_kernel, {**conv, "DOT_PRECISION": prec}, "fp32", 4)
    out["conv fp16"] = _compile(_conv_bias_act_kernel, {**conv, "DOT_PRECISION": "tf32"}, "fp16", 4)
    for bilinear in (False, True):
        out[f"fusion fp32 tf32_rna bilinear={bilinear}"] = _compile(
            _fuse_multi_res_kernel, {**fusion, "DOT_PRECISION": "tf32_rna", "BILINEAR": bilinear}, "fp32", 4)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
