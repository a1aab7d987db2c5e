"""conv_bias_act: act(conv2d(x, weight, stride, padding) + bias + residual).

Every folded Conv+BN(+add)(+ReLU) of HRNet. The reference is plain PyTorch (ops/reference.py); the
compiled kernels are torch.ops.hrnet_fast.conv_bias_act (CPU, CUDA), the Triton kernel
torch.ops.hrnet_fast.conv_bias_act_triton (hrnet_fast/triton/conv.py). Argument checks, fake and
autograd, which every backend shares, are in ops/_meta.py; the backend table in ops/_backend.py.

Pre-packed weights (CPU, inference): `prepack` reorders a weight once into oneDNN's blocked layout.
Pass the packed weight instead of the dense one to `conv_bias_act(..., backend="cpu")` (or "auto"),
or straight to torch.ops.hrnet_fast.conv_bias_act (no Python checks: the leanest call). Keep the
dense weight for the other backends, for autograd and for torch.compile (fake tensors cannot hold
oneDNN layouts).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hrnet_fast.ops import _backend
from hrnet_fast.ops._checks import check_4d, pair
from hrnet_fast.ops._meta import check_conv_bias_act

OP = "conv_bias_act"


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
    check_conv_bias_act(x, weight, bias, stride, padding, residual)
    chosen = _backend.resolve(backend, x.device, OP)
    if weight.is_mkldnn and chosen != "cpu":
        raise ValueError(
            f"weight is pre-packed (oneDNN layout), which only the cpu backend accepts, but backend={chosen!r} "
            "was chosen: pass the dense weight to other backends"
        )
    return _backend.kernel(OP, chosen)(x, weight, bias, stride, padding, residual, relu)
