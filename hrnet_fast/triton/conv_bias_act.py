"""Triton kernel for conv_bias_act: implicit-GEMM convolution with bias, residual and ReLU in the epilogue.

GEMM view: M = N*Ho*Wo output pixels, N = C_out, K = kh*kw*C_in ordered (r, s, c_in) with c_in
fastest, so on channels_last inputs every K-tile is a contiguous run of channels (NHWC-friendly).
Each program owns a [BLOCK_M, BLOCK_N] output tile; it walks the kernel window (r, s) and C_in in
BLOCK_K steps, loading the shifted input pixels (zero outside the padding) and the weight slice,
and accumulates with tl.dot in fp32. Every tensor is addressed through its own strides.
"""
from __future__ import annotations

import importlib

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format
from torch.library import wrap_triton

from hrnet_fast.triton._common import channel_block, define_op, dot_precision, interpreting

# the module, not the function that hrnet_fast.ops re-exports under the same name
_ops = importlib.import_module("hrnet_fast.ops.conv_bias_act")

QUALNAME = "hrnet_fast::conv_bias_act_triton"


@triton.jit
def _conv_bias_act_kernel(
    x_ptr, sxn, sxc, sxh, sxw,
    w_ptr, swo, swi, swh, sww,
    bias_ptr, s_bias,
    res_ptr, srn, src, srh, srw,
    out_ptr, son, soc, soh, sow,
    M, C_OUT, C_IN, H, W, HO, WO, KH, KW,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 pixel indices: offsets of large activations pass 2**31
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    n = offs_m // (WO * HO)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, KH):
        ih = ih0 + r
        ok_h = mask_m & (ih >= 0) & (ih < H)
        for s in range(0, KW):
            iw = iw0 + s
            ok = ok_h & (iw >= 0) & (iw < W)
            row = n * sxn + ih * sxh + iw * sxw  # masked where the window leaves the input (zero padding)
            w_rs = w_ptr + r * swh + s * sww
            for c0 in range(0, C_IN, BLOCK_K):
                kk = c0 + offs_k
                mask_k = kk < C_IN
                a = tl.load(x_ptr + row[:, None] + kk[None, :] * sxc, mask=ok[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w_rs + offs_n[None, :] * swo + kk[:, None] * swi,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * s_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + (n * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(c_in: int, c_out: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): one fixed tile under the interpreter, GPU-sized otherwise."""
    if interpreting():
        # the interpreter pays per program, so one mid-sized tile: ~10x faster than 16s on the
        # tiny model, still small enough that the tests cover edge masks and several tiles
        return 64, 32, 32, 1
    # HRNet's C_in/C_out are 32..384 (3 for the stem): a K-tile no wider than C_in wastes no loads
    return 64, channel_block(c_out, 128), channel_block(c_in, 64), 4


@define_op(QUALNAME, _ops.fake)
def conv_bias_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding) + bias + residual); channels_last out iff x suggests it."""
    shape = _ops.output_shape(x, weight, stride, padding)
    # the same layout as the shared fake (and aten's conv): follows suggest_memory_format(x)
    out = x.new_empty(shape).contiguous(memory_format=suggest_memory_format(x))
    if out.numel() == 0:
        return out
    n, c_out, ho, wo = shape
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    kh, kw = weight.shape[2], weight.shape[3]
    block_m, block_n, block_k, num_warps = _blocks(c_in, c_out)
    m = n * ho * wo
    grid = (triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    wrap_triton(_conv_bias_act_kernel)[grid](
        x, *x.stride(),
        weight, *weight.stride(),
        x if bias is None else bias, 0 if bias is None else bias.stride(0),
        x if residual is None else residual, *res_strides,
        out, *out.stride(),
        m, c_out, c_in, h, w, ho, wo, kh, kw,
        stride[0], stride[1], padding[0], padding[1],
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return out


torch.library.register_autograd(QUALNAME, _ops.backward, setup_context=_ops.setup_context)
