"""conv_bias_act: act(conv2d(x, weight, stride, padding) + bias + residual).

Every folded Conv+BN(+add)(+ReLU) of HRNet. The reference is plain PyTorch; the compiled kernels are
torch.ops.hrnet_fast.conv_bias_act (CPU, CUDA), the Triton kernel torch.ops.hrnet_fast.conv_bias_act_triton.
Fake and autograd are registered here.

Pre-packed weights (CPU, inference): `prepack` reorders a weight once into oneDNN's blocked layout.
Pass the packed weight instead of the dense one to `conv_bias_act(..., backend="cpu")` (or "auto"),
or straight to torch.ops.hrnet_fast.conv_bias_act (no Python checks: the leanest call). Keep the
dense weight for the other backends, for autograd and for torch.compile (fake tensors cannot hold
oneDNN layouts).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from hrnet_fast import _extension
from hrnet_fast.ops import _backend
from hrnet_fast.ops._checks import check_4d, check_bias, check_same, pair, same_device

OP = "conv_bias_act"


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> list[int]:
    """[N, C_out, H_out, W_out] of conv2d(x, weight, stride, padding)."""
    h = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    return [x.shape[0], weight.shape[0], h, w]


def check_inputs(
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
    shape = output_shape(x, weight, stride, padding)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} kernel with padding {list(padding)}")
    check_bias(bias, weight.shape[0])
    if residual is not None and list(residual.shape) != shape:
        raise ValueError(f"residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")
    check_same("x", x, [("weight", weight), ("bias", bias), ("residual", residual)])


def prepack(
    weight: torch.Tensor,
    x_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """`weight` reordered once into the oneDNN layout its conv prefers for inputs of `x_shape`.

    Returns an MkldnnCPU tensor of the same logical shape that the cpu backend accepts in place of
    `weight` (for any input shape; `x_shape` only picks the fastest layout). Without it oneDNN
    reorders the dense weight on every call. float32 CPU weights only; inference only.
    A packed tensor cannot be deep-copied, pickled or saved (it has no storage): pack last, keep it
    as a plain attribute rather than a buffer, and keep the dense weight for state_dict;
    `packed.to_dense()` gives the dense weight back.
    """
    stride, padding = pair("stride", stride), pair("padding", padding)
    check_4d("weight", weight)
    if weight.is_mkldnn:
        return weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"prepack needs a float32 CPU weight, got {weight.dtype} on {weight.device}")
    x_shape = [int(v) for v in x_shape]
    if len(x_shape) != 4 or x_shape[1] != weight.shape[1]:
        raise ValueError(
            f"x_shape must be [N, {weight.shape[1]}, H, W] to match weight {tuple(weight.shape)}, got {x_shape}"
        )
    with torch.no_grad():
        dense = weight.detach().contiguous().to_mkldnn()
        return torch._C._nn.mkldnn_reorder_conv2d_weight(dense, padding, stride, [1, 1], 1, x_shape)


def conv_bias_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: what every backend is tested against."""
    out = F.conv2d(x, weight, bias, list(stride), list(padding))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """act(conv2d(x, weight) + bias + residual) on `backend` ("auto", "torch", "cpu", "cuda", "triton").

    The output's memory format follows x's (channels_last in, channels_last out).
    """
    stride, padding = pair("stride", stride), pair("padding", padding)
    check_inputs(x, weight, bias, stride, padding, residual)
    chosen = _backend.resolve(backend, x.device, OP)
    if weight.is_mkldnn and chosen != "cpu":
        raise ValueError(
            f"weight is pre-packed (oneDNN layout), which only the cpu backend accepts, but backend={chosen!r} "
            "was chosen: pass the dense weight to other backends"
        )
    if chosen == "torch":
        return conv_bias_act_reference(x, weight, bias, stride, padding, residual, relu)
    if chosen == "triton":
        from hrnet_fast.triton import conv_bias_act as _triton  # noqa: F401  (imports triton lazily)

        return torch.ops.hrnet_fast.conv_bias_act_triton(x, weight, bias, stride, padding, residual, relu)
    return torch.ops.hrnet_fast.conv_bias_act(x, weight, bias, stride, padding, residual, relu)


# ---- fake and autograd, shared by the compiled op and the Triton op -------------------------


def fake(x, weight, bias, stride, padding, residual=None, relu=True):
    same_device("hrnet_fast::conv_bias_act", [("x", x), ("weight", weight), ("bias", bias), ("residual", residual)])
    shape = output_shape(x, weight, stride, padding)
    # the kernels give channels_last output exactly when x suggests channels_last (as aten's conv does)
    return x.new_empty(shape).contiguous(memory_format=suggest_memory_format(x))


def setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, residual, relu = inputs
    if weight.is_mkldnn:
        raise RuntimeError("conv_bias_act: a pre-packed weight is for inference only; use the dense weight for autograd")
    ctx.stride, ctx.padding, ctx.relu = list(stride), list(padding), relu
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(x, weight, output)


def backward(ctx, grad):
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


def register(qualname: str) -> None:
    """Register fake and autograd for an op with conv_bias_act's schema."""
    torch.library.register_fake(qualname)(fake)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


if _extension.is_built():
    register(f"hrnet_fast::{OP}")
