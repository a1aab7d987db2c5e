"""conv_bias_act's own direct convolution on CPU (csrc/cpu/conv_gemm.cpp): the calls it takes (a dense
weight on a channels_last input, 8 to kConvGemmMaxK / (kH kW) input channels, or fewer in windows of at
most kFewCinMaxKh rows of 64 floats, or more at no more than kColsPixelsPerCout output pixels an output
channel: conv_gemm_cols) run it in every vector variant this CPU has; its answers against the float64 reference (1x1 and strided 3x3, row counts that
are not a multiple of the micro-kernel's 6, channel counts that are not a multiple of 8 or 16, windows
leaving the image), NaN and infinities kept as eager keeps them, the weight read in place (HWIO) or
copied with the same bits, which calls still go to oneDNN, and optimize() keeping no oneDNN-packed copy
of the weights it runs."""
from __future__ import annotations

import pytest
import references
import torch
from torch.profiler import ProfilerActivity, profile

from hrnet_fast import _extension
from hrnet_fast.ops import conv_bias_act

pytestmark = pytest.mark.skipif(not _extension.has_kernel("conv_bias_act", "CPU"), reason="needs the compiled extension")
CL = torch.channels_last
MIN_CIN, MAX_K, FEW_CIN_MAX_KH = 8, 640, 7  # kConvGemmMinCin, kConvGemmMaxK, kFewCinMaxKh
PIXELS_PER_COUT = 2  # kColsPixelsPerCout


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


def _inputs(n, cin, cout, h, w, res, bias, k=1, stride=1, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=CL)
    wt = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    r = torch.randn(n, cout, ho, wo, generator=g).contiguous(memory_format=CL) if res else None
    return x, wt, b, r


def _runs_onednn(fn) -> bool:
    """Whether fn() dispatched oneDNN's convolution (our 1x1 kernel calls no op)."""
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return any("mkldnn::_convolution_pointwise" in e.name for e in p.events())


def _ours_against_float64(x, wt, b, stride, pad, r, relu) -> torch.Tensor:
    """conv_bias_act on the cpu backend: channels_last, float64's answer, not oneDNN's call; returned."""
    out = conv_bias_act(x, wt, b, stride, pad, r, relu, backend="cpu")
    want = references.conv_bias_act(x, wt, b, stride, pad, r, relu)
    assert out.is_contiguous(memory_format=CL) and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6 * (1 + want.abs().max().item()))
    assert not _runs_onednn(lambda: conv_bias_act(x, wt, b, stride, pad, r, relu, backend="cpu"))
    return out


