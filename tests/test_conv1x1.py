"""conv_bias_act's own 1x1 kernel on CPU (csrc/cpu/conv1x1.cpp): a dense 1x1 stride-1 weight on a
channels_last input runs it in every vector variant this CPU has; its answers against the float64
reference (row counts that are not a multiple of the micro-kernel's 6, channel counts that are not a
multiple of 8 or 16), NaN and infinities kept as eager keeps them, which calls take it (and which
still go to oneDNN), and optimize() keeping no oneDNN-packed copy of those weights."""
from __future__ import annotations

import pytest
import references
import torch
from torch.profiler import ProfilerActivity, profile

from hrnet_fast import _extension
from hrnet_fast.ops import conv_bias_act

pytestmark = pytest.mark.skipif(not _extension.has_kernel("conv_bias_act", "CPU"), reason="needs the compiled extension")
CL = torch.channels_last
MAX_CIN = 1024  # kConv1x1MaxCin


def _variants() -> list[str]:
    """The vector variants this CPU runs (the portable one leaves 1x1 convs to oneDNN)."""
    saved = torch.ops.hrnet_fast.cpu_isa()
    runs = []
    for isa in ("avx2", "avx512"):
        try:
            torch.ops.hrnet_fast.cpu_isa(isa)
            runs.append(isa)
        except RuntimeError:
            pass
    torch.ops.hrnet_fast.cpu_isa(saved)
    return runs


VARIANTS = _variants()


@pytest.fixture(params=VARIANTS or [pytest.param("none", marks=pytest.mark.skip(reason="no vector variant runs here"))])
def isa(request):
    saved = torch.ops.hrnet_fast.cpu_isa()
    torch.ops.hrnet_fast.cpu_isa(request.param)
    yield request.param
    torch.ops.hrnet_fast.cpu_isa(saved)


def _inputs(n, cin, cout, h, w, res, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=CL)
    wt = torch.randn(cout, cin, 1, 1, generator=g) / cin**0.5
    b = torch.randn(cout, generator=g) if bias else None
    r = torch.randn(n, cout, h, w, generator=g).contiguous(memory_format=CL) if res else None
    return x, wt, b, r


def _runs_onednn(fn) -> bool:
    """Whether fn() dispatched oneDNN's convolution (our 1x1 kernel calls no op)."""
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return any("mkldnn::_convolution_pointwise" in e.name for e in p.events())


@pytest.mark.parametrize(
    "n,cin,cout,h,w",
    [
        (1, 16, 4, 5, 6),  # 30 rows: 5 whole groups; 4 channels: one partial vector
        (2, 64, 256, 7, 5),  # 70 rows: a short last group of 4; stage 1's widening conv
        (1, 256, 64, 3, 7),  # 21 rows; stage 1's narrowing conv
        (3, 32, 17, 4, 3),  # the pose head: 17 = a whole panel and one channel
        (1, 3, 40, 1, 1),  # one row; 40 = two panels and a half
        (1, MAX_CIN, 24, 2, 3),  # the widest C_in the kernel takes, copied for the short group
    ],
)
@pytest.mark.parametrize("res,relu,bias", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_matches_float64(isa, n, cin, cout, h, w, res, relu, bias):
    x, wt, b, r = _inputs(n, cin, cout, h, w, res, bias)
    out = conv_bias_act(x, wt, b, 1, 0, r, relu, backend="cpu")
    want = references.conv_bias_act(x, wt, b, 1, 0, r, relu)
    assert out.is_contiguous(memory_format=CL) and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6 * (1 + want.abs().max().item()))
    assert not _runs_onednn(lambda: conv_bias_act(x, wt, b, 1, 0, r, relu, backend="cpu"))


def test_nan_and_inf_reach_the_output_as_in_eager(isa):
    x, wt, b, r = _inputs(2, 32, 48, 4, 5, True, True, seed=1)
    x[0, 3, 1, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    r[0, 5, 3, 4] = float("nan")
    r[1, 7, 2, 2] = float("-inf")
    for relu in (True, False):
        out = conv_bias_act(x, wt, b, 1, 0, r, relu, backend="cpu")
        eager = torch.nn.functional.conv2d(x, wt, b) + r
        eager = eager.relu() if relu else eager
        assert torch.equal(out.isnan(), eager.isnan()) and out.isnan().any()
        assert torch.equal(out.isinf(), eager.isinf())
        finite = eager.isfinite()
        torch.testing.assert_close(out[finite], eager[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["nchw_x", "nchw_residual", "stride2", "padding1", "wider_than_max", "packed_weight"],
)
def test_other_calls_go_to_onednn_with_the_same_answers(isa, case):
    """What the kernel does not take still runs, on oneDNN, and agrees with float64."""
    x, wt, b, r = _inputs(1, MAX_CIN + 8 if case == "wider_than_max" else 24, 20, 6, 5, True, True, seed=2)
    stride, padding = (2 if case == "stride2" else 1), (1 if case == "padding1" else 0)
    if case == "nchw_x":
        x = x.contiguous()
    if case == "nchw_residual":
        r = r.contiguous()
    if stride != 1 or padding != 0:
        r = None
    w = wt
    if case == "packed_weight":
        from hrnet_fast.ops.conv import prepack

        w = prepack(wt, x.shape)
    out = conv_bias_act(x, w, b, stride, padding, r, True, backend="cpu")
    want = references.conv_bias_act(x, wt, b, stride, padding, r, True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=5e-6 * (1 + want.abs().max().item()))
    assert _runs_onednn(lambda: conv_bias_act(x, w, b, stride, padding, r, True, backend="cpu"))


def test_optimize_keeps_no_packed_copy_of_1x1_weights(isa):
    import hrnet_fast
    from hrnet_fast.fused.conv import FusedConv
    from hrnet_fast.reference import tiny_pose_hrnet

    model = tiny_pose_hrnet().eval()
    fast = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    ones = [m for m in fast.modules() if isinstance(m, FusedConv) and tuple(m.weight.shape[2:]) == (1, 1) and m.stride == [1, 1]]
    assert ones and all(m._packed is None for m in ones)
    others = [m for m in fast.modules() if isinstance(m, FusedConv) and m.stride == [2, 2]]
    assert others and all(m._packed for m in others)  # packed for oneDNN on first use


def test_portable_variant_leaves_1x1_convs_to_onednn():
    saved = torch.ops.hrnet_fast.cpu_isa()
    try:
        torch.ops.hrnet_fast.cpu_isa("base")
        x, wt, b, r = _inputs(1, 16, 8, 3, 4, True, True)
        assert _runs_onednn(lambda: conv_bias_act(x, wt, b, 1, 0, r, True, backend="cpu"))
        out = conv_bias_act(x, wt, b, 1, 0, r, True, backend="cpu")
        torch.testing.assert_close(out.double(), references.conv_bias_act(x, wt, b, 1, 0, r, True), rtol=0, atol=1e-5)
    finally:
        torch.ops.hrnet_fast.cpu_isa(saved)
