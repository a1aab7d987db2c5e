"""seg_head (csrc/cpu/seg_head.cpp): the segmentation HRNet's head in one op, classifier(relu(conv1x1(x) + bias
+ sum_k bilinear(conv1x1(lowres[k])))), against the float64 reference of its parts in every variant of the
CPU kernels this machine runs; the same NaNs; bad arguments refused clearly; its fake kernel agrees
(opcheck). FusedSegHead runs it on the cpu backend where the classifier is a 1x1 conv, and keeps the three
ops where it is not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hrnet_fast
import references
from hrnet_fast import _extension
from hrnet_fast.fused.seg_head import FusedSegHead
from hrnet_fast.reference import tiny_seg_hrnet

from conftest import in_threads, randomize_bn
from test_cpu_isa import VARIANTS, _runs_here

pytestmark = pytest.mark.skipif(not _extension.has_kernel("seg_head", "CPU"), reason="needs the compiled extension")
CL = torch.channels_last
seg_head = torch.ops.hrnet_fast.seg_head


@pytest.fixture(params=[v for v in VARIANTS if _runs_here(v)])
def isa(request):
    saved = torch.ops.hrnet_fast.cpu_isa()
    torch.ops.hrnet_fast.cpu_isa(request.param)
    yield request.param
    torch.ops.hrnet_fast.cpu_isa(saved)


def _case(n, c0, h, w, c, classes, lows, cl=True, class_bias=True, seed=0):
    """x [n, c0, h, w], the low-res inputs (channels, h, w) each, and the head's weights."""
    g = torch.Generator().manual_seed(seed)
    fmt = CL if cl else torch.contiguous_format
    x = torch.randn(n, c0, h, w, generator=g).contiguous(memory_format=fmt)
    lowres = [torch.randn(n, ck, hk, wk, generator=g).contiguous(memory_format=fmt) for ck, hk, wk in lows]
    weight = torch.randn(c, c0, 1, 1, generator=g) / c0**0.5
    bias = torch.randn(c, generator=g)
    weights = [torch.randn(c, t.shape[1], generator=g) / t.shape[1] ** 0.5 for t in lowres]
    classifier = torch.randn(classes, c, 1, 1, generator=g) / c**0.5
    classifier_bias = torch.randn(classes, generator=g) if class_bias else None
    return x, lowres, weight, bias, weights, classifier, classifier_bias


def _reference(x, lowres, weight, bias, weights, classifier, classifier_bias, align_corners) -> torch.Tensor:
    """The head's parts in float64: the base conv, the fusion (tests/references.py), the classifier."""
    base = references.conv_bias_act(x, weight, bias, 1, 0, relu=False)
    s = references.fuse_multi_res(base, lowres, weights, None, True, "bilinear", align_corners)
    return references.conv_bias_act(s, classifier, classifier_bias, 1, 0, relu=False)


CASES = [
    # HRNetV2-W48's head at 64x128 (its 720 channels, 19 classes, three low-res inputs)
    ((1, 48, 16, 32, 720, 19, [(96, 8, 16), (192, 4, 8), (384, 2, 4)]), False, True),
    # odd sizes (branches 7x6, 4x3, 2x2 of 13x11), channels and classes no multiple of 8, two images
    ((2, 18, 13, 11, 270, 7, [(36, 7, 6), (72, 4, 3), (144, 2, 2)]), True, True),
    ((3, 5, 7, 9, 20, 3, [(10, 4, 5), (20, 2, 3)]), False, False),  # an NCHW x: planar output; 5 channels in
    ((1, 16, 1, 1, 40, 17, [(8, 1, 1)]), True, True),  # one pixel
    ((1, 16, 6, 10, 32, 5, []), False, True),  # a single branch: relu(base) only
    ((2, 8, 5, 7, 24, 2, [(8, 3, 4)] * 4 + [(16, 9, 11)]), False, True),  # five inputs (one larger than x)
]


@pytest.mark.parametrize("shape,align_corners,cl", CASES)
@pytest.mark.parametrize("class_bias", [True, False])
def test_matches_float64_reference(isa, shape, align_corners, cl, class_bias):
    args = _case(*shape, cl=cl, class_bias=class_bias)
    out = seg_head(*args, align_corners)
    want = _reference(*args, align_corners)
    assert out.shape == want.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6 * (1 + want.abs().max().item()))


def test_mixed_layouts_and_a_4d_weight(isa):
    x, lowres, weight, bias, weights, classifier, cb = _case(1, 16, 12, 20, 48, 6, [(32, 6, 10), (64, 3, 5)])
    lowres = [lowres[0].contiguous(), lowres[1]]  # one NCHW, one channels_last
    weights = [weights[0].reshape(48, 32, 1, 1), weights[1]]
    want = _reference(x, lowres, weight, bias, weights, classifier, cb, False)
    out = seg_head(x, lowres, weight, bias, weights, classifier, cb, False)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6 * (1 + want.abs().max().item()))


@pytest.mark.parametrize("where", ["x", "lowres"])
def test_same_nans_as_the_reference(isa, where):
    args = list(_case(1, 16, 12, 20, 48, 6, [(32, 6, 10), (64, 3, 5)]))
    if where == "x":
        args[0][0, 3, 5, 7] = float("nan")  # one output pixel
    else:
        args[1][0][0, 1, 2, 3] = float("nan")  # the pixels whose bilinear taps reach it
    out = seg_head(*args, False)
    want = _reference(*args, False)
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any()
    finite = ~want.isnan()
    torch.testing.assert_close(out.double()[finite], want[finite], rtol=0, atol=2e-6 * (1 + want[finite].abs().max().item()))


