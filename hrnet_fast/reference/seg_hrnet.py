"""SegHighResolutionNet: the official segmentation HRNet (HRNetV2, HRNet/HRNet-Semantic-Segmentation
lib/models/seg_hrnet.py) in plain PyTorch, state-dict compatible.

The same stem, layer1 and stages as the pose net, with two differences the official code has:
the HR modules fuse with bilinear interpolation to the exact size of the branch they join
(fuse_layers[i][j], j > i, is conv1x1 + BN only; F.interpolate(mode="bilinear",
align_corners=MODEL.ALIGN_CORNERS) runs in forward), and stage 4 keeps all four branches, which the
head (`last_layer`) upsamples bilinearly to branch 0's size, concatenates, and classifies with
Conv1x1 (with bias) + BN + ReLU + Conv(NUM_CLASSES). The output is the logits at 1/4 of the input
size, as the official forward returns them (the official code resizes them to the label size in its
loss and inference helpers, not in the model).

The official module reads ALIGN_CORNERS from a module-level global that the last model built sets
for every model in the process; here each model keeps its own (`self.align_corners`, also on each HR
module). BatchNorm is nn.BatchNorm2d where the official code has SyncBatchNorm or BatchNorm2d
(the same state-dict keys).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hrnet_fast.reference.blocks import BN_MOMENTUM
from hrnet_fast.reference.config import SegHRNetConfig, StageConfig, parse_seg_config, seg_preset
from hrnet_fast.reference.hrnet import HRNetBackbone


class SegHighResolutionNet(HRNetBackbone):
    """Logits [N, num_classes, ceil(H/4), ceil(W/4)]: stem, layer1, stages 2-4 (bilinear fusion), last_layer."""

    def __init__(self, cfg: Any, **kwargs: Any):
        super().__init__()
        self.config: SegHRNetConfig = parse_seg_config(cfg)
        c = self.config
        self.align_corners = c.align_corners
        pre = self._build_backbone(
            c.stage1, (c.stage2, c.stage3, c.stage4), last_multi_scale=True,
            upsample="bilinear", align_corners=c.align_corners,
        )
        channels = sum(pre)  # the official last_inp_channels (720 for W48)
        kernel = c.final_conv_kernel
        self.last_layer = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0),
            nn.BatchNorm2d(channels, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, c.num_classes, kernel_size=kernel, stride=1, padding=1 if kernel == 3 else 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._backbone(x)
        if getattr(self.last_layer, "takes_branches", False):  # optimize()'s FusedSegHead: no concatenation
            return self.last_layer(y)
        size = y[0].shape[-2:]
        up = [F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners) for t in y[1:]]
        return self.last_layer(torch.cat([y[0], *up], 1))

    def init_weights(self) -> None:
        """The official initialisation (seg_hrnet.py's init_weights without a pretrained file): conv
        weights N(0, 0.001), BN weight 1 and bias 0; conv biases keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def get_seg_model(cfg: Any, **kwargs: Any) -> SegHighResolutionNet:
    """The official entry point: cfg is the experiment config (dict, CfgNode or YAML path).

    Initialised as the official get_seg_model does (init_weights); MODEL.PRETRAINED is not read:
    load weights with hrnet_fast.load_checkpoint.
    """
    model = SegHighResolutionNet(cfg, **kwargs)
    model.init_weights()
    return model


def seg_hrnet_w48(num_classes: int = 19, align_corners: bool = True) -> SegHighResolutionNet:
    """HRNetV2-W48 as seg_hrnet_w48_cityscapes_512x1024.yaml (the official Cityscapes config) builds it,
    with `num_classes` and `align_corners` free (that file has 19 and ALIGN_CORNERS False; True is the
    official default). The input size is free."""
    return SegHighResolutionNet(seg_preset(48, num_classes, align_corners))


def tiny_seg_hrnet(width: int = 4, num_classes: int = 3, align_corners: bool = True) -> SegHighResolutionNet:
    """All four branches, one module per stage, one block per branch, a one-Bottleneck layer1 of 8
    planes: for fast tests."""
    stage1 = StageConfig(1, 1, "BOTTLENECK", (1,), (8,))
    return SegHighResolutionNet(
        seg_preset(width, num_classes, align_corners, num_blocks=1, modules=(1, 1, 1), stage1=stage1)
    )
