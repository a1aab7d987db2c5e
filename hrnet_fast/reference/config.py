"""The official experiment configs parsed into typed dataclasses: the pose HRNet's (MODEL.EXTRA.STAGE2..4,
MODEL.NUM_JOINTS, ...) by parse_config, the segmentation HRNet's (MODEL.EXTRA.STAGE1..4,
DATASET.NUM_CLASSES, MODEL.ALIGN_CORNERS) by parse_seg_config.

Accepts the dict yaml.safe_load gives, a yacs CfgNode (or any object with attribute access), or a
path to a YAML file. Every error names the field it is about.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

from hrnet_fast.reference.blocks import BLOCKS


@dataclass(frozen=True)
class StageConfig:
    num_modules: int
    num_branches: int
    block: str
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]
    fuse_method: str = "SUM"


@dataclass(frozen=True)
class HRNetConfig:
    stage2: StageConfig
    stage3: StageConfig
    stage4: StageConfig
    num_joints: int = 17
    final_conv_kernel: int = 1
    image_size: tuple[int, int] = (192, 256)  # (width, height), as the official IMAGE_SIZE


def _get(node: Any, key: str, path: str) -> Any:
    """node[key] for mappings, node.key otherwise; ValueError naming `path.key` when absent."""
    if isinstance(node, Mapping):
        if key in node:
            return node[key]
    elif hasattr(node, key):
        return getattr(node, key)
    raise ValueError(f"config is missing {path}.{key}" if path else f"config is missing {key}")


def _int(value: Any, field: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _stage(node: Any, name: str) -> StageConfig:
    path = f"MODEL.EXTRA.{name}"
    nb = _int(_get(node, "NUM_BRANCHES", path), f"{path}.NUM_BRANCHES")
    block = _get(node, "BLOCK", path)
    if block not in BLOCKS:
        raise ValueError(f"{path}.BLOCK must be one of {sorted(BLOCKS)}, got {block!r}")
    lists = {}
    for key in ("NUM_BLOCKS", "NUM_CHANNELS"):
        value = _get(node, key, path)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}.{key} must be a list, got {value!r}")
        if len(value) != nb:
            raise ValueError(f"{path}.{key} has {len(value)} entries but NUM_BRANCHES is {nb}")
        lists[key] = tuple(_int(v, f"{path}.{key}[{k}]") for k, v in enumerate(value))
    fuse = _get(node, "FUSE_METHOD", path) if _has(node, "FUSE_METHOD") else "SUM"
    if fuse != "SUM":
        raise ValueError(f"{path}.FUSE_METHOD must be 'SUM' (the only method HRNet defines), got {fuse!r}")
    return StageConfig(
        num_modules=_int(_get(node, "NUM_MODULES", path), f"{path}.NUM_MODULES"),
        num_branches=nb,
        block=block,
        num_blocks=lists["NUM_BLOCKS"],
        num_channels=lists["NUM_CHANNELS"],
        fuse_method=fuse,
    )


def _has(node: Any, key: str) -> bool:
    return key in node if isinstance(node, Mapping) else hasattr(node, key)


def _load(cfg: Any) -> Any:
    """A YAML path read with yaml.safe_load; anything else as it is."""
    if isinstance(cfg, (str, PathLike)):
        import yaml

        with open(cfg) as f:
            return yaml.safe_load(f)
    return cfg


def _stages_2_to_4(extra: Any) -> list[StageConfig]:
    stages = [_stage(_get(extra, f"STAGE{k}", "MODEL.EXTRA"), f"STAGE{k}") for k in (2, 3, 4)]
    for prev, cur, k in zip(stages, stages[1:], (3, 4)):
        if cur.num_branches < prev.num_branches:
            raise ValueError(
                f"MODEL.EXTRA.STAGE{k}.NUM_BRANCHES ({cur.num_branches}) must not be fewer than "
                f"STAGE{k - 1}'s ({prev.num_branches})"
            )
    return stages


def _final_conv_kernel(extra: Any) -> int:
    kernel = _int(_get(extra, "FINAL_CONV_KERNEL", "MODEL.EXTRA"), "MODEL.EXTRA.FINAL_CONV_KERNEL")
    if kernel not in (1, 3):
        raise ValueError(f"MODEL.EXTRA.FINAL_CONV_KERNEL must be 1 or 3, got {kernel}")
    return kernel


def parse_config(cfg: Any) -> HRNetConfig:
    """The official cfg (dict, attribute object, or YAML path) as an HRNetConfig."""
    if isinstance(cfg, HRNetConfig):
        return cfg
    cfg = _load(cfg)
    model = _get(cfg, "MODEL", "")
    extra = _get(model, "EXTRA", "MODEL")
    stages = _stages_2_to_4(extra)
    kernel = _final_conv_kernel(extra)
    size = _get(model, "IMAGE_SIZE", "MODEL") if _has(model, "IMAGE_SIZE") else (192, 256)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"MODEL.IMAGE_SIZE must be [width, height], got {size!r}")
    return HRNetConfig(
        stage2=stages[0],
        stage3=stages[1],
        stage4=stages[2],
        num_joints=_int(_get(model, "NUM_JOINTS", "MODEL"), "MODEL.NUM_JOINTS"),
        final_conv_kernel=kernel,
        image_size=(_int(size[0], "MODEL.IMAGE_SIZE[0]"), _int(size[1], "MODEL.IMAGE_SIZE[1]")),
    )


def preset(width: int, num_joints: int = 17, num_blocks: int = 4, modules: tuple[int, int, int] = (1, 4, 3)) -> HRNetConfig:
    """The official pose HRNet-W<width> layout: channels width * (1, 2, 4, 8), BASIC blocks."""
    ch = [width, 2 * width, 4 * width, 8 * width]

    def stage(k: int, nm: int) -> StageConfig:
        return StageConfig(nm, k, "BASIC", (num_blocks,) * k, tuple(ch[:k]))

    return HRNetConfig(stage(2, modules[0]), stage(3, modules[1]), stage(4, modules[2]), num_joints=num_joints)


# The pose net's layer1, fixed in its official code: 4 Bottlenecks of 64 planes (256 channels out).
LAYER1 = StageConfig(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(4,), num_channels=(64,))


@dataclass(frozen=True)
class SegHRNetConfig:
    """The segmentation HRNet (HRNetV2) as HRNet-Semantic-Segmentation's seg_hrnet.py reads its config."""

    stage1: StageConfig  # layer1: one branch, from MODEL.EXTRA.STAGE1's BLOCK, NUM_BLOCKS[0], NUM_CHANNELS[0]
    stage2: StageConfig
    stage3: StageConfig
    stage4: StageConfig
    num_classes: int = 19  # DATASET.NUM_CLASSES (the official default 19)
    final_conv_kernel: int = 1  # MODEL.EXTRA.FINAL_CONV_KERNEL: last_layer's classifier conv
    align_corners: bool = True  # MODEL.ALIGN_CORNERS (the official default True)


