"""BN folding as pure math: conv2d with the folded weight and bias equals conv -> BN(eval)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hrnet_fast.fused.folding import fold_conv_bn, fold_conv_bn_weights


def _bn(c: int, affine: bool, eps: float, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=eps, affine=affine).eval()
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.01)
    if affine:
        bn.weight.data.copy_(torch.randn(c, generator=g))
        bn.bias.data.copy_(torch.randn(c, generator=g))
    return bn


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_folded_conv_equals_conv_then_bn(affine, conv_bias, eps, kernel, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, kernel // 2, bias=conv_bias)
    bn = _bn(5, affine, eps, seed=1)
    x = torch.randn(2, 6, 9, 7)
    w, b = fold_conv_bn(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(nn.functional.conv2d(x, w, b, stride, kernel // 2), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_by_hand():
    """One channel: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    w, b = fold_conv_bn_weights(
        torch.full((1, 1, 1, 1), 2.0), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([15.0]), 1.0,
        torch.tensor([0.5]), torch.tensor([4.0]),
    )
    # scale = 0.5 / sqrt(16) = 0.125; w' = 0.25; b' = (1 - 3) * 0.125 + 4 = 3.75
    assert w.item() == 0.25 and b.item() == 3.75


def test_no_bn_keeps_the_conv_and_zero_bias():
    conv = nn.Conv2d(3, 4, 1, bias=False)
    w, b = fold_conv_bn(conv, None)
    assert torch.equal(w, conv.weight) and torch.equal(b, torch.zeros(4))


def test_bn_without_running_stats_is_refused():
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
