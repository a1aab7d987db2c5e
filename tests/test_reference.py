"""The reference pose HRNet: key-exact with the official state_dict, and heatmaps at 1/4 of the input."""
from __future__ import annotations

import pytest
import torch
import yaml

import hrnet_fast
from hrnet_fast.reference import HighResolutionModule, tiny_pose_hrnet

from conftest import POSE_CASES


def _fixture_rows(path) -> list[tuple[str, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            rows.append((key, shape, dtype))
    return rows


def _rows(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    return [
        (k, "scalar" if v.dim() == 0 else "x".join(map(str, v.shape)), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]


@pytest.mark.parametrize("width", [32, 48])
def test_state_dict_matches_official_key_for_key(fixtures_dir, width):
    cfg = yaml.safe_load((fixtures_dir / f"w{width}_256x192_adam_lr1e-3.yaml").read_text())
    expected = _fixture_rows(fixtures_dir / f"pose_hrnet_w{width}_256x192.state_dict.tsv")
    got = _rows(hrnet_fast.get_pose_net(cfg, is_train=False))
    assert len(got) == len(expected) == 1754
    for e, g in zip(expected, got):
        assert g == e
    preset = getattr(hrnet_fast, f"pose_hrnet_w{width}")()
    assert _rows(preset) == expected


@pytest.mark.parametrize("builder,size", POSE_CASES)
def test_heatmaps_are_a_quarter_of_the_input(builder, size):
    model = builder().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 17, size[0] // 4, size[1] // 4)


def test_hr_module_fuses_by_hand():
    """Two branches, one block each: output 0 = relu(x0' + up(bn(conv1x1(x1')))), checked by hand."""
    torch.manual_seed(0)
    from hrnet_fast.reference import BasicBlock

    m = HighResolutionModule(2, BasicBlock, [1, 1], [4, 8], [4, 8]).eval()
    x0, x1 = torch.randn(1, 4, 8, 6), torch.randn(1, 8, 4, 3)
    with torch.no_grad():
        b0, b1 = m.branches[0](x0), m.branches[1](x1)
        conv, bn, _ = m.fuse_layers[0][1]
        up = bn(conv(b1)).repeat_interleave(2, 2).repeat_interleave(2, 3)
        down_conv, down_bn = m.fuse_layers[1][0][0]
        expected0 = torch.relu(b0 + up)
        expected1 = torch.relu(down_bn(down_conv(b0)) + b1)
        out = m([x0, x1])
    torch.testing.assert_close(out[0], expected0)
    torch.testing.assert_close(out[1], expected1)


def test_last_module_outputs_only_the_high_resolution():
    model = tiny_pose_hrnet()
    assert len(model.stage4[-1].fuse_layers) == 1
    assert len(model.stage3[-1].fuse_layers) == 3


def test_is_train_initialises_like_the_official_code():
    model = hrnet_fast.get_pose_net(_tiny_cfg(), is_train=True)
    assert 0.0005 < model.conv1.weight.std().item() < 0.002
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)


def _tiny_cfg() -> dict:
    stage = lambda n, nm: {  # noqa: E731
        "NUM_MODULES": nm, "NUM_BRANCHES": n, "BLOCK": "BASIC", "NUM_BLOCKS": [1] * n,
        "NUM_CHANNELS": [4 * 2**k for k in range(n)], "FUSE_METHOD": "SUM",
    }
    return {"MODEL": {"NUM_JOINTS": 3, "IMAGE_SIZE": [64, 64],
                      "EXTRA": {"FINAL_CONV_KERNEL": 1, "STAGE2": stage(2, 1), "STAGE3": stage(3, 1), "STAGE4": stage(4, 1)}}}


def test_transition_reprojects_an_existing_branch_from_itself():
    """STAGE3 widens branch 0 (4 -> 6 channels): transition2[0] must read branch 0, not the lowest one."""
    cfg = _tiny_cfg()
    cfg["MODEL"]["EXTRA"]["STAGE3"]["NUM_CHANNELS"] = [6, 8, 16]
    cfg["MODEL"]["EXTRA"]["STAGE4"]["NUM_CHANNELS"] = [6, 8, 16, 32]
    model = hrnet_fast.get_pose_net(cfg).eval()
    assert model.transition2[0] is not None and model.transition2[1] is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = model.layer1(model.relu(model.bn2(model.conv2(model.relu(model.bn1(model.conv1(x)))))))
        y2 = model.stage2([model.transition1[0](stem), model.transition1[1](stem)])
        expected_x0 = model.transition2[0](y2[0])
        seen = {}
        handle = model.stage3.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
        out = model(x)
        handle.remove()
    torch.testing.assert_close(seen["x"][0], expected_x0)
    assert out.shape == (1, 3, 16, 16)