def test_the_same_bits_on_any_thread_count(isa):
    """Every output pixel is one task's, computed in one order: the thread count changes no bit (teams that
    divide the 6-pixel groups unevenly too). Called from several Python threads at once as well."""
    args = _case(2, 48, 13, 27, 720, 19, [(96, 7, 14), (192, 4, 7), (384, 2, 4)])
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 5, 8):
            torch.set_num_threads(threads)
            outs.append(seg_head(*args, False))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    results = [None] * 3

    def work(k: int) -> None:
        results[k] = seg_head(*args, False)

    in_threads(work, 3)
    assert all(torch.equal(r, outs[0]) for r in results)


def test_empty_batch():
    args = _case(0, 16, 4, 4, 32, 3, [(8, 2, 2)])
    assert seg_head(*args, False).shape == (0, 3, 4, 4)


BAD = [
    (lambda a: a.update(weight=torch.randn(32, 16, 3, 3)), "weight must be a 1x1 conv weight"),
    (lambda a: a.update(weight=torch.randn(32, 8, 1, 1)), "weight must be a 1x1 conv weight [C_out, 16, 1, 1]"),
    (lambda a: a.update(bias=torch.randn(31)), "bias must have shape (32,)"),
    (lambda a: a.update(weights=[]), "got 1 lowres inputs but 0 weights"),
    (lambda a: a.update(lowres=[torch.randn(2, 8, 2, 2)]), "lowres[0] must be 4-D [1, C_k, H_k, W_k]"),
    (lambda a: a.update(weights=[torch.randn(32, 9)]), "weights[0] must have shape (32, 8)"),
    (lambda a: a.update(classifier=torch.randn(3, 31, 1, 1)), "classifier must be a 1x1 conv weight [C_out, 32, 1, 1]"),
    (lambda a: a.update(classifier_bias=torch.randn(4)), "classifier_bias must have shape (3,)"),
    (lambda a: a.update(x=a["x"].double()), "takes float32 tensors, got x of dtype torch.float64"),
    (lambda a: a.update(weights=[a["weights"][0].half()]), "got weights[0] of dtype torch.float16"),
    (lambda a: a.update(lowres=[a["lowres"][0]] * 9, weights=[a["weights"][0]] * 9), "takes at most 8 lowres inputs"),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_bad_arguments_are_refused_clearly(edit, message):
    names = ("x", "lowres", "weight", "bias", "weights", "classifier", "classifier_bias")
    args = dict(zip(names, _case(1, 16, 4, 4, 32, 3, [(8, 2, 2)])))
    edit(args)
    with pytest.raises(RuntimeError) as e:
        seg_head(*args.values(), False)
    assert message in str(e.value)


def test_opcheck():
    args = _case(2, 16, 6, 10, 32, 5, [(32, 3, 5), (64, 2, 3)])
    torch.library.opcheck(seg_head.default, (*args, True))
    args = _case(1, 8, 5, 7, 24, 3, [(8, 3, 4)], cl=False)
    torch.library.opcheck(seg_head.default, (*args, False))


# ------------------------------------------------------------------------------- in FusedSegHead


def _ops(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return [e.name for e in p.events() if e.name.startswith("hrnet_fast::")]


@pytest.mark.parametrize("cpu_graph", [False, True])
def test_the_cpu_backends_head_is_the_one_op(cpu_graph):
    model = randomize_bn(tiny_seg_hrnet(align_corners=False)).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", cpu_graph=cpu_graph, strict=True)
    assert fused.last_layer.one_op
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        outs = [fused(x) for _ in range(3)]  # the third replayed where cpu_graph
        ops = _ops(lambda: fused(x)) if not cpu_graph else []
    for out in outs:
        assert out.shape == ref.shape and out.stride() == ref.stride()
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    if not cpu_graph:
        assert ops.count("hrnet_fast::seg_head") == 1 and "hrnet_fast::fuse_multi_res" in ops  # the HR modules'
        assert not fused.last_layer.classifier._packed  # nothing packed for the classifier's three-op path


def test_one_op_and_three_ops_agree_and_see_weight_edits():
    model = randomize_bn(tiny_seg_hrnet(align_corners=True)).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", cpu_graph=False, strict=True)
    head = fused.last_layer
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        one = fused(x)
        head.one_op = False
        three = fused(x)
        assert (one - three).abs().max() <= 1e-5 * three.abs().max()
        head.one_op = True
        head.classifier.weight.mul_(-2)  # in place, as load_state_dict copies
        head.base.bias.add_(1)
        model.last_layer[3].weight.mul_(-2)
        model.last_layer[1].bias.add_(1)  # BN's shift: the folded bias moves by as much
        ref = model(x)
        out = fused(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_a_3x3_classifier_keeps_the_three_ops():
    model = randomize_bn(tiny_seg_hrnet(align_corners=False)).eval()
    final = model.last_layer[3]
    model.last_layer[3] = nn.Conv2d(final.in_channels, final.out_channels, 3, padding=1).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", cpu_graph=False, strict=True)
    assert isinstance(fused.last_layer, FusedSegHead) and not fused.last_layer.one_op
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = fused(x)
        ops = _ops(lambda: fused(x))
    assert "hrnet_fast::seg_head" not in ops
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_torch_compile_fullgraph_runs_the_one_op():
    model = randomize_bn(tiny_seg_hrnet(align_corners=False)).eval()
    fused = hrnet_fast.optimize(model, backend="cpu")
    compiled = torch.compile(fused, fullgraph=True)  # through seg_head's fake kernel
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out, ref = compiled(x), model(x)
        ops = _ops(lambda: compiled(x))
    assert ops.count("hrnet_fast::seg_head") == 1
    assert out.shape == ref.shape and out.stride() == ref.stride()
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