def _stage1(node: Any) -> StageConfig:
    """layer1 from MODEL.EXTRA.STAGE1, read as the official code reads it: BLOCK, NUM_BLOCKS[0] and
    NUM_CHANNELS[0]. Its NUM_BRANCHES and NUM_MODULES are never read there (the shipped Cityscapes
    file spells the first NUM_RANCHES, and yacs keeps the typo as a new key under MODEL.EXTRA, which
    is new_allowed); here either, where present, must be 1, the only layer1 the code builds."""
    path = "MODEL.EXTRA.STAGE1"
    block = _get(node, "BLOCK", path)
    if block not in BLOCKS:
        raise ValueError(f"{path}.BLOCK must be one of {sorted(BLOCKS)}, got {block!r}")
    for key in ("NUM_BRANCHES", "NUM_MODULES"):
        if _has(node, key) and _get(node, key, path) != 1:
            raise ValueError(f"{path}.{key} must be 1 (layer1 is one branch, one module), got {_get(node, key, path)!r}")
    lists = {}
    for key in ("NUM_BLOCKS", "NUM_CHANNELS"):
        value = _get(node, key, path)
        if not isinstance(value, (list, tuple)) or len(value) != 1:
            raise ValueError(f"{path}.{key} must be a list of one entry (layer1 is one branch), got {value!r}")
        lists[key] = (_int(value[0], f"{path}.{key}[0]"),)
    return StageConfig(1, 1, block, lists["NUM_BLOCKS"], lists["NUM_CHANNELS"])


def parse_seg_config(cfg: Any) -> SegHRNetConfig:
    """The official segmentation cfg (dict, attribute object, or YAML path) as a SegHRNetConfig.

    MODEL.EXTRA.STAGE1 may be absent (the first official seg_hrnet.py built layer1 as 4 Bottlenecks
    of 64 planes without reading it); MODEL.ALIGN_CORNERS and DATASET.NUM_CLASSES default to the
    official defaults (True, 19). Keys the model does not read are ignored, as yacs keeps them.
    """
    if isinstance(cfg, SegHRNetConfig):
        return cfg
    cfg = _load(cfg)
    model = _get(cfg, "MODEL", "")
    extra = _get(model, "EXTRA", "MODEL")
    stage1 = _stage1(_get(extra, "STAGE1", "MODEL.EXTRA")) if _has(extra, "STAGE1") else LAYER1
    stages = _stages_2_to_4(extra)
    align = _get(model, "ALIGN_CORNERS", "MODEL") if _has(model, "ALIGN_CORNERS") else True
    if not isinstance(align, bool):
        raise ValueError(f"MODEL.ALIGN_CORNERS must be true or false, got {align!r}")
    num_classes = 19
    if _has(cfg, "DATASET") and _has(_get(cfg, "DATASET", ""), "NUM_CLASSES"):
        num_classes = _int(_get(_get(cfg, "DATASET", ""), "NUM_CLASSES", "DATASET"), "DATASET.NUM_CLASSES")
    return SegHRNetConfig(
        stage1=stage1,
        stage2=stages[0],
        stage3=stages[1],
        stage4=stages[2],
        num_classes=num_classes,
        final_conv_kernel=_final_conv_kernel(extra),
        align_corners=align,
    )


def seg_preset(
    width: int,
    num_classes: int = 19,
    align_corners: bool = True,
    num_blocks: int = 4,
    modules: tuple[int, int, int] = (1, 4, 3),
    stage1: StageConfig = LAYER1,
) -> SegHRNetConfig:
    """The official HRNetV2-W<width> segmentation layout: channels width * (1, 2, 4, 8), BASIC blocks."""
    p = preset(width, num_blocks=num_blocks, modules=modules)
    return SegHRNetConfig(stage1, p.stage2, p.stage3, p.stage4, num_classes=num_classes, align_corners=align_corners)
