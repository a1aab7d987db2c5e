"""The official experiment config (MODEL.EXTRA.STAGE2..4, NUM_JOINTS, ...) parsed into typed dataclasses.

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


def parse_config(cfg: Any) -> HRNetConfig:
    """The official cfg (dict, attribute object, or YAML path) as an HRNetConfig."""
    if isinstance(cfg, HRNetConfig):
        return cfg
    if isinstance(cfg, (str, PathLike)):
        import yaml

        with open(cfg) as f:
            cfg = yaml.safe_load(f)
    model = _get(cfg, "MODEL", "")
    extra = _get(model, "EXTRA", "MODEL")
    stages = [_stage(_get(extra, f"STAGE{k}", "MODEL.EXTRA"), f"STAGE{k}") for k in (2, 3, 4)]
    for prev, cur, k in zip(stages, stages[1:], (3, 4)):
        if cur.num_branches < prev.num_branches:
            raise ValueError(
                f"MODEL.EXTRA.STAGE{k}.NUM_BRANCHES ({cur.num_branches}) must not be fewer than "
                f"STAGE{k - 1}'s ({prev.num_branches})"
            )
    kernel = _int(_get(extra, "FINAL_CONV_KERNEL", "MODEL.EXTRA"), "MODEL.EXTRA.FINAL_CONV_KERNEL")
    if kernel not in (1, 3):
        raise ValueError(f"MODEL.EXTRA.FINAL_CONV_KERNEL must be 1 or 3, got {kernel}")
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
