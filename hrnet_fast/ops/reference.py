"""What each op computes, in plain PyTorch: the `torch` backend, and what every other backend is
tested against (itself checked against independent float64 computations in tests/references.py).
conv3x3_winograd's reference is conv_bias_act_reference with stride 1 and padding 1.

A leaf: imports nothing of hrnet_fast, so the backend table (ops/_backend.py) can hold these.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def conv_bias_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """act(conv2d(x, weight, stride, padding) + bias + residual)."""
    out = F.conv2d(x, weight, bias, list(stride), list(padding))
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _as_conv1x1(w: torch.Tensor) -> torch.Tensor:
    """A fuse_multi_res weight ([C, C_k] or [C, C_k, 1, 1]) as a 1x1 conv weight."""
    return w if w.dim() == 4 else w[:, :, None, None]


def fuse_multi_res_reference(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    relu: bool = True,
    mode: str = "nearest",
    align_corners: bool = False,
) -> torch.Tensor:
    """act(base + bias + sum_k interpolate(conv1x1(lowres[k], weights[k]), size=base.shape[-2:], mode))."""
    out = base if bias is None else base + bias.view(1, -1, 1, 1)
    for x, w in zip(lowres, weights):
        y = F.conv2d(x, _as_conv1x1(w))
        if mode == "bilinear":
            y = F.interpolate(y, size=base.shape[-2:], mode="bilinear", align_corners=align_corners)
        else:
            y = F.interpolate(y, size=base.shape[-2:], mode="nearest")
        out = out + y
    return torch.relu(out) if relu else out
