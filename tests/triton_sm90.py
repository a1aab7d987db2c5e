"""Compile hrnet_fast's Triton kernels for an H100 (sm_90) on a machine without a GPU, and report what
the tensor-core code looks like: Triton lowers them to PTX and runs its bundled ptxas, which needs no
device. Run by tests/test_triton_sm90_compile.py in a process of its own (without TRITON_INTERPRET,
which would replace the kernels by interpreted ones); prints one JSON object, whose "resources" are
the registers, spill stack and shared memory of the tiles both kernels pick without timing for W32's
convs and fusions. With --resources, a table of those and of the conv at each tile the autotuner
times instead (a lead for GPU tuning: what a tile costs in occupancy is known before any run).

    .venv/bin/python tests/triton_sm90.py [--resources]
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hrnet_fast.triton.conv import _SIZES as conv_sizes
from hrnet_fast.triton.conv import _TUNED_TILES, _conv_bias_act_kernel
from hrnet_fast.triton.conv import _blocks as conv_blocks
from hrnet_fast.triton.fusion import _SIZES as fusion_sizes
from hrnet_fast.triton.fusion import _blocks as fusion_blocks
from hrnet_fast.triton.fusion import _fuse_multi_res_kernel

TARGET = GPUTarget("cuda", 90, 32)
# the fusion kernel's float arguments (the interpolation scales) and pointers without a _ptr suffix
FLOATS = {f"s{a}{k}" for a in "hw" for k in range(3)}
POINTERS = {"x0", "x1", "x2"}
# What a launch on channels_last tensors (the layout optimize() gives the GPU backends) with HRNet's
# channel counts (multiples of 16) specialises, as Triton's launcher would: unit channel strides become
# the constant 1; the other strides, the channel counts and the pointers are known multiples of 16;
# the kernels' do_not_specialize sizes are plain ints.
UNIT_STRIDES = {"sxc", "swo", "s_bias", "src", "soc", "sbc", "x0c", "x1c", "x2c", "w0k", "w1k", "w2k"}
SIZES = set(conv_sizes) | set(fusion_sizes)
# (pointer type, DOT_PRECISION) of the two dtypes the resource tables cover
DTYPES = (("fp16", "tf32"), ("fp32", "tf32_rna"))


def _conv_flags(prec: str, bm: int, bn: int, bk: int, stages: int, **more) -> dict:
    """The conv kernel's constexprs for a 3x3 conv with bias, residual and ReLU at this tile."""
    return dict(KH=3, KW=3, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True, INDEX_64=False, DOT_PRECISION=prec,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages, **more)


