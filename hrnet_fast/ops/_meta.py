"""What every implementation of conv_bias_act and fuse_multi_res shares, whichever backend runs it:
argument checks, output shape, fake (meta) kernel and autograd formula.

A leaf (it imports only hrnet_fast._extension and ops/_checks.py): the functional API (ops/) and the
Triton kernels (triton/) both import it, and neither imports the other at module level. The compiled
ops (csrc/ops.cpp's schemas) get their fake and autograd from `register` below, at import; a Triton op
is defined with the fake from here and registers the autograd from here (`register_autograd`).
conv3x3_winograd keeps its own in ops/winograd.py: its backward is the adjoint of the Winograd
transforms defined there, and only the CPU library implements it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch._prims_common import suggest_memory_format

from hrnet_fast import _extension
from hrnet_fast.ops._checks import check_4d, check_bias, check_same, same_device

# ---- conv_bias_act: act(conv2d(x, weight, stride, padding) + bias + residual) -------------------


def conv_output_size(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> list[int]:
    """[N, C_out, H_out, W_out] of conv2d on an input of `x_shape` with a weight of `w_shape`."""
    h = (x_shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    w = (x_shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    return [x_shape[0], w_shape[0], h, w]


def conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> list[int]:
    """[N, C_out, H_out, W_out] of conv2d(x, weight, stride, padding)."""
    return conv_output_size(x.shape, weight.shape, stride, padding)


def check_conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    residual: torch.Tensor | None,
) -> None:
    """Raise ValueError/RuntimeError naming the argument when the inputs don't fit together."""
    check_4d("x", x)
    check_4d("weight", weight)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (C_out, {x.shape[1]}, kH, kW) to match x's {x.shape[1]} channels, "
            f"got {tuple(weight.shape)}"
        )
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={list(stride)}, padding={list(padding)}")
    shape = conv_output_shape(x, weight, stride, padding)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} kernel with padding {list(padding)}")
    check_bias(bias, weight.shape[0])
    if residual is not None and list(residual.shape) != shape:
        raise ValueError(f"residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")
    check_same("x", x, [("weight", weight), ("bias", bias), ("residual", residual)])


def conv_bias_act_fake(x, weight, bias, stride, padding, residual=None, relu=True):
    same_device("hrnet_fast::conv_bias_act", [("x", x), ("weight", weight), ("bias", bias), ("residual", residual)])
    shape = conv_output_shape(x, weight, stride, padding)
    # the kernels give channels_last output exactly when x suggests channels_last (as aten's conv does)
    return x.new_empty(shape).contiguous(memory_format=suggest_memory_format(x))


def conv_bias_act_into_fake(x, weight, bias, stride, padding, residual, relu, out):
    """conv_bias_act_into's fake: nothing to return; `out` must have the output's shape."""
    same_device("hrnet_fast::conv_bias_act_into", [("x", x), ("weight", weight), ("bias", bias), ("residual", residual), ("out", out)])
    shape = conv_output_shape(x, weight, stride, padding)
    if list(out.shape) != shape:
        raise ValueError(f"out must have the output's shape {tuple(shape)}, got {tuple(out.shape)}")


def conv_bias_act_split_fake(x, weight, bias, stride, padding, channels, residuals, relus):
    """conv_bias_act_split's fake: one output a part of `channels`, in x's memory format."""
    same_device("hrnet_fast::conv_bias_act_split", [("x", x), ("weight", weight), ("bias", bias)]
                + [(f"residuals[{k}]", r) for k, r in enumerate(residuals)])
    if not (len(channels) == len(residuals) == len(relus)) or sum(channels) != weight.shape[0]:
        raise ValueError(
            f"channels {list(channels)} must add up to the weight's {weight.shape[0]} output channels, with a "
            f"residual and a relu each (got {len(residuals)} and {len(relus)})"
        )
    n, _, h, w = conv_output_shape(x, weight, stride, padding)
    fmt = suggest_memory_format(x)
    return [x.new_empty(n, c, h, w).contiguous(memory_format=fmt) for c in channels]


def _conv_bias_act_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, residual, relu = inputs
    if weight.is_mkldnn:
        raise RuntimeError("conv_bias_act: a pre-packed weight is for inference only; use the dense weight for autograd")
    ctx.stride, ctx.padding, ctx.relu = list(stride), list(padding), relu
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(x, weight, output)


def _conv_bias_act_backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    if ctx.relu:
        grad = grad * (out > 0)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1, [True, True, False]
    )
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
    grad_residual = grad if ctx.has_residual else None
    # One gradient per input the caller passed: torch 2.11's AOT autograd leaves trailing defaults
    # out of the call, fills them in for setup_context, but then wants them out of the result.
    return (grad_x, grad_w, grad_bias, None, None, grad_residual, None)[: len(ctx.needs_input_grad)]


