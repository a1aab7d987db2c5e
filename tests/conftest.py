"""Shared fixtures: the official key lists and configs (tests/fixtures), and seeded models with non-trivial BN statistics."""
from __future__ import annotations

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
