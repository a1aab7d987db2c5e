"""Triton kernel for fuse_multi_res: one launch computes act(base + bias + sum_k up(conv1x1(lowres[k]))).

Each program owns a tile of output pixels (flattened n, h, w) x output channels. It loads the base
tile, adds bias, and for every low-res input gathers the input rows its pixels map to under nearest
upsampling (PyTorch's float32 index math) and multiplies them by the weight tile with tl.dot, all in
fp32; ReLU and one store in the output dtype. No full-resolution intermediate is ever written.

Up to MAX_LOWRES_PER_LAUNCH low-res inputs go into the single launch (HRNet fuses at most 3). More
are accepted by chaining launches through an fp32 scratch buffer, because the op's contract (and
tests/test_fuse_multi_res.py) allows any number; every HRNet fusion is one launch.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from hrnet_fast.ops import _meta
from hrnet_fast.triton._common import (
    cdiv, channel_block, define_op, device_guard, dot, dot_precision, interpreting, linear_scale, nearest_scale,
    remembered, tracing,
)

QUALNAME = "hrnet_fast::fuse_multi_res_triton"
# Low-res inputs one launch takes: the kernel's argument slots (x0.., x1.., x2..). A Triton kernel
# takes no array of pointers, so each slot is spelled out in its signature and its body, and 3 is
# the most HRNet adds into one output (the top branch of a 4-branch stage takes the 3 below it).
# The C++ kernels' limit, kFuseMaxLowres = 4 in csrc/kernels/fuse_multi_res.h, is a separate choice
# (a fixed-size array in their parameter block, which Python cannot read); the two need not agree,
# as either only decides where a longer list is split into chained launches.
MAX_LOWRES_PER_LAUNCH = 3


@triton.jit
def _source_taps(dst, size_in, scale, ALIGN_CORNERS: tl.constexpr):
    """Bilinear along one axis, as aten's upsample_bilinear2d: the two source indices and their weights."""
    if ALIGN_CORNERS:
        real = dst.to(tl.float32) * scale
    else:
        real = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = real.to(tl.int64)  # real >= 0: truncation is floor
    i1 = tl.where(i0 < size_in - 1, i0 + 1, i0)
    l1 = tl.minimum(real - i0.to(tl.float32), 1.0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _add_lowres(
    acc, n, h, w, offs_c, mask_p, mask_c,
    x_ptr, sxn, sxc, sxh, sxw, hi, wi, ck, scale_h, scale_w,
    w_ptr, swc, swk,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BILINEAR: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    """acc += up(x) @ w^T for this tile: gather the source rows (nearest: one per pixel; bilinear: the
    four corners, blended in fp32), then a K-loop of tl.dot. Interpolating x before the 1x1 conv equals
    interpolating after it: both are linear, on different axes."""
    offs_k = tl.arange(0, BLOCK_K)
    if BILINEAR:
        y0, y1, ly0, ly1 = _source_taps(h, hi, scale_h, ALIGN_CORNERS)
        x0, x1, lx0, lx1 = _source_taps(w, wi, scale_w, ALIGN_CORNERS)
        r00 = n * sxn + y0 * sxh + x0 * sxw
        r01 = n * sxn + y0 * sxh + x1 * sxw
        r10 = n * sxn + y1 * sxh + x0 * sxw
        r11 = n * sxn + y1 * sxh + x1 * sxw
        for k0 in range(0, ck, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < ck
            m = mask_p[:, None] & mask_k[None, :]
            ko = kk[None, :] * sxc
            a00 = tl.load(x_ptr + r00[:, None] + ko, mask=m, other=0.0).to(tl.float32)
            a01 = tl.load(x_ptr + r01[:, None] + ko, mask=m, other=0.0).to(tl.float32)
            a10 = tl.load(x_ptr + r10[:, None] + ko, mask=m, other=0.0).to(tl.float32)
            a11 = tl.load(x_ptr + r11[:, None] + ko, mask=m, other=0.0).to(tl.float32)
            a = ly0[:, None] * (lx0[:, None] * a00 + lx1[:, None] * a01) + ly1[:, None] * (lx0[:, None] * a10 + lx1[:, None] * a11)
            b = tl.load(w_ptr + offs_c[None, :] * swc + kk[:, None] * swk, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            acc = dot(a.to(b.dtype), b, acc, DOT_PRECISION)
    else:
        # aten: src = min(floor(float32(dst) * float32(in / out)), in - 1)
        hs = tl.minimum(tl.floor(h.to(tl.float32) * scale_h).to(tl.int64), hi - 1)
        ws = tl.minimum(tl.floor(w.to(tl.float32) * scale_w).to(tl.int64), wi - 1)
        row = n * sxn + hs * sxh + ws * sxw
        for k0 in range(0, ck, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < ck
            a = tl.load(x_ptr + row[:, None] + kk[None, :] * sxc, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_c[None, :] * swc + kk[:, None] * swk, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            acc = dot(a, b, acc, DOT_PRECISION)
    return acc


# Spatial sizes vary per fusion: specialising them would compile variants for nothing. Strides and
# channel counts stay specialised: a unit channel stride and channel counts known to be multiples of 16
# make the masked channel loads vector loads (see _SIZES in hrnet_fast/triton/conv.py).
_SIZES = ["h0", "w0", "h1", "w1", "h2", "w2", "P", "H", "W"]


@triton.jit(do_not_specialize=_SIZES)
def _fuse_multi_res_kernel(
    base_ptr, sbn, sbc, sbh, sbw,
    out_ptr, son, soc, soh, sow,
    bias_ptr, s_bias,
    x0, x0n, x0c, x0h, x0w, h0, w0, c0, sh0, sw0, w0_ptr, w0c, w0k,
    x1, x1n, x1c, x1h, x1w, h1, w1, c1, sh1, sw1, w1_ptr, w1c, w1k,
    x2, x2n, x2c, x2h, x2w, h2, w2, c2, sh2, sw2, w2_ptr, w2c, w2k,
    P, C, H, W,
    NUM_LOWRES: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BILINEAR: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    # int64 pixel indices: N*H*W*strides can pass 2**31 for large batches
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    w = offs_p % W
    h = (offs_p // W) % H
    n = offs_p // (W * H)
    mask = mask_p[:, None] & mask_c[None, :]

    acc = tl.load(
        base_ptr + (n * sbn + h * sbh + w * sbw)[:, None] + offs_c[None, :] * sbc, mask=mask, other=0.0
    ).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c * s_bias, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    # Sum the low-res terms separately, then add once: the reference adds each upsampled conv to
    # base + bias in turn, and a single fp32 GEMM accumulator is closest to that order per input.
    if NUM_LOWRES > 0:
        acc += _add_lowres(tl.zeros((BLOCK_P, BLOCK_C), tl.float32), n, h, w, offs_c, mask_p, mask_c,
                           x0, x0n, x0c, x0h, x0w, h0, w0, c0, sh0, sw0, w0_ptr, w0c, w0k, BLOCK_K, DOT_PRECISION,
                           BILINEAR, ALIGN_CORNERS)
    if NUM_LOWRES > 1:
        acc += _add_lowres(tl.zeros((BLOCK_P, BLOCK_C), tl.float32), n, h, w, offs_c, mask_p, mask_c,
                           x1, x1n, x1c, x1h, x1w, h1, w1, c1, sh1, sw1, w1_ptr, w1c, w1k, BLOCK_K, DOT_PRECISION,
                           BILINEAR, ALIGN_CORNERS)
    if NUM_LOWRES > 2:
        acc += _add_lowres(tl.zeros((BLOCK_P, BLOCK_C), tl.float32), n, h, w, offs_c, mask_p, mask_c,
                           x2, x2n, x2c, x2h, x2w, h2, w2, c2, sh2, sw2, w2_ptr, w2c, w2k, BLOCK_K, DOT_PRECISION,
                           BILINEAR, ALIGN_CORNERS)
    if RELU:
        # acc < 0 is false for NaN: NaN passes through, as torch.relu lets it (tl.maximum would not)
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + (n * son + h * soh + w * sow)[:, None] + offs_c[None, :] * soc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(channels: int, lowres_channels: Sequence[int], bilinear: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, BLOCK_K, num_warps): one fixed tile under the interpreter, GPU-sized otherwise."""
    if interpreting():
        # the interpreter pays per program, so one mid-sized tile (far fewer programs than 16-wide
        # tiles), still small enough that the tests cover edge masks and several tiles
        return 64, 32, 32, 1
    # Four warps, one warpgroup: Hopper's wgmma needs one (two warps fall back to mma.sync). K steps of
    # at most 32 channels, and bilinear output tiles of at most 32: the top output of a 4-branch module
    # sums three inputs, and the bilinear blend holds four gathered K tiles at once; wider, or on two
    # warps, that spilled registers on sm_90 (up to 1.8 KB a thread in fp32; tests/triton_sm90.py).
    block_k = channel_block(max(lowres_channels, default=16), 32)
    return 64, channel_block(channels, 32 if bilinear else 64), block_k, 4


class _Plan(NamedTuple):
    """One launch's arguments for a call signature, with the call's tensors still to be put in."""

    args: list[Any]  # the kernel's positional arguments; the entries at `slots` are replaced per call
    slots: tuple[int, ...]  # where base, out, bias, then each slot's low-res input and weight go
    grid: tuple[int, int]
    kwargs: dict[str, Any]  # constexprs and num_warps


def _tensors(base: torch.Tensor, out: torch.Tensor, lowres: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
             bias: torch.Tensor | None) -> list[torch.Tensor]:
    """The launch's tensors in the order they stand among its arguments (unused slots take `base`)."""
    ts = [base, out, base if bias is None else bias]
    for k in range(MAX_LOWRES_PER_LAUNCH):
        ts += [lowres[k], weights[k]] if k < len(lowres) else [base, base]
    return ts


def _make_plan(
    base: torch.Tensor,
    out: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    relu: bool,
    bilinear: bool,
    align_corners: bool,
) -> _Plan:
    n, c, h, w = base.shape
    args: list[Any] = []
    for k in range(MAX_LOWRES_PER_LAUNCH):
        if k < len(lowres):
            x, wt = lowres[k], weights[k]
            hi, wi = x.shape[2], x.shape[3]
            if bilinear:
                sh, sw = linear_scale(hi, h, align_corners), linear_scale(wi, w, align_corners)
            else:
                sh, sw = nearest_scale(hi, h), nearest_scale(wi, w)
            args += [x, *x.stride(), hi, wi, x.shape[1], sh, sw, wt, wt.stride(0), wt.stride(1)]
        else:  # unused slot: any valid tensor, never read (NUM_LOWRES is constexpr)
            args += [base, 0, 0, 0, 0, 1, 1, 0, 1.0, 1.0, base, 0, 0]
    args = [base, *base.stride(), out, *out.stride(), base if bias is None else bias,
            0 if bias is None else bias.stride(0), *args, n * h * w, c, h, w]
    block_p, block_c, block_k, num_warps = _blocks(c, [x.shape[1] for x in lowres], bilinear)
    kwargs = dict(NUM_LOWRES=len(lowres), HAS_BIAS=bias is not None, RELU=relu, BLOCK_P=block_p, BLOCK_C=block_c,
                  BLOCK_K=block_k, DOT_PRECISION=dot_precision(base.dtype), BILINEAR=bilinear,
                  ALIGN_CORNERS=align_corners, num_warps=num_warps)
    slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    return _Plan(args, slots, (cdiv(n * h * w, block_p), cdiv(c, block_c)), kwargs)


# Plans by call signature: the arguments but the tensors depend only on what the key holds, and
# building them (strides, scales, tiles) was most of this op's host time before the launch.
_PLANS: dict[tuple, _Plan] = {}


def _kept(plan: _Plan) -> _Plan:
    """The plan as _PLANS keeps it: its tensor slots emptied, so that the cache holds no call's tensors
    (the first call's output and inputs, GPU memory, for as long as the process runs)."""
    return plan._replace(args=[None if i in plan.slots else a for i, a in enumerate(plan.args)])


def _launch(
    base: torch.Tensor,
    out: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    relu: bool,
    bilinear: bool,
    align_corners: bool,
) -> None:
    """One kernel launch: out = act(base + bias + sum over these <= MAX_LOWRES_PER_LAUNCH low-res inputs)."""
    with device_guard(base):  # Triton launches on the current device, which need not be base's
        if tracing(base):  # sizes may be symbolic: nothing is remembered
            plan = _make_plan(base, out, lowres, weights, bias, relu, bilinear, align_corners)
            wrap_triton(_fuse_multi_res_kernel)[plan.grid](*plan.args, **plan.kwargs)
            return
        key = (base.shape, base.stride(), out.stride(), base.dtype, base.device,
               tuple((x.shape, x.stride(), wt.shape, wt.stride()) for x, wt in zip(lowres, weights)),
               None if bias is None else bias.stride(0), relu, bilinear, align_corners,
               torch.backends.cudnn.allow_tf32)  # fp32's dot precision follows it
        plan = _PLANS.get(key) or remembered(
            _PLANS, key, lambda: _kept(_make_plan(base, out, lowres, weights, bias, relu, bilinear, align_corners)))
        args = plan.args.copy()
        for i, t in zip(plan.slots, _tensors(base, out, lowres, weights, bias)):
            args[i] = t
        _fuse_multi_res_kernel[plan.grid](*args, **plan.kwargs)


@define_op(QUALNAME, _meta.fuse_multi_res_fake)
def fuse_multi_res_triton(
    base: torch.Tensor,
    lowres: list[torch.Tensor],
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    relu: bool = True,
    mode: str = "nearest",
    align_corners: bool = False,
) -> torch.Tensor:
    """act(base + bias + sum_k up(conv1x1(lowres[k], weights[k]))), up nearest or bilinear to base's size;
    out has empty_like(base)'s strides."""
    _meta.check_paired(lowres, weights)
    _meta.check_fuse_mode(mode, align_corners)
    out = torch.empty_like(base)
    if out.numel() == 0:
        return out
    m = MAX_LOWRES_PER_LAUNCH
    chunks = [(lowres[i : i + m], weights[i : i + m]) for i in range(0, len(lowres), m)] or [([], [])]
    src, b = base, bias
    for i, (xs, ws) in enumerate(chunks):
        last = i == len(chunks) - 1
        # more inputs than one launch takes (never in HRNet): chain launches through fp32, ReLU only at the end
        dst = out if last else torch.empty_like(base, dtype=torch.float32)
        _launch(src, dst, xs, ws, b, relu and last, mode == "bilinear", align_corners)
        src, b = dst, None
    return out


_meta.register_autograd(QUALNAME, "fuse_multi_res")
