"""HighResolutionModule: parallel branches, then every output fuses every input resolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrnet_fast.reference.blocks import BN_MOMENTUM


class HighResolutionModule(nn.Module):
    """Output i = ReLU(sum_j F_ij(x_j)): identity for j == i, 1x1 conv+BN+upsample for j > i,
    a chain of i-j stride-2 3x3 conv+BN (ReLU between) for j < i. Keys match the official module.

    upsample="nearest" (the pose HRNet): fuse_layers[i][j] for j > i is Sequential(conv, BN,
    Upsample(scale_factor=2**(j-i), mode="nearest")). upsample="bilinear" (the segmentation HRNet,
    HRNet-Semantic-Segmentation's seg_hrnet.py): it is Sequential(conv, BN) only, and forward resizes
    its output to x_i's exact size with F.interpolate(mode="bilinear", align_corners=align_corners).
    The Upsample module holds no tensors, so both have the same state-dict keys."""

    def __init__(
        self,
        num_branches: int,
        block: type[nn.Module],
        num_blocks: list[int],
        num_inchannels: list[int],
        num_channels: list[int],
        fuse_method: str = "SUM",
        multi_scale_output: bool = True,
        upsample: str = "nearest",
        align_corners: bool = False,
    ):
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        self.upsample_mode = upsample
        self.align_corners = bool(align_corners)  # read only for upsample="bilinear"
        if not (len(num_blocks) == len(num_inchannels) == len(num_channels) == num_branches):
            raise ValueError(
                f"NUM_BRANCHES={num_branches} but NUM_BLOCKS has {len(num_blocks)}, NUM_CHANNELS "
                f"{len(num_channels)} and the inputs {len(num_inchannels)} entries"
            )
        self.num_inchannels = list(num_inchannels)
        self.fuse_method = fuse_method
        self.num_branches = num_branches
        self.multi_scale_output = multi_scale_output
        self.branches = nn.ModuleList(
            [self._make_one_branch(i, block, num_blocks, num_channels) for i in range(num_branches)]
        )
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(True)

    def _make_one_branch(self, i: int, block, num_blocks: list[int], num_channels: list[int]) -> nn.Sequential:
        out = num_channels[i] * block.expansion
        downsample = None
        if self.num_inchannels[i] != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.num_inchannels[i], out, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(out, momentum=BN_MOMENTUM),
            )
        layers = [block(self.num_inchannels[i], num_channels[i], 1, downsample)]
        self.num_inchannels[i] = out
        layers += [block(out, num_channels[i]) for _ in range(1, num_blocks[i])]
        return nn.Sequential(*layers)

    def _make_fuse_layers(self) -> nn.ModuleList | None:
        if self.num_branches == 1:
            return None
        ch = self.num_inchannels
        fuse_layers = []
        for i in range(self.num_branches if self.multi_scale_output else 1):
            row: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:
                    layers = [nn.Conv2d(ch[j], ch[i], 1, 1, 0, bias=False), nn.BatchNorm2d(ch[i])]
                    if self.upsample_mode == "nearest":
                        layers.append(nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"))
                    row.append(nn.Sequential(*layers))
                elif j == i:
                    row.append(None)
                else:
                    chain = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out = ch[i] if last else ch[j]
                        layers = [nn.Conv2d(ch[j], out, 3, 2, 1, bias=False), nn.BatchNorm2d(out)]
                        chain.append(nn.Sequential(*layers) if last else nn.Sequential(*layers, nn.ReLU(True)))
                    row.append(nn.Sequential(*chain))
            fuse_layers.append(nn.ModuleList(row))
        return nn.ModuleList(fuse_layers)

    def get_num_inchannels(self) -> list[int]:
        return self.num_inchannels

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = x[0] if i == 0 else row[0](x[0])
            for j in range(1, self.num_branches):
                if i == j:
                    y = y + x[j]
                elif j > i and self.upsample_mode == "bilinear":
                    size = x[i].shape[-2:]
                    y = y + F.interpolate(row[j](x[j]), size=size, mode="bilinear", align_corners=self.align_corners)
                else:
                    y = y + row[j](x[j])
            out.append(self.relu(y))
        return out
