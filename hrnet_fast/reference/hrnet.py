"""PoseHighResolutionNet: the official pose HRNet in plain PyTorch, state-dict compatible."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hrnet_fast.reference.blocks import BLOCKS, BN_MOMENTUM
from hrnet_fast.reference.config import LAYER1, HRNetConfig, StageConfig, parse_config, preset
from hrnet_fast.reference.hr_module import HighResolutionModule


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
    )


class HRNetBackbone(nn.Module):
    """What the pose and segmentation HRNets share: the stem (two stride-2 3x3 conv+BN+ReLU), layer1,
    and the transitions and HR modules of stages 2-4, registered in the official order (so the state
    dicts list their keys as the official ones do). Subclasses add their head after it."""

    def _build_backbone(
        self,
        stage1: StageConfig,
        stages: tuple[StageConfig, StageConfig, StageConfig],
        last_multi_scale: bool,
        upsample: str = "nearest",
        align_corners: bool = False,
    ) -> list[int]:
        """Registers conv1 .. stage4; returns stage 4's output channels per branch."""
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        block1 = BLOCKS[stage1.block]
        self.layer1 = self._make_layer(block1, stage1.num_channels[0], stage1.num_blocks[0])

        pre = [stage1.num_channels[0] * block1.expansion]
        for k, stage_cfg in enumerate(stages, start=1):
            expansion = BLOCKS[stage_cfg.block].expansion
            channels = [n * expansion for n in stage_cfg.num_channels]
            setattr(self, f"transition{k}", self._make_transition_layer(pre, channels))
            stage, pre = self._make_stage(
                stage_cfg, channels, last_multi_scale or k != 3, upsample=upsample, align_corners=align_corners
            )
            setattr(self, f"stage{k + 1}", stage)
        self.stage2_cfg, self.stage3_cfg, self.stage4_cfg = stages
        return pre

    @staticmethod
    def _make_transition_layer(pre: list[int], cur: list[int]) -> nn.ModuleList:
        layers: list[nn.Module | None] = []
        for i, ch in enumerate(cur):
            if i < len(pre):
                layers.append(_conv_bn_relu(pre[i], ch, 1) if ch != pre[i] else None)
            else:
                n = i + 1 - len(pre)
                layers.append(
                    nn.Sequential(*[_conv_bn_relu(pre[-1], ch if j == n - 1 else pre[-1], 2) for j in range(n)])
                )
        return nn.ModuleList(layers)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion, momentum=BN_MOMENTUM),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @staticmethod
    def _make_stage(
        cfg: StageConfig,
        inchannels: list[int],
        multi_scale_output: bool = True,
        upsample: str = "nearest",
        align_corners: bool = False,
    ):
        modules = []
        for m in range(cfg.num_modules):
            last = m == cfg.num_modules - 1
            module = HighResolutionModule(
                cfg.num_branches,
                BLOCKS[cfg.block],
                list(cfg.num_blocks),
                inchannels,
                list(cfg.num_channels),
                cfg.fuse_method,
                multi_scale_output or not last,
                upsample=upsample,
                align_corners=align_corners,
            )
            modules.append(module)
            inchannels = module.get_num_inchannels()
        return nn.Sequential(*modules), inchannels

    def _backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stem, layer1 and stages 2-4: stage 4's outputs."""
        return hrnet_branches(self, x)


def hrnet_branches(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The official HRNets' forward up to stage 4's outputs, from the model's attributes alone (so it
    also runs an official instance: fused/seg_head.py): the stem (conv1, bn1, relu, conv2, bn2, relu),
    layer1, then per stage its transition and its modules."""
    x = model.relu(model.bn1(model.conv1(x)))
    x = model.relu(model.bn2(model.conv2(x)))
    y_list = [model.layer1(x)]
    for transition, stage in (
        (model.transition1, model.stage2),
        (model.transition2, model.stage3),
        (model.transition3, model.stage4),
    ):
        # a new branch grows from the lowest resolution; an existing one that changes width is re-projected
        # from itself (the official pose code reads y_list[-1] there too, which crashes on such configs; the
        # official configs never re-project, so their outputs are unchanged; the current official
        # segmentation code reads y_list[i], as here)
        x_list = [
            y_list[i] if transition[i] is None else transition[i](y_list[min(i, len(y_list) - 1)])
            for i in range(len(transition))
        ]
        y_list = stage(x_list)
    return y_list


class PoseHighResolutionNet(HRNetBackbone):
    """Heatmaps at 1/4 of the input: stem (2 stride-2 convs), layer1, stages 2-4, final_layer."""

    def __init__(self, cfg: Any, **kwargs: Any):
        super().__init__()
        self.config: HRNetConfig = parse_config(cfg)
        c = self.config
        pre = self._build_backbone(LAYER1, (c.stage2, c.stage3, c.stage4), last_multi_scale=False)
        kernel = c.final_conv_kernel
        self.final_layer = nn.Conv2d(pre[0], c.num_joints, kernel, 1, 1 if kernel == 3 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self._backbone(x)[0])

    def init_weights(self) -> None:
        """The official initialisation: conv weights N(0, 0.001), BN weight 1 and bias 0, conv biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def get_pose_net(cfg: Any, is_train: bool = False, **kwargs: Any) -> PoseHighResolutionNet:
    """The official entry point: cfg is the experiment config (dict, CfgNode or YAML path)."""
    model = PoseHighResolutionNet(cfg, **kwargs)
    if is_train:
        model.init_weights()
    return model


def pose_hrnet_w32(num_joints: int = 17) -> PoseHighResolutionNet:
    """HRNet-W32 as w32_256x192_adam_lr1e-3.yaml builds it (the input size is free)."""
    return PoseHighResolutionNet(preset(32, num_joints))


def pose_hrnet_w48(num_joints: int = 17) -> PoseHighResolutionNet:
    """HRNet-W48 as w48_256x192_adam_lr1e-3.yaml builds it (the input size is free)."""
    return PoseHighResolutionNet(preset(48, num_joints))


def tiny_pose_hrnet(width: int = 4, num_joints: int = 3) -> PoseHighResolutionNet:
    """All four branches, one module per stage, one block per branch: for fast tests."""
    return PoseHighResolutionNet(preset(width, num_joints, num_blocks=1, modules=(1, 1, 1)))