@pytest.mark.parametrize(
    "n,cin,cout,h,w,k,stride,pad",
    [
        (1, 16, 4, 5, 6, 1, 1, 0),  # 30 rows: 5 whole groups; 4 channels: one partial vector
        (2, 64, 256, 7, 5, 1, 1, 0),  # 70 rows: a short last group of 4; stage 1's widening conv
        (1, 256, 64, 3, 7, 1, 1, 0),  # 21 rows; stage 1's narrowing conv
        (3, 32, 17, 4, 3, 1, 1, 0),  # the pose head: 17 = a whole panel and one channel
        (1, 8, 40, 1, 1, 1, 1, 0),  # one row; 40 = two panels and a half; the fewest input channels
        (1, 64, 256, 13, 11, 1, 1, 0),  # 143 rows: blocks of 96 rows, the last one short, its last group of 5
        (2, 32, 80, 9, 7, 1, 1, 0),  # 126 rows; 5 panels: a slice of four and a single one
        (1, 24, 40, 10, 10, 1, 1, 0),  # 100 rows; 40 = a pair of panels and a partial one
        (1, MAX_K, 24, 2, 3, 1, 1, 0),  # the widest K
        (2, 32, 64, 9, 7, 3, 2, 1),  # the fusions' downsampling, odd sizes: windows leave every side
        (1, 64, 48, 8, 6, 3, 2, 1),  # K = 576
        (1, 16, 32, 5, 5, 3, 1, 1),  # 3x3 stride 1 (optimize() runs those on Winograd)
        (1, 8, 16, 7, 6, 3, 2, 0),  # no padding
        (2, 8, 16, 7, 7, 5, 2, 2),  # 5x5
        # fewer than MIN_CIN input channels: the windows read in place (conv_few_cin_core.h)
        (1, 3, 64, 17, 13, 3, 2, 1),  # the stem's first conv: odd sizes, a row's last group of 1 pixel
        (2, 3, 64, 24, 26, 3, 2, 1),  # rows of 13 pixels: groups of 6, 6 and a short one
        (2, 3, 20, 9, 8, 3, 1, 1),  # stride 1; 20 = a panel and a partial one
        (1, 2, 16, 7, 9, 1, 1, 0),  # 1x1 from two channels
        (1, 4, 96, 15, 14, 7, 2, 3),  # 7x7 (a ResNet stem), 6 panels: four and two
        (1, 7, 48, 6, 5, 3, 1, 1),  # the most channels it takes; 3 panels: two and one
    ],
)
@pytest.mark.parametrize("res,relu,bias", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_matches_float64(isa, n, cin, cout, h, w, k, stride, pad, res, relu, bias):
    x, wt, b, r = _inputs(n, cin, cout, h, w, res, bias, k, stride, pad)
    out = _ours_against_float64(x, wt, b, stride, pad, r, relu)
    # the weight stored HWIO (as optimize() keeps it) is read in place where C_out is whole panels of
    # 16, else copied: either way the same sums in the same order
    hwio = wt.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    assert torch.equal(conv_bias_act(x, hwio, b, stride, pad, r, relu, backend="cpu"), out)


@pytest.mark.parametrize("cin,k,stride,pad", [(32, 1, 1, 0), (32, 3, 2, 1), (3, 3, 2, 1), (128, 3, 2, 1)])
def test_nan_and_inf_reach_the_output_as_in_eager(isa, cin, k, stride, pad):
    x, wt, b, r = _inputs(2, cin, 48, 8, 10, True, True, k, stride, pad, seed=1)
    x[0, 2, 1, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    r[0, 5, 3, 4] = float("nan")
    r[1, 7, 2, 2] = float("-inf")
    for relu in (True, False):
        out = conv_bias_act(x, wt, b, stride, pad, r, relu, backend="cpu")
        eager = torch.nn.functional.conv2d(x, wt, b, stride, pad) + r
        eager = eager.relu() if relu else eager
        assert torch.equal(out.isnan(), eager.isnan()) and out.isnan().any()
        assert torch.equal(out.isinf(), eager.isinf())
        finite = eager.isfinite()
        torch.testing.assert_close(out[finite], eager[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["nchw_x", "nchw_residual", "few_cin_taller_window", "wider_than_max_k", "stride_2x1", "padding_1x0",
     "packed_weight"],
)
def test_other_calls_go_to_onednn_with_the_same_answers(isa, case):
    """What the kernel does not take still runs, on oneDNN, and agrees with float64."""
    cin = {"few_cin_taller_window": MIN_CIN - 5, "wider_than_max_k": MAX_K // 9 + 1}.get(case, 24)
    k = FEW_CIN_MAX_KH + 2 if case == "few_cin_taller_window" else 3
    # K past MAX_K at more output pixels than PIXELS_PER_COUT an output channel (41 > 40)
    h, w = (41, 1) if case == "wider_than_max_k" else (6, 5)
    x, wt, b, r = _inputs(1, cin, 20, h + k - 3, w + k - 3, False, True, k, 1, 1, seed=2)
    stride = (2, 1) if case == "stride_2x1" else (1, 1)
    padding = (1, 0) if case == "padding_1x0" else (1, 1)
    if case == "nchw_x":
        x = x.contiguous()
    ho, wo = (x.shape[2] + 2 * padding[0] - k) // stride[0] + 1, (x.shape[3] + 2 * padding[1] - k) // stride[1] + 1
    r = torch.randn(1, 20, ho, wo).contiguous(memory_format=CL)
    if case == "nchw_residual":
        r = r.contiguous()
    w = wt
    if case == "packed_weight":
        from hrnet_fast.ops.conv import prepack

        w = prepack(wt, x.shape, stride, padding)
    out = conv_bias_act(x, w, b, stride, padding, r, True, backend="cpu")
    want = references.conv_bias_act(x, wt, b, stride, padding, r, True)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=5e-6 * (1 + want.abs().max().item()))
    assert _runs_onednn(lambda: conv_bias_act(x, w, b, stride, padding, r, True, backend="cpu"))


@pytest.mark.parametrize(
    "n,cin,cout,h,w,k,stride,pad",
    [
        (1, 128, 256, 16, 12, 3, 2, 1),  # W32's fusions and transition into the 8x6 branch at batch 1
        (2, 96, 40, 5, 4, 3, 1, 1),  # 40 pixels = PIXELS_PER_COUT x C_out; 40 = two panels and a half
        (1, 720, 64, 3, 3, 1, 1, 0),  # a 1x1 conv, 9 pixels: one group of 6 and a short one
        (3, 80, 200, 4, 5, 3, 2, 1),  # 13 panels: units of four and a single one; windows leave the image
        (1, 75, 32, 3, 2, 3, 1, 1),  # K = 675: halves of 352 and 323 rows, not whole steps of the stream
    ],
)
@pytest.mark.parametrize("res,relu,bias", [(True, True, True), (False, False, True), (True, False, False)])
def test_weight_bound_convs_match_float64(isa, n, cin, cout, h, w, k, stride, pad, res, relu, bias):
    """K past MAX_K at few output pixels: conv_gemm_cols (the weight's rows as two streams, their
    partial sums added), not oneDNN; its bits the same on 1, 2 and 3 threads, and with the weight
    stored HWIO (read in place) or not (copied)."""
    x, wt, b, r = _inputs(n, cin, cout, h, w, res, bias, k, stride, pad, seed=3)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    assert cin * k * k > MAX_K and n * ho * wo <= PIXELS_PER_COUT * cout
    assert torch.ops.hrnet_fast.conv_gemm_weight_bound(n * ho * wo, cin, k, k, cout)
    out = _ours_against_float64(x, wt, b, stride, pad, r, relu)
    hwio = wt.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(conv_bias_act(x, hwio, b, stride, pad, r, relu, backend="cpu"), out), threads
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize(
    "pixels,cin,k,cout,bound",
    [
        (PIXELS_PER_COUT * 256, 128, 3, 256, True),
        (PIXELS_PER_COUT * 256 + 1, 128, 3, 256, False),  # more pixels: oneDNN
        (48, MAX_K // 9, 3, 256, False),  # K within MAX_K: conv_gemm_rows, as any such conv
        (48, 720, 1, 64, True),
    ],
)
def test_conv_gemm_weight_bound(isa, pixels, cin, k, cout, bound):
    assert torch.ops.hrnet_fast.conv_gemm_weight_bound(pixels, cin, k, k, cout) is bound


def test_fused_conv_runs_weight_bound_shapes_on_conv_gemm(isa):
    """A FusedConv past MAX_K keeps its weight dense (HWIO) and runs conv_gemm_cols on inputs with few
    output pixels, oneDNN with a packed weight on the others, and oneDNN throughout when
    conv_gemm_cols_switch is off as the shape is first met; the answers agree with float64."""
    from hrnet_fast.fused.conv import FusedConv

    g = torch.Generator().manual_seed(4)
    wt = torch.randn(64, 128, 3, 3, generator=g) / (128 * 9) ** 0.5
    b = torch.randn(64, generator=g)
    small = torch.randn(1, 128, 16, 12, generator=g).contiguous(memory_format=CL)  # 48 pixels out
    large = torch.randn(1, 128, 24, 24, generator=g).contiguous(memory_format=CL)  # 144 > 128
    for switch in (True, False):
        conv = FusedConv(wt, b, (2, 2), (1, 1), True, "cpu")
        conv.pack()
        assert conv.weight.permute(2, 3, 1, 0).is_contiguous()
        torch.ops.hrnet_fast.conv_gemm_cols_switch(switch)
        try:
            with torch.no_grad():
                for x, ours in ((small, switch), (large, False)):
                    out = conv(x)
                    want = references.conv_bias_act(x, wt, b, 2, 1, None, True)
                    torch.testing.assert_close(out.double(), want, rtol=0, atol=5e-6 * (1 + want.abs().max().item()))
                    assert _runs_onednn(lambda: conv(x)) is not ours
                    assert conv._packed[tuple(x.shape)].is_mkldnn is not ours
        finally:
            torch.ops.hrnet_fast.conv_gemm_cols_switch(True)


@pytest.mark.parametrize(
    "n,cin,cout,h,w,k,stride,pad",
    [
        (2, 3, 64, 17, 13, 3, 2, 1),  # the stem's first conv, odd sizes
        (1, 3, 20, 9, 8, 3, 1, 1),  # 20 = a panel and a partial one
        (1, 4, 96, 15, 14, 7, 2, 3),  # 7x7: 28 rows of A a window
        (1, 1, 16, 7, 9, 3, 1, 1),  # one channel: NCHW and NHWC coincide
    ],
)
def test_an_nchw_image_is_read_in_place(isa, n, cin, cout, h, w, k, stride, pad):
    """conv_bias_act_into a channels_last out from an NCHW x of few channels (the stem on the caller's
    image): conv_few_cin_rows reads its planes, a window as kh x C_in rows; float64's answer, not oneDNN."""
    x, wt, b, r = _inputs(n, cin, cout, h, w, True, True, k, stride, pad, seed=5)
    x = x.contiguous()
    want = references.conv_bias_act(x, wt, b, stride, pad, r, True)
    out = torch.empty(want.shape).contiguous(memory_format=CL)

    def run():
        torch.ops.hrnet_fast.conv_bias_act_into(x, wt, b, [stride] * 2, [pad] * 2, r, True, out)

    run()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6 * (1 + want.abs().max().item()))
    assert not _runs_onednn(run)


@pytest.mark.parametrize(
    "n,cin,cout,h,w,k,stride,pad",
    [
        (2, 32, 17, 13, 11, 1, 1, 0),  # the pose head: blocks of 96 pixels across two images
        (1, 64, 256, 7, 5, 1, 1, 0),
        (1, 300, 40, 3, 5, 1, 1, 0),  # K past kKc: the rows path, a group at a time
        (2, 32, 20, 9, 7, 3, 2, 1),  # strided 3x3
        (1, 128, 256, 16, 12, 3, 2, 1),  # weight-bound: conv_gemm_cols
    ],
)
def test_an_nchw_output_is_written_in_place(isa, n, cin, cout, h, w, k, stride, pad):
    """conv_bias_act_into an NCHW out (a model's head for an NCHW caller): the same bits as the
    channels_last output, no copy; with a residual it is left to the copy (correct all the same)."""
    x, wt, b, r = _inputs(n, cin, cout, h, w, True, True, k, stride, pad, seed=6)
    want = conv_bias_act(x, wt, b, stride, pad, None, False, backend="cpu")
    out = torch.empty(want.shape)
    torch.ops.hrnet_fast.conv_bias_act_into(x, wt, b, [stride] * 2, [pad] * 2, None, False, out)
    assert torch.equal(out, want)
    with_res = torch.empty(want.shape)
    torch.ops.hrnet_fast.conv_bias_act_into(x, wt, b, [stride] * 2, [pad] * 2, r, True, with_res)
    assert torch.equal(with_res, conv_bias_act(x, wt, b, stride, pad, r, True, backend="cpu"))


def test_optimize_keeps_no_packed_copy_of_the_weights_it_runs(isa):
    """Every conv optimize() leaves to conv_bias_act on the cpu backend runs our kernel exactly where
    FusedConv says so (and then keeps its weight dense, stored HWIO), oneDNN's with a packed weight
    elsewhere; the model's answers and state_dict are the eager model's."""
    import hrnet_fast
    from hrnet_fast.fused.conv import FusedConv
    from hrnet_fast.reference import tiny_pose_hrnet

    model = tiny_pose_hrnet().eval()
    fast = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    convs = [m for m in fast.modules() if isinstance(m, FusedConv) and not m._winograd]
    ours = [m for m in convs if m._runs_conv_gemm()]
    assert ours and len(ours) < len(convs)  # K past MAX_K (transitions from 256 channels) stays on oneDNN
    assert fast.conv1 in ours  # the stem's first conv (3 input channels): conv_few_cin_rows
    for m in convs:
        if m in ours:
            assert m._packed is None and m.weight.permute(2, 3, 1, 0).is_contiguous()
        else:
            assert m._packed  # packed for oneDNN on first use
    # which kernel each conv's call takes, seen from the dispatcher: the stem's first conv, a 1x1 conv
    # of stage 1, a strided 3x3 of a fusion
    with torch.no_grad():
        for m in ours[:3] + ours[-3:]:
            c_in = m.weight.shape[1]
            probe = torch.randn(1, c_in, 8, 8).contiguous(memory_format=CL)
            assert not _runs_onednn(lambda: m(probe))
    # the fusions' 1x1 weights are stored [C_k, C], the rows their low-res GEMMs read in place
    from hrnet_fast.fused.hr_module import FusedHRModule

    fusion = [b for m in fast.modules() if isinstance(m, FusedHRModule) for k, b in m.named_buffers() if k.startswith("w_")]
    assert fusion and all(w.dim() == 2 and w.t().is_contiguous() for w in fusion)
    ref_state = hrnet_fast.optimize(model, backend="torch").state_dict()
    for key, value in fast.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "cin,kh,kw,takes",
    [
        (MIN_CIN, 3, 3, True),
        (MAX_K // 9, 3, 3, True),
        (MAX_K // 9 + 1, 3, 3, False),  # K past MAX_K
        (3, 3, 3, True),  # fewer channels: the windows read in place
        (3, FEW_CIN_MAX_KH, FEW_CIN_MAX_KH, True),
        (3, FEW_CIN_MAX_KH + 1, 3, False),  # a window of more rows than the kernel keeps pointers for
        (7, 3, 10, False),  # a window row of 70 floats, past 64
        (0, 1, 1, False),
    ],
)
def test_conv_gemm_takes(isa, cin, kh, kw, takes):
    assert torch.ops.hrnet_fast.conv_gemm_takes(cin, kh, kw) is takes


def test_portable_variant_leaves_the_convs_to_onednn():
    saved = torch.ops.hrnet_fast.cpu_isa()
    try:
        torch.ops.hrnet_fast.cpu_isa("base")
        assert not torch.ops.hrnet_fast.conv_gemm_takes(16, 1, 1) and not torch.ops.hrnet_fast.conv_gemm_takes(3, 3, 3)
        x, wt, b, r = _inputs(1, 16, 8, 3, 4, True, True)
        assert _runs_onednn(lambda: conv_bias_act(x, wt, b, 1, 0, r, True, backend="cpu"))
        out = conv_bias_act(x, wt, b, 1, 0, r, True, backend="cpu")
        torch.testing.assert_close(out.double(), references.conv_bias_act(x, wt, b, 1, 0, r, True), rtol=0, atol=1e-5)
    finally:
        torch.ops.hrnet_fast.cpu_isa(saved)
