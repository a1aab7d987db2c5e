"""fuse_multi_res: act(base + bias + sum_k interpolate_nearest(conv1x1(lowres[k], weights[k]), size=base.shape[-2:])).

One fused output of an HRNet fusion layer (BN already folded into `weights` and `bias`). The
reference is plain PyTorch; the compiled kernels are torch.ops.hrnet_fast.fuse_multi_res (CPU, CUDA),
the Triton kernel torch.ops.hrnet_fast.fuse_multi_res_triton. Fake and autograd are registered here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hrnet_fast import _extension
from hrnet_fast.ops import _backend
from hrnet_fast.ops._checks import check_4d, check_bias, check_same, same_device

OP = "fuse_multi_res"


def _as_conv1x1(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 4 else w[:, :, None, None]


def check_inputs(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
) -> None:
    """Raise ValueError/RuntimeError naming the argument when the inputs don't fit together."""
    check_4d("base", base)
    n, c = base.shape[:2]
    if len(lowres) != len(weights):
        raise ValueError(f"got {len(lowres)} lowres inputs but {len(weights)} weights: need one weight per input")
    for k, (x, w) in enumerate(zip(lowres, weights)):
        check_4d(f"lowres[{k}]", x)
        if x.shape[0] != n:
            raise ValueError(f"lowres[{k}] has batch {x.shape[0]} but base has batch {n}")
        if x.shape[2] == 0 or x.shape[3] == 0:  # no nearest source pixel exists
            raise ValueError(f"lowres[{k}] must have a non-empty spatial size, got shape {tuple(x.shape)}")
        ck = x.shape[1]
        if not (w.dim() == 2 or (w.dim() == 4 and w.shape[2:] == (1, 1))) or tuple(w.shape[:2]) != (c, ck):
            raise ValueError(
                f"weights[{k}] must have shape ({c}, {ck}) or ({c}, {ck}, 1, 1) to map lowres[{k}]'s "
                f"{ck} channels to base's {c}, got {tuple(w.shape)}"
            )
    check_bias(bias, c)
    check_same(
        "base",
        base,
        [(f"lowres[{k}]", x) for k, x in enumerate(lowres)]
        + [(f"weights[{k}]", w) for k, w in enumerate(weights)]
        + [("bias", bias)],
    )


def fuse_multi_res_reference(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: what every backend is tested against."""
    out = base if bias is None else base + bias.view(1, -1, 1, 1)
    for x, w in zip(lowres, weights):
        y = F.conv2d(x, _as_conv1x1(w))
        out = out + F.interpolate(y, size=base.shape[-2:], mode="nearest")
    return torch.relu(out) if relu else out


def fuse_multi_res(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    relu: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """act(base + bias + sum_k nearest_upsample(conv1x1(lowres[k], weights[k]))) on `backend`.

    backend: "auto" (compiled kernel for the device, else Triton on CUDA, else torch), "torch",
    "cpu", "cuda" or "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    weights[k] is [C, C_k] or [C, C_k, 1, 1]; the output has base's shape and memory format.
    """
    lowres, weights = list(lowres), list(weights)
    check_inputs(base, lowres, weights, bias)
    chosen = _backend.resolve(backend, base.device, OP)
    if chosen == "torch":
        return fuse_multi_res_reference(base, lowres, weights, bias, relu)
    if chosen == "triton":
        from hrnet_fast.triton import fuse_multi_res as _triton  # noqa: F401  (imports triton lazily)

        return torch.ops.hrnet_fast.fuse_multi_res_triton(base, lowres, weights, bias, relu)
    return torch.ops.hrnet_fast.fuse_multi_res(base, lowres, weights, bias, relu)


# ---- fake and autograd, shared by the compiled op and the Triton op -------------------------


def fake(base, lowres, weights, bias=None, relu=True):
    same_device("hrnet_fast::fuse_multi_res", [("base", base)] + [(f"lowres[{k}]", t) for k, t in enumerate(lowres)]
                + [(f"weights[{k}]", t) for k, t in enumerate(weights)] + [("bias", bias)])
    return torch.empty_like(base)


def setup_context(ctx, inputs, output):
    base, lowres, weights, bias, relu = inputs
    ctx.n = len(lowres)
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.weight_dims = [w.dim() for w in weights]
    ctx.save_for_backward(output, *lowres, *weights)


def backward(ctx, grad):
    out, *rest = ctx.saved_tensors
    lowres, weights = rest[: ctx.n], rest[ctx.n :]
    if ctx.relu:
        grad = grad * (out > 0)
    size = list(grad.shape[-2:])
    grad_lowres, grad_weights = [], []
    for x, w, wdim in zip(lowres, weights, ctx.weight_dims):
        # adjoint of nearest-by-size upsampling: sum the output gradient into each source pixel
        g = torch.ops.aten.upsample_nearest2d_backward(grad, size, list(grad.shape[:2]) + list(x.shape[-2:]), None, None)
        w2 = w.reshape(w.shape[0], w.shape[1])
        grad_lowres.append(torch.einsum("nchw,ck->nkhw", g, w2))
        gw = torch.einsum("nchw,nkhw->ck", g, x)
        grad_weights.append(gw if wdim == 2 else gw[:, :, None, None])
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
    # One gradient per input the caller passed: torch 2.11's AOT autograd leaves the trailing default
    # (relu=True) out of the call, fills it in for setup_context, but then wants it out of the result.
    return (grad, grad_lowres, grad_weights, grad_bias, None)[: len(ctx.needs_input_grad)]


def register(qualname: str) -> None:
    """Register fake and autograd for an op with fuse_multi_res's schema."""
    torch.library.register_fake(qualname)(fake)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


if _extension.is_built():
    register(f"hrnet_fast::{OP}")
