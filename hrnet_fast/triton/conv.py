"""Triton kernel for conv_bias_act: implicit-GEMM convolution with bias, residual and ReLU in the epilogue.

GEMM view: M = N*Ho*Wo output pixels, N = C_out, K = kh*kw*C_in ordered (r, s, c_in) with c_in
fastest, so on channels_last inputs every K-tile is a contiguous run of channels (NHWC-friendly).
Each program owns a [BLOCK_M, BLOCK_N] output tile; it walks the kernel window (r, s) and C_in in
BLOCK_K steps, loading the shifted input pixels (zero outside the padding) and the weight slice,
and accumulates with tl.dot in fp32. Every tensor is addressed through its own strides.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from hrnet_fast.ops import _meta
from hrnet_fast.triton._common import (
    cdiv, channel_block, define_op, device_guard, dot, dot_precision, interpreting, memory_format, remembered,
    tracing,
)

QUALNAME = "hrnet_fast::conv_bias_act_triton"


# Spatial sizes and conv geometry vary per layer: specialising them (on ==1 and divisibility by 16)
# would compile variants for nothing. Strides stay specialised: a unit channel stride is what makes
# the loads vector loads. So do the channel counts: only a C_in (C_out) known to be a multiple of 16
# makes the K (N) masks constant over 16 channels, and the loads 16-byte async copies into shared
# memory. Unspecialised, fp32 tiles were copied 4 bytes at a time and fp16 ones not asynchronously at
# all, one stage in shared memory (tests/triton_sm90.py compiles both for sm_90); HRNet's channel
# counts are multiples of 16 but for the stem's 3 and the head's keypoints, so little more compiles.
_SIZES = ["M", "H", "W", "HO", "WO", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W"]


@triton.jit(do_not_specialize=_SIZES)
def _conv_bias_act_kernel(
    x_ptr, sxn, sxc, sxh, sxw,
    w_ptr, swo, swi, swh, sww,
    bias_ptr, s_bias,
    res_ptr, srn, src, srh, srw,
    out_ptr, son, soc, soh, sow,
    M, C_OUT, C_IN, H, W, HO, WO,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # 32-bit index math unless some tensor has 2**31 elements or more (the host decides): the
    # [BLOCK_M, BLOCK_K] address tile of every K step is the kernel's main integer work.
    if INDEX_64:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    n = offs_m // (WO * HO)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_rows = x_ptr + n * sxn + ih0 * sxh + iw0 * sxw  # each output pixel's window corner
    w_cols = w_ptr + offs_n[None, :] * swo

    # One flat K loop over (r, s, C_in blocks): the software pipeliner overlaps the loads of step
    # t+1.. with the dot of step t only in the innermost loop, and most HRNet convs have C_in <= 64,
    # where a C_in loop nested in r and s would run once per (r, s).
    k_blocks = tl.cdiv(C_IN, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in tl.range(0, KH * KW * k_blocks, num_stages=NUM_STAGES):
        rs = t // k_blocks
        c0 = (t - rs * k_blocks) * BLOCK_K
        r = rs // KW
        s = rs - r * KW
        ih = ih0 + r
        iw = iw0 + s
        ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # zero padding outside the input
        kk = c0 + offs_k
        mask_k = kk < C_IN
        a = tl.load(x_rows[:, None] + (r * sxh + s * sxw) + kk[None, :] * sxc,
                    mask=ok[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + (r * swh + s * sww) + kk[:, None] * swi,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * s_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if RELU:
        # acc < 0 is false for NaN: NaN passes through, as torch.relu lets it (tl.maximum would not)
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + (n * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset of `t` (its strides, not its numel: views may be sparse)."""
    return 1 + sum((size - 1) * abs(st) for size, st in zip(t.shape, t.stride()))


def _offsets_fit_int32(tensors: Sequence[torch.Tensor | None], traced: bool) -> bool:
    """Whether every element offset of these tensors is below 2**31. Run for real, a dense tensor's
    span is its numel, checked without the per-dimension sum (which, with the memory format below,
    was a third of this op's host time)."""
    for t in tensors:
        if t is None:
            continue
        dense = not traced and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))
        if (t.numel() if dense else _span(t)) >= 2**31:
            return False
    return True


