"""Config parsing: both official YAMLs, the attribute-style and path forms, and each error naming its field."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

import hrnet_fast
from hrnet_fast.reference import parse_config

from conftest import DELETE, set_field


@pytest.fixture
def w32_cfg(fixtures_dir) -> dict:
    return yaml.safe_load((fixtures_dir / "w32_256x192_adam_lr1e-3.yaml").read_text())


@pytest.mark.parametrize("width", [32, 48])
def test_official_yaml_parses(fixtures_dir, width):
    c = parse_config(fixtures_dir / f"w{width}_256x192_adam_lr1e-3.yaml")
    assert c.stage4.num_channels == (width, 2 * width, 4 * width, 8 * width)
    assert (c.stage2.num_modules, c.stage3.num_modules, c.stage4.num_modules) == (1, 4, 3)
    assert c.stage3.num_blocks == (4, 4, 4) and c.stage4.block == "BASIC"
    assert c.num_joints == 17 and c.final_conv_kernel == 1 and c.image_size == (192, 256)


def _ns(node):
    return SimpleNamespace(**{k: _ns(v) for k, v in node.items()}) if isinstance(node, dict) else node


def test_attribute_style_and_path_configs_equal_the_dict(fixtures_dir, w32_cfg):
    path = fixtures_dir / "w32_256x192_adam_lr1e-3.yaml"
    assert parse_config(_ns(w32_cfg)) == parse_config(w32_cfg) == parse_config(str(path))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("MODEL.EXTRA.STAGE3.NUM_CHANNELS", [32, 64], "MODEL.EXTRA.STAGE3.NUM_CHANNELS has 2 entries but NUM_BRANCHES is 3"),
        ("MODEL.EXTRA.STAGE4.NUM_BLOCKS", [4, 4, 4], "MODEL.EXTRA.STAGE4.NUM_BLOCKS has 3 entries but NUM_BRANCHES is 4"),
        ("MODEL.EXTRA.STAGE2.BLOCK", "RESNEXT", "MODEL.EXTRA.STAGE2.BLOCK must be one of"),
        ("MODEL.EXTRA.STAGE2.NUM_MODULES", 0, "MODEL.EXTRA.STAGE2.NUM_MODULES must be an integer >= 1"),
        ("MODEL.EXTRA.STAGE3.FUSE_METHOD", "CAT", "MODEL.EXTRA.STAGE3.FUSE_METHOD must be 'SUM'"),
        ("MODEL.EXTRA.FINAL_CONV_KERNEL", 5, "MODEL.EXTRA.FINAL_CONV_KERNEL must be 1 or 3"),
        ("MODEL.NUM_JOINTS", DELETE, "config is missing MODEL.NUM_JOINTS"),
        ("MODEL.EXTRA.STAGE4", DELETE, "config is missing MODEL.EXTRA.STAGE4"),
        ("MODEL.EXTRA.STAGE3.NUM_BRANCHES", DELETE, "config is missing MODEL.EXTRA.STAGE3.NUM_BRANCHES"),
    ],
)
def test_bad_config_names_the_field(w32_cfg, field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        hrnet_fast.get_pose_net(set_field(w32_cfg, field, value))


def test_final_conv_kernel_3_pads(w32_cfg):
    model = hrnet_fast.get_pose_net(set_field(w32_cfg, "MODEL.EXTRA.FINAL_CONV_KERNEL", 3))
    assert model.final_layer.kernel_size == (3, 3) and model.final_layer.padding == (1, 1)
