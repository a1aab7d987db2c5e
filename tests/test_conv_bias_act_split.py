"""conv_bias_act_split (csrc/cpu/conv_bias_act_split.cpp): one conv whose output channels go to several
outputs, each with its own residual and ReLU, gives each output the bits of its own conv_bias_act (in
every vector variant this CPU has; where conv_gemm does not take the call, per output all the same);
bad arguments are refused clearly; its fake kernel agrees (opcheck). An HR module's fusions on the cpu
backend run their first strided convs from a branch that way (FusedHRModule._split_weights), with the
same bits as conv by conv, and see edits of those convs' weights."""
from __future__ import annotations

import pytest
import torch

import hrnet_fast
from hrnet_fast import _extension
from hrnet_fast.fused.hr_module import FusedHRModule
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import randomize_bn
from test_conv_gemm import _runs_onednn, isa  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not _extension.has_kernel("conv_bias_act", "CPU"), reason="needs the compiled extension")
CL = torch.channels_last
split = torch.ops.hrnet_fast.conv_bias_act_split


def _hwio(w: torch.Tensor) -> torch.Tensor:
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _case(n, cin, h, w, k, channels, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=CL)
    weights = [torch.randn(c, cin, k, k, generator=g) / (cin * k * k) ** 0.5 for c in channels]
    biases = [torch.randn(c, generator=g) for c in channels]
    ho, wo = (h + 2 * (k // 2) - k) // 2 + 1, (w + 2 * (k // 2) - k) // 2 + 1
    residuals = [torch.randn(n, c, ho, wo, generator=g).contiguous(memory_format=CL) if r else None
                 for c, r in zip(channels, residual)]
    return x, weights, biases, residuals


@pytest.mark.parametrize(
    "n,cin,h,w,k,channels,residual",
    [
        (1, 32, 64, 48, 3, (64, 32, 32), (True, False, False)),  # W32's 32-channel branch in stage 4
        (2, 64, 13, 11, 3, (128, 64), (True, False)),  # its 64-channel one, odd sizes
        (3, 24, 9, 7, 3, (32, 16, 8), (False, True, True)),  # the last output a partial panel
        (1, 16, 8, 8, 1, (16, 48), (True, True)),  # 1x1 (stride 2)
        (1, 32, 10, 6, 3, (40, 16), (True, False)),  # the second output not at a whole panel: per output
        (1, 4, 12, 12, 3, (16, 16), (False, False)),  # few input channels: per output
        (1, 80, 6, 6, 3, (32, 32), (True, True)),  # K = 720 past kConvGemmMaxK: per output
    ],
)
@pytest.mark.parametrize("relus", [(True, False, True), (False, True, False)])
def test_each_output_has_its_own_convs_bits(isa, n, cin, h, w, k, channels, residual, relus):
    x, weights, biases, residuals = _case(n, cin, h, w, k, channels, residual)
    relus = list(relus[: len(channels)])
    pad = k // 2
    outs = split(x, _hwio(torch.cat(weights)), torch.cat(biases), [2, 2], [pad, pad], list(channels), residuals, relus)
    assert len(outs) == len(channels)
    for out, wt, b, r, relu in zip(outs, weights, biases, residuals, relus):
        want = torch.ops.hrnet_fast.conv_bias_act(x, _hwio(wt), b, [2, 2], [pad, pad], r, relu)
        assert out.is_contiguous(memory_format=CL)
        assert torch.equal(out, want)


def test_no_bias_and_nan(isa):
    x, weights, _, residuals = _case(1, 32, 16, 12, 3, (32, 16), (True, False), seed=1)
    x[0, 3, 2, 2] = float("nan")
    outs = split(x, _hwio(torch.cat(weights)), None, [2, 2], [1, 1], [32, 16], residuals, [True, True])
    for out, wt, r in zip(outs, weights, residuals):
        want = torch.ops.hrnet_fast.conv_bias_act(x, _hwio(wt), None, [2, 2], [1, 1], r, True)
        assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any()
        assert torch.equal(out.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize(
    "channels,residuals,relus,message",
    [
        ([32, 8], [None, None], [True, True], "must add up to the weight's 48"),
        ([32, 16], [None], [True, True], "one entry per output"),
        ([48, 0], [None, None], [True, True], "at least one channel"),
        ([32, 16], [torch.zeros(1, 16, 8, 6), None], [True, True], "residual 0 must have its output's sizes"),
    ],
)
def test_bad_arguments_say_what_was_expected(channels, residuals, relus, message):
    x, weights, biases, _ = _case(1, 32, 16, 12, 3, (32, 16), (False, False))
    with pytest.raises(RuntimeError, match=message):
        split(x, _hwio(torch.cat(weights)), torch.cat(biases), [2, 2], [1, 1], channels, residuals, relus)


def test_opcheck():
    x, weights, biases, residuals = _case(2, 32, 16, 12, 3, (64, 32), (True, False))
    torch.library.opcheck(split.default, (x, _hwio(torch.cat(weights)), torch.cat(biases), [2, 2], [1, 1], [64, 32],
                                          residuals, [False, True]))


def _unsplit(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, FusedHRModule):
            m._split_weights = lambda j: None
    return model


@pytest.mark.parametrize("cpu_graph", [False, True])
def test_hr_modules_split_their_first_strided_convs_with_the_same_bits(cpu_graph):
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet(width=16)).eval()
    fast = hrnet_fast.optimize(model, backend="cpu", cpu_graph=cpu_graph)
    plain = _unsplit(hrnet_fast.optimize(model, backend="cpu", cpu_graph=cpu_graph))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            out = fast(x)
            assert torch.equal(out, plain(x))
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    # stage 3 from branch 0: 16 -> 32 into output 1, 16 -> 16 towards output 2 (stage 4's one module
    # fuses into one output only; stage 2's one downward path is one conv)
    splits = {(name, j): len(v[1][2]) for name, m in fast.named_modules() if isinstance(m, FusedHRModule)
              for j, v in m._split_cache.items() if v[1] is not None}
    assert splits == {("stage3.0", 0): 2}, splits
    # edits of the split convs' weight and bias are seen by the next call, as the unsplit model sees them
    with torch.no_grad():
        for m in (fast, plain):
            m.stage3[0].chains[2][0][0].weight.mul_(-2.0)
            m.stage3[0].chains[1][0][0].bias.add_(1.0)
        for _ in range(3):
            assert torch.equal(fast(x), plain(x))
