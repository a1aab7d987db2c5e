"""Conv + eval-mode BatchNorm folded into one conv's weight and bias: pure tensor math, no module surgery."""
from __future__ import annotations

import torch
from torch import nn

# BatchNorm layers folded alike: in eval mode SyncBatchNorm (the official segmentation HRNet's) normalises
# with its running statistics exactly as BatchNorm2d does, on any device, without communicating.
FOLDABLE_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def fold_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) with conv2d(x, weight, bias) == bn_eval(conv2d(x, conv_w, conv_b)).

    bn_w/bn_b None means a BatchNorm without affine terms. Computed in float64 so the folded weights
    are as close to the eager conv->bn as float32 allows, then returned in conv_w's dtype.
    """
    dtype = conv_w.dtype
    scale = torch.rsqrt(bn_var.double() + bn_eps)
    if bn_w is not None:
        scale = scale * bn_w.double()
    shift = -bn_mean.double() * scale
    if conv_b is not None:
        shift = shift + conv_b.double() * scale
    if bn_b is not None:
        shift = shift + bn_b.double()
    weight = conv_w.double() * scale.reshape(-1, *([1] * (conv_w.dim() - 1)))
    return weight.to(dtype), shift.to(dtype)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias) of `conv` followed by `bn` in eval mode; bn=None keeps the conv (bias 0 if absent)."""
    w = conv.weight.detach()
    b = None if conv.bias is None else conv.bias.detach()
    if bn is None:
        return w.clone(), (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b.clone())
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    return fold_conv_bn_weights(
        w,
        b,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        None if bn.weight is None else bn.weight.detach(),
        None if bn.bias is None else bn.bias.detach(),
    )
