"""Triton kernel for conv_bias_act: an implicit-GEMM conv2d with bias, residual and ReLU in the epilogue.

GEMM view: M = output pixels (N*Ho*Wo), N = C_out, K = kh*kw*C_in. Each program owns a BLOCK_M x
BLOCK_N output tile; the K loop walks the kernel taps (r, s) outermost and C_in in BLOCK_K chunks
innermost, so with NHWC input every A-tile row is a contiguous run of channels. Any input, weight,
residual strides work (strides are kernel arguments); padding is a load mask, never a padded copy.
Accumulation is fp32; the output is written once in the input dtype.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format
from torch.library import triton_op, wrap_triton

from hrnet_fast.triton._common import channel_block, dot_precision, interpreting

# the module, not the function of the same name that hrnet_fast.ops re-exports
_ops = importlib.import_module("hrnet_fast.ops.conv_bias_act")

QUALNAME = "hrnet_fast::conv_bias_act_triton"


@triton.jit
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 pixel indices: N*Ho*Wo*strides can pass 2**31 for large batches
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    n = offs_m // (WO * HO)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(KH):
        hi = ho * STRIDE_H - PAD_H + r
        for s in range(KW):
            wi = wo * STRIDE_W - PAD_W + s
            # zero padding: taps outside the input are masked out of the A tile
            valid = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            row = n * sxn + hi * sxh + wi * sxw
            for k0 in range(0, C_IN, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < C_IN
                a = tl.load(x_ptr + row[:, None] + kk[None, :] * sxc, mask=valid[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(
                    w_ptr + offs_n[None, :] * swo + kk[:, None] * swi + r * swh + s * sww,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * s_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(
            res_ptr + (n * srn + ho * srh + wo * srw)[:, None] + offs_n[None, :] * src, mask=mask, other=0.0
        ).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + (n * son + ho * soh + wo * sow)[:, None] + offs_n[None, :] * soc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(c_out: int, c_in: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): one small tile under the interpreter, GPU-sized otherwise."""
    if interpreting():
        return 16, 16, 16, 1
    # HRNet's C_out/C_in are 18..512: a 64-pixel x up-to-64-channel tile keeps many programs in flight at batch 1
    block_n = channel_block(c_out, 64)
    block_k = channel_block(c_in, 32)
    return 64, block_n, block_k, 4 if block_n <= 32 else 8


@triton_op(QUALNAME, mutates_args=())
def conv_bias_act_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding) + bias + residual); channels_last out iff x suggests it."""
    if len(stride) != 2 or len(padding) != 2:
        raise ValueError(f"stride and padding must have 2 entries, got stride={list(stride)}, padding={list(padding)}")
    shape = _ops.output_shape(x, weight, stride, padding)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    if out.numel() == 0:
        return out
    n, c_out, ho, wo = shape
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    kh, kw = weight.shape[2], weight.shape[3]
    block_m, block_n, block_k, num_warps = _blocks(c_out, c_in)
    m = n * ho * wo
    res = out if residual is None else residual  # unused slot when absent (HAS_RESIDUAL is constexpr)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))
    wrap_triton(_conv_bias_act_kernel)[grid](
        x, *x.stride(), weight, *weight.stride(), x if bias is None else bias, 0 if bias is None else bias.stride(0),
        res, *res.stride(), out, *out.stride(),
        m, c_out, c_in, h, w, ho, wo,
        stride[0], stride[1], padding[0], padding[1],
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return out


torch.library.register_autograd(QUALNAME, _ops.backward, setup_context=_ops.setup_context)