def _blocks(m: int, c_in: int, c_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) without tuning: one fixed tile under the
    interpreter, GPU-sized otherwise."""
    if interpreting():
        # the interpreter pays per program, so one mid-sized tile (far fewer programs than 16-wide
        # tiles), still small enough that the tests cover edge masks and several tiles
        return 64, 32, 32, 1, 1
    # Few output pixels (the small branches at batch 1): narrow tiles, so that there are programs
    # for more of the multiprocessors. HRNet's C_in/C_out are 18..384 (3 for the stem): a K-tile no
    # wider than C_in wastes no loads.
    block_m = 32 if m <= 1024 else 64 if m <= 16384 else 128
    block_n = channel_block(c_out, 64 if m <= 16384 else 128)
    # 128-row tiles take K steps of 32: 128x64x64 spilled registers in fp32 on sm_90 (tests/triton_sm90.py)
    block_k = channel_block(c_in, 64 if block_m < 128 else 32)
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, num_warps, 3


# Tiles the autotuner times on the GPU, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N
# and BLOCK_K are cut to the layer's channel counts, so a narrow layer times fewer distinct tiles.
_TUNED_TILES = [
    (32, 32, 32, 2, 3),
    (64, 32, 32, 4, 3),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (128, 64, 32, 4, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 32, 8, 3),
    (256, 64, 32, 8, 3),
]


def _quick_bench(fn: Callable[[], Any], quantiles: list[float]) -> Any:
    """The autotuner's timer with short windows: HRNet's convs take microseconds, and a model meets
    a few dozen distinct ones, each timed once per process on first use."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


@functools.cache
def _tuner(n_cap: int, k_cap: int) -> Any:
    """The kernel autotuned over _TUNED_TILES cut to BLOCK_N <= n_cap and BLOCK_K <= k_cap, keyed
    on everything that changes which tile wins (sizes, geometry, epilogue; dtypes are added by Triton)."""
    tiles = sorted({(bm, min(bn, n_cap), min(bk, k_cap), w, st) for bm, bn, bk, w, st in _TUNED_TILES})
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "NUM_STAGES": st}, num_warps=w)
        for bm, bn, bk, w, st in tiles
    ]
    key = ["M", "C_OUT", "C_IN", "H", "W", "STRIDE_H", "STRIDE_W", "KH", "KW", "HAS_BIAS", "HAS_RESIDUAL", "RELU"]
    return triton.autotune(configs=configs, key=key, do_bench=_quick_bench)(_conv_bias_act_kernel)


# The tile the autotuner chose per (dtype, device, sizes and geometry, flags): the launch kwargs.
_BEST: dict[tuple, dict[str, Any]] = {}


def autotuning() -> bool:
    """Whether GPU launches time the candidate tiles on first use of a shape (default) or take the
    fixed heuristic tile (HRNET_FAST_TRITON_AUTOTUNE=0). Never under the interpreter."""
    return not interpreting() and os.environ.get("HRNET_FAST_TRITON_AUTOTUNE", "1") != "0"


class _Plan(NamedTuple):
    """What a launch needs besides the tensors themselves, the same for every call of one signature."""

    shape: tuple[int, int, int, int]  # the output's
    memory_format: torch.memory_format  # the output's: follows suggest_memory_format(x), as the fake and aten's conv
    sizes: tuple[int, ...]  # the kernel's M, C_OUT, C_IN, H, W, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W
    flags: dict[str, Any]  # its constexprs but the tile
    tune_key: tuple  # the autotuner's choice is remembered under this (_BEST)
    launchers: dict  # direct launchers of the tuned kernel, by what else Triton specialises on (_launch_tuned)


def _make_plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
               padding: Sequence[int], residual: torch.Tensor | None, relu: bool, traced: bool) -> _Plan:
    shape = _meta.conv_output_shape(x, weight, stride, padding)
    n, c_out, ho, wo = shape
    sizes = (n * ho * wo, c_out, x.shape[1], x.shape[2], x.shape[3], ho, wo, stride[0], stride[1], padding[0], padding[1])
    # the output is allocated dense, so its offsets reach its numel
    index_64 = not _offsets_fit_int32((x, weight, residual), traced) or n * c_out * ho * wo >= 2**31
    flags = dict(KH=weight.shape[2], KW=weight.shape[3], HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 RELU=relu, DOT_PRECISION=dot_precision(x.dtype), INDEX_64=index_64)
    return _Plan(shape, memory_format(x, traced), sizes, flags, (x.dtype, x.device, sizes, tuple(flags.items())), {})


# Plans by call signature. On the H200 machine this op's Python before the launch took ~70 us a call
# (GPU run 6: 113 us for the function, 44 of them Triton's launch); its shape, layout, offset-width
# and flag logic depends only on what the key holds, so it runs once per signature.
_PLANS: dict[tuple, _Plan] = {}


def _plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
          padding: Sequence[int], residual: torch.Tensor | None, relu: bool) -> _Plan:
    key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), None if bias is None else bias.stride(0),
           None if residual is None else (residual.shape, residual.stride()), tuple(stride), tuple(padding), relu,
           torch.backends.cudnn.allow_tf32)  # fp32's dot precision follows it
    return _PLANS.get(key) or remembered(
        _PLANS, key, lambda: _make_plan(x, weight, bias, stride, padding, residual, relu, traced=False))


