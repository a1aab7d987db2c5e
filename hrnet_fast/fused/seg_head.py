"""FusedSegHead: the segmentation HRNet's head without the concatenated tensor.

The official head upsamples branches 1..n-1 bilinearly to branch 0's size, concatenates all of them and
applies last_layer = Conv1x1 (with bias) + BN + ReLU + Conv(num_classes). A 1x1 conv over a
concatenation is the sum of 1x1 convs over its parts, and a 1x1 conv commutes with bilinear resizing
(linear maps on different axes; bilinear weights sum to 1, so the bias commutes too). With BN folded:
    conv_bias_act(x0, W[:, :C0], bias)                      the base, at full resolution, no ReLU
    fuse_multi_res(base, [x1..], [W slices], ReLU, bilinear) the other branches' terms at low resolution
    conv_bias_act(., final conv)                            the classifier
so no upsampled branch and no concatenation is ever written. On the cpu backend, with a 1x1 classifier, the
three are one op (torch.ops.hrnet_fast.seg_head, csrc/cpu/seg_head.cpp), which takes 6 output pixels at a
time from the branches to the classes: the sum's channels (720 for HRNetV2) are not written either.

How a model's forward comes to call it (`install_seg_head`): our reference SegHighResolutionNet's
forward hands the branches to a head that says `takes_branches`; for any other model with the official
structure (the official seg_hrnet instance) the instance's forward is replaced by `SegForward`, only after
a probe input shows that it reproduces the model's own forward (with one of the two align_corners values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrnet_fast import _extension
from hrnet_fast.fused.blocks import fused_conv
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.folding import FOLDABLE_BN, fold_conv_bn
from hrnet_fast.fused.hr_module import PROBE_RTOL, probe_error
from hrnet_fast.ops import _backend
from hrnet_fast.reference.hrnet import hrnet_branches

# kSegHeadMaxInputs (csrc/cpu/winograd_isa.h)
_SEG_HEAD_MAX_INPUTS = 8
_STAGES = (("transition1", "stage2"), ("transition2", "stage3"), ("transition3", "stage4"))


def why_not_seg_head(last_layer: nn.Module) -> str | None:
    """Why `last_layer` is not Sequential(Conv2d 1x1, BN, ReLU, Conv2d), or None when it is."""
    if not isinstance(last_layer, nn.Sequential) or len(last_layer) != 4:
        return "last_layer is not Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Conv2d)"
    conv, bn, relu, final = last_layer
    if not (
        isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
        and conv.padding in ((0, 0), 0) and isinstance(bn, FOLDABLE_BN) and isinstance(relu, nn.ReLU)
        and isinstance(final, nn.Conv2d) and final.groups == 1 and final.dilation == (1, 1)
        and final.padding_mode == "zeros" and not isinstance(final.padding, str)
    ):
        return "last_layer is not Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Conv2d)"
    return None


class FusedSegHead(nn.Module):
    """Branches [x0, x1, ...] in, logits out: last_layer(cat(x0, up(x1), ...)) without the cat."""

    takes_branches = True  # what our reference SegHighResolutionNet's forward asks of its head

    def __init__(self, last_layer: nn.Sequential, branch_channels: list[int], align_corners: bool, backend: str):
        super().__init__()
        conv, bn, _, final = last_layer
        w, b = fold_conv_bn(conv, bn)
        if sum(branch_channels) != w.shape[1]:
            raise ValueError(f"last_layer takes {w.shape[1]} channels, the branches have {branch_channels}")
        self.align_corners = bool(align_corners)
        self.backend = backend
        edges = [0]
        for c in branch_channels:
            edges.append(edges[-1] + c)
        # the folded bias goes on with the base conv (FusedConv always has one); the ReLU after the sum
        self.base = FusedConv(w[:, : edges[1]], b, (1, 1), (0, 0), False, backend)
        self.n_low = len(branch_channels) - 1
        for k in range(self.n_low):
            self.register_buffer(f"w_{k}", w[:, edges[k + 1] : edges[k + 2], 0, 0].contiguous())
        self.classifier = fused_conv(final, None, False, backend)
        self._fuse = _backend.kernel("fuse_multi_res", backend)
        # the cpu backend's one op, where the classifier is a plain 1x1 conv (HRNetV2's FINAL_CONV_KERNEL 1)
        self.one_op = (
            backend == "cpu" and final.kernel_size == (1, 1) and final.stride == (1, 1) and final.dilation == (1, 1)
            and final.padding in ((0, 0), 0) and self.n_low <= _SEG_HEAD_MAX_INPUTS
            and _extension.has_kernel("seg_head", "CPU")
        )

    def __setstate__(self, state: dict) -> None:
        state.setdefault("one_op", False)  # absent from states saved before the seg_head op
        super().__setstate__(state)
        self._fuse = _backend.kernel("fuse_multi_res", self.backend)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        if self.one_op and self._one_op_takes(x[0]):
            base, classifier = self.base._buffers, self.classifier._buffers
            weights = [getattr(self, f"w_{k}") for k in range(self.n_low)]
            return torch.ops.hrnet_fast.seg_head(
                x[0], list(x[1 : 1 + self.n_low]), base["weight"], base["bias"], weights, classifier["weight"],
                classifier["bias"], self.align_corners)
        s = self.base(x[0])
        if self.n_low:
            weights = [getattr(self, f"w_{k}") for k in range(self.n_low)]
            s = self._fuse(s, list(x[1 : 1 + self.n_low]), weights, None, True, "bilinear", self.align_corners)
        else:
            s = torch.relu(s)
        return self.classifier(s)

    def _one_op_takes(self, x: torch.Tensor) -> bool:
        """Whether seg_head runs this call: float32 weights and input (else the convs' own paths say
        what the cpu backend runs), nothing to differentiate (the convs refuse that clearly)."""
        return (
            x.dtype == torch.float32 and self.base._buffers["weight"].dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad)
        )


def head_reference(last_layer: nn.Module, y: list[torch.Tensor], align_corners: bool) -> torch.Tensor:
    """The official head: upsample, concatenate, last_layer."""
    size = y[0].shape[-2:]
    up = [F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners) for t in y[1:]]
    return last_layer(torch.cat([y[0], *up], 1))


class SegForward:
    """A replacement forward for a converted official seg_hrnet instance: hrnet_branches, then its
    FusedSegHead. A plain picklable object (not a bound method) holding the model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.last_layer(hrnet_branches(self.model, x))


def has_seg_structure(model: nn.Module) -> bool:
    names = ("conv1", "bn1", "conv2", "bn2", "relu", "layer1", "last_layer") + tuple(n for p in _STAGES for n in p)
    return all(hasattr(model, n) for n in names) and isinstance(getattr(model, "last_layer"), nn.Sequential)


def probe_seg_align_corners(model: nn.Module) -> tuple[bool, list[int]] | str:
    """(align_corners, branch channels) for which hrnet_branches + the official head reproduce the
    model's own forward on a probe input, or why none (or both) does."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 70, 90, generator=g).to(device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            ref = model(x.clone())
            y = hrnet_branches(model, x.clone())
            errors = {}
            for ac in (False, True):
                out = head_reference(model.last_layer, y, ac)
                if not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
                    return "its forward does not return what stem, stages and upsample+cat+last_layer give"
                errors[ac] = probe_error(out, ref)
    except Exception as e:
        return f"probing its forward failed: {type(e).__name__}: {e}"
    matches = [ac for ac, err in errors.items() if err <= PROBE_RTOL]
    found = ", ".join(f"align_corners={ac}: {err:.1e}" for ac, err in errors.items())
    if len(matches) != 1:
        what = "none" if not matches else "both"
        return f"upsample+cat+last_layer after the stages reproduces its forward for {what} of align_corners False/True ({found})"
    return matches[0], [t.shape[1] for t in y]
