"""Shared fixtures: the official key lists and configs (tests/fixtures), and seeded models with non-trivial BN statistics."""
from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

import hrnet_fast

REPO = Path(__file__).resolve().parents[1]

# The official pose nets at both input sizes of the official experiments: (builder, (H, W)).
POSE_CASES = [
    (hrnet_fast.pose_hrnet_w32, (256, 192)),
    (hrnet_fast.pose_hrnet_w32, (384, 288)),
    (hrnet_fast.pose_hrnet_w48, (256, 192)),
    (hrnet_fast.pose_hrnet_w48, (384, 288)),
]


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official state_dict key lists and experiment YAMLs, copied into the project as shipped."""
    return FIXTURES


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running stats and affine terms, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def assert_openmmlab_pins(*names: str) -> dict[str, str]:
    """Every named package is installed at the version requirements-openmmlab.txt pins; the pins."""
    pins = dict(
        re.match(r"([\w-]+)==(\S+)", line).groups()
        for line in (REPO / "requirements-openmmlab.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in names:
        assert importlib.metadata.version(name) == pins[name], f"{name}: run `make setup` to install the pinned version"
    return pins


def randomize_openmmlab(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """An OpenMMLab backbone made testable: Kaiming-normal conv weights (x0.5) rather than its own
    init_weights, non-trivial BN statistics and affine terms (randomize_bn), eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            m.weight.data.mul_(0.5)
    randomize_bn(model, seed=seed)
    model.eval()  # not chained: OpenMMLab's train() returns None, so eval() does too
    return model


DELETE = object()  # set_field's value that removes the field


def set_field(cfg: dict, dotted: str, value) -> dict:
    """A deep copy of an official-format config with the field at `dotted` ("MODEL.EXTRA.STAGE1.BLOCK")
    set to `value`, or removed when `value` is DELETE."""
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg
