"""Independent float64 answers for the ops' values: what the plain-PyTorch references in hrnet_fast/ops
are themselves checked against.

Written differently from those references on purpose: the convolution as an explicit sum over
sliding windows (pad, unfold, einsum) rather than F.conv2d, and nearest upsampling as an index gather
by PyTorch's documented rule rather than F.interpolate. Everything runs in float64, so the result is
what float32 kernels round towards; the caller casts it back to compare.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)  # keeps the autograd graph of a tensor that has one


def _act(out: torch.Tensor, relu: bool) -> torch.Tensor:
    # max(v, 0) written out; NaN compares false and stays NaN, as torch.relu keeps it
    return torch.where(out < 0, torch.zeros_like(out), out) if relu else out


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding) + bias + residual) in float64, as
    out[n, o, i, j] = sum_{c, p, q} xpad[n, c, i*sh + p, j*sw + q] * weight[o, c, p, q].

    Differentiable (autograd through pad/unfold/einsum), so gradients can be checked too.
    """
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    x64, w64 = _f64(x), _f64(weight)
    kh, kw = w64.shape[2:]
    windows = F.pad(x64, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [N, C, H_out, W_out, kh, kw]
    out = torch.einsum("nchwpq,ocpq->nohw", windows, w64)
    if bias is not None:
        out = out + _f64(bias)[None, :, None, None]
    if residual is not None:
        out = out + _f64(residual)
    return _act(out, relu)


def nearest_index(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of each output index for nearest upsampling to a given size (F.interpolate's
    "nearest"): floor(dst * scale) with scale = in/out, both in float32, clamped to in - 1.

    The float32 product matters: 26 -> 22 maps output 11 to 12, where exact arithmetic gives 13.
    """
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float32)
    return torch.floor(dst * scale).long().clamp(max=in_size - 1)


def upsample_nearest(y: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """y [N, C, h, w] gathered to [N, C, *size] by nearest_index along each axis."""
    rows, cols = nearest_index(y.shape[2], size[0]), nearest_index(y.shape[3], size[1])
    return y.index_select(2, rows.to(y.device)).index_select(3, cols.to(y.device))


def linear_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear along one axis, written from F.interpolate's documented sampling: output index d
    samples the source coordinate d * (in - 1) / (out - 1) with align_corners (0 for out = 1), else
    (d + 0.5) * in / out - 0.5 clamped at 0; it blends the two source pixels around it, the last pixel
    repeated at the far edge. Returns (lower index, upper index, upper weight), float64 weights."""
    d = torch.arange(out_size, dtype=torch.float64)
    if align_corners:
        src = d * ((in_size - 1) / (out_size - 1)) if out_size > 1 else torch.zeros(out_size, dtype=torch.float64)
    else:
        src = ((d + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo, hi, (src - lo).clamp(max=1)


def upsample_bilinear(y: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    """y [N, C, h, w] to [N, C, *size]: the 1-D blend along H, then along W (bilinear is separable)."""
    for axis, out_size in ((2, size[0]), (3, size[1])):
        lo, hi, t = linear_taps(y.shape[axis], out_size, align_corners)
        shape = [1, 1, 1, 1]
        shape[axis] = out_size
        t = t.to(y.device).view(shape)
        y = y.index_select(axis, lo.to(y.device)) * (1 - t) + y.index_select(axis, hi.to(y.device)) * t
    return y


def fuse_multi_res(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    relu: bool = True,
    mode: str = "nearest",
    align_corners: bool = False,
) -> torch.Tensor:
    """act(base + bias + sum_k upsample(weights[k] @ lowres[k])) in float64, each 1x1 conv as a channel
    contraction (einsum) and the upsampling as an index gather (nearest) or gathers and blends (bilinear)."""
    out = _f64(base)
    if bias is not None:
        out = out + _f64(bias)[None, :, None, None]
    for x, w in zip(lowres, weights):
        w64 = _f64(w).reshape(w.shape[0], w.shape[1])
        y = torch.einsum("ck,nkhw->nchw", w64, _f64(x))
        if mode == "bilinear":
            out = out + upsample_bilinear(y, base.shape[-2:], align_corners)
        else:
            out = out + upsample_nearest(y, base.shape[-2:])
    return _act(out, relu)