def _compile(kernel, constexprs: dict, dtype: str, num_warps: int, num_stages: int = 3,
             unspecialised: frozenset[str] = frozenset()) -> triton.compiler.CompiledKernel:
    """`kernel` compiled for TARGET with these constexprs, pointers to `dtype`, specialised as above
    (the ints named in `unspecialised` left plain, as for channel counts that are not multiples of 16)."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature, attrs = {}, {}
    constexprs = {**constexprs, **{name: 1 for name in UNIT_STRIDES if name in names}}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = f"*{dtype}" if name.endswith("_ptr") or name in POINTERS else "fp32" if name in FLOATS else "i32"
        if signature[name] != "fp32" and name not in SIZES | unspecialised:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def _summary(compiled: triton.compiler.CompiledKernel) -> dict:
    """The tensor-core instructions of the PTX, the sizes of its async copies into shared memory (bytes)
    and the shared memory it takes."""
    ptx = compiled.asm["ptx"]
    wgmma = [line.split()[0] for line in ptx.splitlines() if "wgmma.mma_async" in line]
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.\S+)? \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)", ptx)
    return {"wgmma": len(wgmma), "kinds": sorted(set(wgmma)), "async_copy_bytes": sorted({int(c, 0) for c in copies}),
            "shared": compiled.metadata.shared}


def _resources(compiled: triton.compiler.CompiledKernel) -> dict:
    """Registers and spill stack per thread (cuobjdump, bundled with Triton), dynamic shared memory."""
    import triton.backends.nvidia as nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {"registers": int(regs), "spill_bytes": int(stack), "shared": compiled.metadata.shared}


# W32's 3x3 convs (channels, output pixels an image) at batch 1 and 64: the untuned tiles they get
W32_CONVS = [(batch, c, hw) for batch in (1, 64) for c, hw in ((32, 64 * 48), (64, 32 * 24), (128, 16 * 12), (256, 8 * 6))]


def conv_resources() -> dict:
    """Registers and spill stack of the conv kernel with the untuned tiles `_blocks` gives W32's convs
    (what runs under torch.compile and with HRNET_FAST_TRITON_AUTOTUNE=0), fp16 and fp32."""
    out = {}
    for batch, channels, pixels in W32_CONVS:
        tile = conv_blocks(batch * pixels, channels, channels)
        for dtype, prec in DTYPES:
            name = f"conv {dtype} tile {tile}"
            if name in out:
                continue
            bm, bn, bk, warps, stages = tile
            out[name] = _resources(_compile(_conv_bias_act_kernel, _conv_flags(prec, bm, bn, bk, stages), dtype, warps, stages))
    return out


def fusion_resources() -> dict:
    """Registers and spill stack of the fusion kernel with the tiles `_blocks` picks for W32's fusions
    (output channels, low-res channels), nearest and bilinear, fp16 and fp32."""
    out = {}
    for dtype, prec in DTYPES:
        for channels, lowres in ((32, (64, 128, 256)), (64, (128, 256)), (128, (256,))):
            for bilinear in (False, True):
                block_p, block_c, block_k, warps = fusion_blocks(channels, list(lowres), bilinear)
                flags = dict(NUM_LOWRES=len(lowres), HAS_BIAS=True, RELU=True, BLOCK_P=block_p, BLOCK_C=block_c,
                             BLOCK_K=block_k, ALIGN_CORNERS=False, DOT_PRECISION=prec, BILINEAR=bilinear)
                out[f"fusion {dtype} C={channels} lowres={lowres} bilinear={bilinear}"] = _resources(
                    _compile(_fuse_multi_res_kernel, flags, dtype, warps))
    return out


def resources() -> None:
    used = {}
    for dtype, prec in DTYPES:
        for bm, bn, bk, warps, stages in _TUNED_TILES:
            name = f"conv {dtype} tile {bm}x{bn}x{bk}, {warps} warps, {stages} stages"
            used[name] = _resources(_compile(_conv_bias_act_kernel, _conv_flags(prec, bm, bn, bk, stages), dtype, warps, stages))
    for name, u in {**used, **conv_resources(), **fusion_resources()}.items():
        print(f"{name}: {u['registers']} registers, spill stack {u['spill_bytes']} B, shared {u['shared']} B")


def main() -> None:
    if "--resources" in sys.argv:
        return resources()
    conv = {k: v for k, v in _conv_flags("", 64, 64, 32, 3).items() if k != "DOT_PRECISION"}
    fusion = dict(NUM_LOWRES=2, HAS_BIAS=True, RELU=True, BLOCK_P=64, BLOCK_C=64, BLOCK_K=32, ALIGN_CORNERS=False)
    out = {"triton": triton.__version__}
    for prec in ("tf32_rna", "tf32x3", "ieee"):
        out[f"conv fp32 {prec}"] = _summary(_compile(_conv_bias_act_kernel, {**conv, "DOT_PRECISION": prec}, "fp32", 4))
    out["conv fp16"] = _summary(_compile(_conv_bias_act_kernel, {**conv, "DOT_PRECISION": "tf32"}, "fp16", 4))
    # as the stem's 3 channels, or a kernel that never specialised them
    out["conv fp16, channel counts not multiples of 16"] = _summary(_compile(
        _conv_bias_act_kernel, {**conv, "DOT_PRECISION": "tf32"}, "fp16", 4, unspecialised=frozenset({"C_IN", "C_OUT"})))
    out["conv bf16 64-bit indices"] = _summary(_compile(
        _conv_bias_act_kernel, {**conv, "DOT_PRECISION": "tf32", "INDEX_64": True}, "bf16", 4))
    out["fusion bf16 3 inputs bilinear align_corners"] = _summary(_compile(
        _fuse_multi_res_kernel, {**fusion, "NUM_LOWRES": 3, "DOT_PRECISION": "tf32", "BILINEAR": True, "ALIGN_CORNERS": True},
        "bf16", 4))
    for bilinear in (False, True):
        out[f"fusion fp32 tf32_rna bilinear={bilinear}"] = _summary(_compile(
            _fuse_multi_res_kernel, {**fusion, "DOT_PRECISION": "tf32_rna", "BILINEAR": bilinear}, "fp32", 4))
    out["resources"] = {**conv_resources(), **fusion_resources()}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
