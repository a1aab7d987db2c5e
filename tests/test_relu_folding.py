"""optimize() moves a ReLU module into the convs before it where the model's forward (traced with
torch.fx) calls it only on a conv -> BN pair's output that nothing else reads, and both were folded
into one fused conv: the pose nets' stem `relu`, after bn1 and after bn2. Everywhere else the ReLU
stays, and the outputs are eager's either way."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import hrnet_fast
import hrnet_fast.profile
from hrnet_fast import _extension
from hrnet_fast.convert import relus_after_convs
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import randomize_bn

needs_ext = pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")


def test_pose_stem_relu_found():
    model = tiny_pose_hrnet().eval()
    assert relus_after_convs(model)["relu"] == [("conv1", "bn1"), ("conv2", "bn2")]


@needs_ext
def test_pose_stem_relu_runs_in_the_convs():
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fast = hrnet_fast.optimize(model, backend="cpu")
    assert isinstance(fast.relu, nn.Identity)
    assert isinstance(fast.conv1, FusedConv) and fast.conv1.relu and fast.conv2.relu
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    ops = hrnet_fast.profile.count_ops(fast, x)["by_op"]
    assert not any("relu" in op for op in ops), ops  # no ReLU pass of its own left


class Stem(nn.Module):
    """conv{k} -> bn{k} pairs (which optimize folds), one ReLU module used as `how` says, and a head
    (so that the module is a stem, not a residual block)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=False)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        if self.how == "pairs":  # a ReLU after each pair only: folded
            return self.relu(b)
        if self.how == "on_a_sum":  # the ReLU also on a sum: kept
            return self.relu(b + a)
        if self.how == "value_reused":  # the pre-ReLU value read again: kept
            return self.relu(b) + b
        if x.sum() > 0:  # "untraceable": data-dependent control flow, FX cannot trace it: kept
            return self.relu(b)
        return b


@needs_ext
@pytest.mark.parametrize("how,folded", [("pairs", True), ("on_a_sum", False), ("value_reused", False), ("untraceable", False)])
def test_relu_folded_only_where_it_is_the_pairs_alone(how, folded):
    model = randomize_bn(Stem(how)).eval()
    assert bool(relus_after_convs(model)) == folded
    fast = hrnet_fast.optimize(model, backend="cpu")
    assert isinstance(fast.relu, nn.Identity) == folded
    assert fast.conv1.relu == folded and fast.conv2.relu == folded
    x = torch.randn(2, 3, 12, 10)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


class Unpaired(nn.Module):
    """A conv -> BN -> ReLU whose names are not conv{k}/bn{k}: optimize fuses the conv alone and leaves
    the BN, so the ReLU must stay after the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.norm_a, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.norm_a(self.conv_a(x)))


@needs_ext
def test_relu_kept_where_the_bn_was_not_folded():
    model = randomize_bn(Unpaired()).eval()
    assert relus_after_convs(model) == {"relu": [("conv_a", "norm_a")]}
    with pytest.warns(UserWarning, match="left"):
        fast = hrnet_fast.optimize(model, backend="cpu")
    assert isinstance(fast.relu, nn.ReLU) and isinstance(fast.norm_a, nn.BatchNorm2d) and not fast.conv_a.relu
    x = torch.randn(2, 3, 12, 10)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