# ---- fuse_multi_res: act(base + bias + sum_k up(conv1x1(lowres[k], weights[k]))), up nearest or bilinear --


FUSE_MODES = ("nearest", "bilinear")


def check_fuse_mode(mode: str, align_corners: bool) -> None:
    """mode is "nearest" or "bilinear"; align_corners goes with bilinear only (as in F.interpolate)."""
    if mode not in FUSE_MODES:
        raise ValueError(f"mode must be one of {FUSE_MODES}, got {mode!r}")
    if align_corners and mode != "bilinear":
        raise ValueError(f"align_corners=True goes with mode='bilinear' only (as in F.interpolate), got mode={mode!r}")


def check_fuse_multi_res(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    mode: str = "nearest",
    align_corners: bool = False,
) -> None:
    """Raise ValueError/RuntimeError naming the argument when the inputs don't fit together."""
    check_fuse_mode(mode, align_corners)
    check_4d("base", base)
    n, c = base.shape[:2]
    check_lowres(lowres, weights, n, c)
    check_bias(bias, c)
    check_same(
        "base",
        base,
        [(f"lowres[{k}]", x) for k, x in enumerate(lowres)]
        + [(f"weights[{k}]", w) for k, w in enumerate(weights)]
        + [("bias", bias)],
    )


def check_lowres(
    lowres: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], n: int, c: int,
    batch_of: str = "base", channels_of: str = "base",
) -> None:
    """Each low-res input 4-D, of batch n and a non-empty image, with its [c, C_k] (or [c, C_k, 1, 1]) 1x1 weight."""
    check_paired(lowres, weights)
    for k, (x, w) in enumerate(zip(lowres, weights)):
        check_4d(f"lowres[{k}]", x)
        if x.shape[0] != n:
            raise ValueError(f"lowres[{k}] has batch {x.shape[0]} but {batch_of} has batch {n}")
        if x.shape[2] == 0 or x.shape[3] == 0:  # no source pixel to interpolate from
            raise ValueError(f"lowres[{k}] must have a non-empty spatial size, got shape {tuple(x.shape)}")
        ck = x.shape[1]
        if not (w.dim() == 2 or (w.dim() == 4 and w.shape[2:] == (1, 1))) or tuple(w.shape[:2]) != (c, ck):
            raise ValueError(
                f"weights[{k}] must have shape ({c}, {ck}) or ({c}, {ck}, 1, 1) to map lowres[{k}]'s "
                f"{ck} channels to {channels_of}'s {c}, got {tuple(w.shape)}"
            )


