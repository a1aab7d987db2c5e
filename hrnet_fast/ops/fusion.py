"""fuse_multi_res: act(base + bias + sum_k interpolate(conv1x1(lowres[k], weights[k]), size=base.shape[-2:], mode)).

One fused output of an HRNet fusion layer (BN already folded into `weights` and `bias`). The
reference is plain PyTorch (ops/reference.py); the compiled kernels are
torch.ops.hrnet_fast.fuse_multi_res (CPU, CUDA), the Triton kernel
torch.ops.hrnet_fast.fuse_multi_res_triton (hrnet_fast/triton/fusion.py). Argument checks, fake and
autograd, which every backend shares, are in ops/_meta.py; the backend table in ops/_backend.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hrnet_fast.ops import _backend
from hrnet_fast.ops._meta import check_fuse_multi_res

OP = "fuse_multi_res"


def fuse_multi_res(
    base: torch.Tensor,
    lowres: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    relu: bool = True,
    mode: str = "nearest",
    align_corners: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """act(base + bias + sum_k upsample(conv1x1(lowres[k], weights[k]))) on `backend`.

    mode: "nearest" (pose HRNet) or "bilinear" (HRNetV2: segmentation, face and hand landmarks), to
    base's size exactly as F.interpolate(size=..., mode=mode, align_corners=align_corners) does, any
    size ratio. The 1x1 convs run at low resolution in both modes (conv1x1 and interpolation are
    linear maps on different axes, and bilinear weights sum to 1, so the bias commutes too).

    backend: "auto" (compiled kernel for the device, else Triton on CUDA, else torch), "torch",
    "cpu", "cuda" or "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    weights[k] is [C, C_k] or [C, C_k, 1, 1]; the output has base's shape and memory format.
    """
    lowres, weights = list(lowres), list(weights)
    check_fuse_multi_res(base, lowres, weights, bias, mode, align_corners)
    chosen = _backend.resolve(backend, base.device, OP)
    return _backend.kernel(OP, chosen)(base, lowres, weights, bias, relu, mode, align_corners)