# Launch the tuned kernel through its compiled launcher rather than Triton's JITFunction.run, which
# binds and specialises ~40 arguments on every call: 44 us a launch on the H200 machine, 10.5 of them
# the launcher (GPU run 6). Off by default until a GPU run has checked it (HRNET_FAST_TRITON_DIRECT_LAUNCH=1).
DIRECT_LAUNCH = os.environ.get("HRNET_FAST_TRITON_DIRECT_LAUNCH", "0") == "1"


def _launch_tuned(plan: _Plan, best: dict[str, Any], args: tuple, tensors: tuple) -> None:
    """Launch the kernel with the tuned tile `best`. With DIRECT_LAUNCH, the first call of a plan goes
    through Triton (which compiles or finds the kernel) and keeps its compiled launcher; later calls
    hand the launcher the arguments in the kernel's order. The plan's key fixes every size, stride and
    flag; what it leaves open, and Triton specialises on, is each pointer's 16-byte alignment and dtype,
    so launchers are kept per those too."""
    m, c_out = plan.sizes[:2]
    grid = (cdiv(m, best["BLOCK_M"]), cdiv(c_out, best["BLOCK_N"]))
    key = launcher = None
    if DIRECT_LAUNCH:
        key = (tuple(None if t is None else (t.data_ptr() % 16 == 0, t.dtype) for t in tensors), tuple(best.items()))
        launcher = plan.launchers.get(key, False)  # None: this Triton hands back no compiled kernel
        if launcher:
            run, tail = launcher
            run(*args, *tail)  # on the current stream of the current device (device_guard made it x's)
            return
    compiled = _conv_bias_act_kernel[grid](*args, **plan.flags, **best)
    if launcher is False:  # the first call of this kind: keep the launcher
        constexprs = {**plan.flags, **best}
        # the launcher takes every parameter in order, constexprs too (as JITFunction.run passes them)
        tail = tuple(constexprs[name] for name in _conv_bias_act_kernel.arg_names[len(args):])
        plan.launchers[key] = None if compiled is None else (compiled[(grid[0], grid[1], 1)], tail)


@define_op(QUALNAME, _meta.conv_bias_act_fake)
def conv_bias_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding) + bias + residual); channels_last out iff x suggests it.

    Any strides work; the fast layout is channels_last x with the weight stored [kH, kW, C_in, C_out]
    (FusedConv packs it so): then every tile load is contiguous along channels.
    """
    traced = tracing(x)
    plan = (_make_plan(x, weight, bias, stride, padding, residual, relu, traced=True) if traced
            else _plan(x, weight, bias, stride, padding, residual, relu))
    out = torch.empty(plan.shape, dtype=x.dtype, device=x.device, memory_format=plan.memory_format)
    if out.numel() == 0:
        return out
    m, c_out, c_in = plan.sizes[:3]
    args = (
        x, *x.stride(),
        weight, *weight.stride(),
        x if bias is None else bias, 0 if bias is None else bias.stride(0),
        x if residual is None else residual, *(residual.stride() if residual is not None else (0, 0, 0, 0)),
        out, *out.stride(),
        *plan.sizes,
    )
    flags = plan.flags
    with device_guard(x):  # Triton launches on the current device, which need not be x's
        # Traced (torch.compile, opcheck): the fixed tile, as the sizes may be symbolic and nothing
        # can be timed. Run for real: the autotuner's choice, timed once per shape and remembered.
        if autotuning() and not traced:
            best = _BEST.get(plan.tune_key)
            if best is None:
                def grid(meta: dict[str, Any]) -> tuple[int, int]:
                    return cdiv(m, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_N"])

                tuner = _tuner(channel_block(c_out, 128), channel_block(c_in, 64))
                tuner[grid](*args, **flags)
                _BEST[plan.tune_key] = tuner.best_config.all_kwargs()
            else:
                # the tuned tile, launched directly: triton's Autotuner.run rebuilds its key from
                # every argument on each call, a cost comparable to the launch itself
                _launch_tuned(plan, best, args, (x, weight, bias, residual, out))
        else:
            block_m, block_n, block_k, num_warps, num_stages = _blocks(m, c_in, c_out)
            grid = (cdiv(m, block_m), cdiv(c_out, block_n))
            # wrap_triton records the launch while tracing; run for real it only adds a layer of Python
            (wrap_triton(_conv_bias_act_kernel) if traced else _conv_bias_act_kernel)[grid](
                *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
                num_warps=num_warps,
            )
    return out


_meta.register_autograd(QUALNAME, "conv_bias_act")