def check_paired(lowres: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> None:
    """One weight per low-res input (the only check an op called directly, with no Python in front, needs first)."""
    if len(lowres) != len(weights):
        raise ValueError(f"got {len(lowres)} lowres inputs but {len(weights)} weights: need one weight per input")


def fuse_multi_res_fake(base, lowres, weights, bias=None, relu=True, mode="nearest", align_corners=False):
    check_fuse_mode(mode, align_corners)
    same_device("hrnet_fast::fuse_multi_res", [("base", base)] + [(f"lowres[{k}]", t) for k, t in enumerate(lowres)]
                + [(f"weights[{k}]", t) for k, t in enumerate(weights)] + [("bias", bias)])
    return torch.empty_like(base)


def _fuse_multi_res_setup_context(ctx, inputs, output):
    # AOT autograd may leave trailing defaults (relu, mode, align_corners) out of `inputs`
    base, lowres, weights, bias = inputs[:4]
    relu, mode, align_corners = (tuple(inputs[4:]) + (True, "nearest", False)[len(inputs) - 4 :])[:3]
    ctx.n = len(lowres)
    ctx.relu = relu
    ctx.mode, ctx.align_corners = mode, align_corners
    ctx.has_bias = bias is not None
    ctx.weight_dims = [w.dim() for w in weights]
    ctx.save_for_backward(output, *lowres, *weights)


def _linear_matrix(in_size, out_size, align_corners: bool, like: torch.Tensor) -> torch.Tensor:
    """[out_size, in_size]: bilinear upsampling along one axis as a matrix, with aten's source
    coordinates ((d + 0.5) * in / out - 0.5 clamped at 0, or d * (in - 1) / (out - 1) with align_corners)."""
    d = torch.arange(out_size, dtype=torch.float32, device=like.device)
    if align_corners:
        src = d * ((in_size - 1) / (out_size - 1)) if out_size > 1 else d * 0.0
    else:
        src = ((d + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    lo = src.long().clamp(max=in_size - 1)  # src >= 0: truncation is floor
    hi = (lo + 1).clamp(max=in_size - 1)
    t = (src - lo).clamp(max=1).to(like.dtype)
    rows = torch.arange(out_size, device=like.device)
    a = torch.zeros(out_size, in_size, dtype=like.dtype, device=like.device)
    a.index_put_((rows, lo), 1 - t, accumulate=True)
    return a.index_put_((rows, hi), t, accumulate=True)


def _fuse_multi_res_backward(ctx, grad):
    out, *rest = ctx.saved_tensors
    lowres, weights = rest[: ctx.n], rest[ctx.n :]
    if ctx.relu:
        grad = grad * (out > 0)
    size = list(grad.shape[-2:])
    grad_lowres, grad_weights = [], []
    for x, w, wdim in zip(lowres, weights, ctx.weight_dims):
        # adjoint of the upsampling to base's size: each source pixel collects the output gradient
        # of the pixels it contributed to (with their bilinear weights)
        in_size = list(grad.shape[:2]) + list(x.shape[-2:])
        if ctx.mode == "bilinear":
            # bilinear is separable: up(y) = A_h y A_w^T, so its adjoint is A_h^T g A_w (aten's
            # upsample_bilinear2d_backward would do, but does not take symbolic sizes under AOT tracing)
            a_h = _linear_matrix(x.shape[2], size[0], ctx.align_corners, grad)
            a_w = _linear_matrix(x.shape[3], size[1], ctx.align_corners, grad)
            g = torch.einsum("nchw,hi,wj->ncij", grad, a_h, a_w)
        else:
            g = torch.ops.aten.upsample_nearest2d_backward(grad, size, in_size, None, None)
        w2 = w.reshape(w.shape[0], w.shape[1])
        grad_lowres.append(torch.einsum("nchw,ck->nkhw", g, w2))
        gw = torch.einsum("nchw,nkhw->ck", g, x)
        grad_weights.append(gw if wdim == 2 else gw[:, :, None, None])
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
    # One gradient per input the caller passed: torch 2.11's AOT autograd leaves trailing defaults
    # (relu=True, ...) out of the call, fills them in for setup_context, but then wants them out of the result.
    return (grad, grad_lowres, grad_weights, grad_bias, None, None, None)[: len(ctx.needs_input_grad)]


# ---- seg_head: the segmentation HRNet's head in one op (csrc/cpu/seg_head.cpp), inference only --------


def seg_head_fake(x, lowres, weight, bias, weights, classifier, classifier_bias, align_corners):
    """seg_head's fake: [N, classes, H, W] in x's memory format; the shapes checked as the kernel does."""
    same_device("hrnet_fast::seg_head", [("x", x), ("weight", weight), ("bias", bias), ("classifier", classifier),
                                         ("classifier_bias", classifier_bias)]
                + [(f"lowres[{k}]", t) for k, t in enumerate(lowres)] + [(f"weights[{k}]", t) for k, t in enumerate(weights)])
    check_4d("x", x)
    for name, w, cin in (("weight", weight, x.shape[1]), ("classifier", classifier, weight.shape[0])):
        if w.dim() != 4 or w.shape[1] != cin or tuple(w.shape[2:]) != (1, 1):
            raise ValueError(f"{name} must be a 1x1 conv weight [C_out, {cin}, 1, 1], got shape {tuple(w.shape)}")
    check_bias(bias, weight.shape[0])
    check_lowres(lowres, weights, x.shape[0], weight.shape[0], batch_of="x", channels_of="weight")
    check_bias(classifier_bias, classifier.shape[0])
    return x.new_empty(x.shape[0], classifier.shape[0], *x.shape[2:]).contiguous(memory_format=suggest_memory_format(x))


# ---- registration -----------------------------------------------------------------------------

# op -> (fake, setup_context, backward), for every op with that op's schema (compiled or Triton)
_FORMULAS: dict[str, tuple[Callable, Callable, Callable]] = {
    "conv_bias_act": (conv_bias_act_fake, _conv_bias_act_setup_context, _conv_bias_act_backward),
    "fuse_multi_res": (fuse_multi_res_fake, _fuse_multi_res_setup_context, _fuse_multi_res_backward),
}


def register_autograd(qualname: str, op: str) -> None:
    """Register `op`'s autograd formula for `qualname`, an op with `op`'s schema."""
    _, setup_context, backward = _FORMULAS[op]
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register(qualname: str, op: str) -> None:
    """Register `op`'s fake kernel and autograd formula for `qualname`, an op with `op`'s schema."""
    torch.library.register_fake(qualname)(_FORMULAS[op][0])
    register_autograd(qualname, op)


if _extension.is_built():
    register("hrnet_fast::conv_bias_act", "conv_bias_act")
    register("hrnet_fast::fuse_multi_res", "fuse_multi_res")
    torch.library.register_fake("hrnet_fast::conv_bias_act_into")(conv_bias_act_into_fake)  # inference only: no autograd
    torch.library.register_fake("hrnet_fast::conv_bias_act_split")(conv_bias_act_split_fake)  # the same
    torch.library.register_fake("hrnet_fast::seg_head")(seg_head_fake)  # the same
