"""fuse_multi_res: the plain-PyTorch reference against an independent float64 computation
(tests/references.py), the compiled backends against the reference, and the CUDA kernel under emulation."""
from __future__ import annotations

import ctypes
import math
import re
import subprocess
from pathlib import Path

import pytest
import references
import torch
import torch.nn.functional as F

from hrnet_fast.ops import fuse_multi_res, fuse_multi_res_reference
from hrnet_fast.profile import peak_bytes

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [pytest.param("torch"), pytest.param("cpu"), pytest.param("triton", marks=pytest.mark.triton)]
COMPILED = [pytest.param("cpu"), pytest.param("triton", marks=pytest.mark.triton)]

# HRNet branch (channels, height, width) at 256x192 input; W48 has 1.5x W32's channels.
W32 = [(32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6)]
W48 = [(48, 64, 48), (96, 32, 24), (192, 16, 12), (384, 8, 6)]
# (branches in the stage, output i): output i fuses every lower-resolution branch j > i.
FUSIONS = [(2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2)]


def make_inputs(base_shape, lowres_shapes, *, bias=True, channels_last=False, grad=False, seed=0):
    """base [N, C, H, W], lowres [(C_k, h, w)], weights [C, C_k] scaled so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    n, c = base_shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = torch.randn(base_shape, generator=g).contiguous(memory_format=fmt)
    lowres = [torch.randn(n, ck, h, w, generator=g).contiguous(memory_format=fmt) for ck, h, w in lowres_shapes]
    weights = [torch.randn(c, ck, generator=g) / math.sqrt(ck) for ck, _, _ in lowres_shapes]
    b = torch.randn(c, generator=g) if bias else None
    if grad:
        for t in [base, *lowres, *weights] + ([b] if bias else []):
            t.requires_grad_(True)
    return base, lowres, weights, b


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: the GEMM sums in another order than conv2d, so allow ~100 ulp of the output's scale."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * scale)


def exact(base, lowres, weights, bias=None, relu=True):
    """The independent float64 answer, in base's dtype."""
    return references.fuse_multi_res(base, lowres, weights, bias, relu).to(base.dtype)


def fusion_case(branches, stage, i, batch=1):
    c, h, w = branches[i]
    return (batch, c, h, w), [branches[j] for j in range(i + 1, stage)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stage,i", FUSIONS)
@pytest.mark.parametrize("branches", [W32, W48], ids=["w32", "w48"])
def test_reference_hrnet_fusion_shapes(branches, stage, i, channels_last):
    """backend="torch" (fuse_multi_res_reference, what the other backends are held to) against float64."""
    base_shape, lows = fusion_case(branches, stage, i)
    base, lowres, weights, bias = make_inputs(base_shape, lows, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, bias, backend="torch")
    assert_close(out, exact(base, lowres, weights, bias))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stage,i", FUSIONS)
@pytest.mark.parametrize("branches", [W32, W48], ids=["w32", "w48"])
def test_hrnet_fusion_shapes(branches, stage, i, channels_last):
    base_shape, lows = fusion_case(branches, stage, i)
    base, lowres, weights, bias = make_inputs(base_shape, lows, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, bias, backend="cpu")
    assert_close(out, fuse_multi_res_reference(base, lowres, weights, bias))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# The row pass is split into at least as many tasks as threads where the rows allow (16 threads:
# W32's batch-1 fusions, 16 to 64 rows): any split gives the same bits as one thread's. Here the threads
# outnumber the cores: that costs time, not bits.
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("stage,i", [(4, 0), (4, 1), (4, 2)])
def test_cpu_any_thread_count_gives_the_same_bits(stage, i, mode):
    base_shape, lows = fusion_case(W32, stage, i)
    base, lowres, weights, bias = make_inputs(base_shape, lows, channels_last=True)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 5, 16):
            torch.set_num_threads(threads)
            outs.append(fuse_multi_res(base, lowres, weights, bias, mode=mode, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_close(outs[0], fuse_multi_res_reference(base, lowres, weights, bias, mode=mode))


@pytest.mark.parametrize("stage,i", FUSIONS)
@pytest.mark.parametrize("branches", [W32, W48], ids=["w32", "w48"])
def test_cpu_weights_stored_transposed_give_the_same_bits(branches, stage, i):
    """optimize() keeps the cpu backend's fusion weights stored [C_k, C] (seen as [C, C_k]), which the
    low-res GEMMs read in place where C is whole panels of 16 (W32's), else copy (W48's): the same
    sums either way as for contiguous weights."""
    base_shape, lows = fusion_case(branches, stage, i, batch=2)
    base, lowres, weights, bias = make_inputs(base_shape, lows, channels_last=True)
    out = fuse_multi_res(base, lowres, weights, bias, backend="cpu")
    stored = [w.t().contiguous().t() for w in weights]
    assert torch.equal(fuse_multi_res(base, lowres, stored, bias, backend="cpu"), out)
    assert_close(out, exact(base, lowres, weights, bias))


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_hrnet_fusion_shape_triton(channels_last):
    # The interpreter is slow: the smallest full-size fusion (stage 4, output 2) only.
    base_shape, lows = fusion_case(W32, 4, 2)
    base, lowres, weights, bias = make_inputs(base_shape, lows, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, bias, backend="triton")
    assert_close(out, fuse_multi_res_reference(base, lowres, weights, bias))


# base shape, lowres (C_k, h, w): sizes that don't divide, single pixels, down-sampling, many inputs.
ODD = {
    "7x5_to_20x13": ((2, 3, 20, 13), [(5, 7, 5)]),
    "two_odd": ((1, 4, 11, 9), [(3, 4, 5), (6, 3, 2)]),
    "one_pixel": ((1, 5, 1, 1), [(3, 1, 1)]),
    "pixel_to_map": ((2, 4, 6, 5), [(2, 1, 1)]),
    "downsample": ((1, 4, 3, 2), [(3, 7, 5)]),
    "no_lowres": ((2, 6, 5, 7), []),
    "same_width": ((2, 3, 10, 6), [(2, 5, 6), (4, 3, 3)]),
    "six_lowres": ((1, 8, 12, 10), [(2, 6, 5), (3, 3, 3), (4, 2, 2), (2, 12, 10), (5, 5, 4), (1, 1, 1)]),
}


# Every odd case once under the (slow) Triton interpreter, cycling through layout, bias and relu.
ODD_TRITON = [
    pytest.param("triton", case, bool(i & 1), bool(i & 2), not i & 4, marks=pytest.mark.triton, id=f"triton-{case}")
    for i, case in enumerate(sorted(ODD))
]


ODD_CASES = [(case, cl, bias, relu) for case in sorted(ODD) for cl in (False, True) for bias in (True, False)
             for relu in (True, False)]


@pytest.mark.parametrize("case,channels_last,bias,relu", ODD_CASES)
def test_reference_odd_shapes(case, channels_last, bias, relu):
    base_shape, lows = ODD[case]
    base, lowres, weights, b = make_inputs(base_shape, lows, bias=bias, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, b, relu, backend="torch")
    assert_close(out, exact(base, lowres, weights, b, relu))
    assert out.stride() == torch.empty_like(base).stride()
    if relu:
        assert out.min() >= 0


@pytest.mark.parametrize("backend,case,channels_last,bias,relu", [("cpu", *c) for c in ODD_CASES] + ODD_TRITON)
def test_odd_shapes(backend, case, channels_last, bias, relu):
    base_shape, lows = ODD[case]
    base, lowres, weights, b = make_inputs(base_shape, lows, bias=bias, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, b, relu, backend=backend)
    assert_close(out, fuse_multi_res_reference(base, lowres, weights, b, relu))
    assert out.stride() == torch.empty_like(base).stride()
    if relu:
        assert out.min() >= 0


# (in, out) pairs where float(in)/float(out) * dst rounds near integers; (26, 22): float32 and exact
# arithmetic pick different source rows.
SIZE_PAIRS = [(7, 20), (5, 13), (3, 7), (5, 17), (6, 12), (12, 12), (13, 7), (1, 9), (9, 1), (11, 32), (25, 73),
              (26, 22)]


@pytest.mark.parametrize(
    "size,index",
    [
        ((3, 7), [0, 0, 0, 1, 1, 2, 2]),  # floor(d * 3/7)
        ((7, 3), [0, 2, 4]),  # floor(d * 7/3): down-sampling skips rows
        ((5, 2), [0, 2]),
        ((4, 8), [0, 0, 1, 1, 2, 2, 3, 3]),
        ((1, 3), [0, 0, 0]),
        # float32(26/22) = 1.18181812... < 13/11, so output 11 reads row 12 (exact arithmetic: 13)
        ((26, 22), [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24]),
    ],
    ids=str,
)
def test_independent_nearest_index(size, index):
    """The independent reference's index rule: worked out by hand, and what F.interpolate picks."""
    assert references.nearest_index(*size).tolist() == index
    src = torch.arange(float(size[0])).view(1, 1, -1, 1)
    assert F.interpolate(src, size=(size[1], 1), mode="nearest").flatten().long().tolist() == index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_nearest_index_bit_exact(backend, channels_last):
    """Identity weights make the GEMM exact, so the result must equal base + the gathered low-res
    pixels bit for bit (the gather is tests/references.py's, not F.interpolate)."""
    for (hi, ho), (wi, wo) in zip(SIZE_PAIRS, reversed(SIZE_PAIRS)):
        base, lowres, _, _ = make_inputs((1, 3, ho, wo), [(3, hi, wi)], bias=False, channels_last=channels_last)
        out = fuse_multi_res(base, lowres, [torch.eye(3)], None, False, backend=backend)
        expected = base + references.upsample_nearest(lowres[0], (ho, wo))
        assert torch.equal(out, expected), f"{hi}x{wi} -> {ho}x{wo}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_big, lowres, weights, bias = make_inputs((2, 8, 12, 20), [(6, 6, 5), (4, 3, 3)])
    base = base_big[:, :, :, ::2]  # a strided view, dense in neither format
    low0 = lowres[0].transpose(2, 3).contiguous().transpose(2, 3)  # dense but H/W-permuted strides
    low1 = torch.cat([lowres[1], lowres[1]], 1)[:, ::2]  # channel-strided view
    w0 = weights[0].t().contiguous().t()  # transposed storage
    w1 = weights[1][:, :, None, None]  # the 4-D [C, C_k, 1, 1] form
    b = torch.stack([bias, bias], 1)[:, 0]
    args = (base, [low0, low1], [w0, w1], b)
    assert_close(fuse_multi_res(*args, backend=backend), exact(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_permuted_base(backend):
    """A dense base in neither format: the output keeps empty_like(base)'s strides, as the fake says."""
    base, lowres, weights, bias = make_inputs((2, 4, 6, 9), [(3, 3, 3)])
    base = base.transpose(2, 3).contiguous().transpose(2, 3)  # strides (216, 54, 1, 6)
    out = fuse_multi_res(base, lowres, weights, bias, backend=backend)
    assert out.stride() == torch.empty_like(base).stride() == base.stride()
    assert_close(out, exact(base, lowres, weights, bias))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.hrnet_fast.fuse_multi_res.default, (base, lowres, weights, bias, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("base_cl,low_cl", [(True, False), (False, True)])
def test_mixed_memory_formats(backend, base_cl, low_cl, batch):
    base, _, weights, bias = make_inputs((batch, 4, 8, 6), [(3, 4, 3)], channels_last=base_cl)
    _, lowres, _, _ = make_inputs((batch, 4, 8, 6), [(3, 4, 3)], channels_last=low_cl, seed=1)
    out = fuse_multi_res(base, lowres, weights, bias, backend=backend)
    assert_close(out, exact(base, lowres, weights, bias))
    assert out.stride() == torch.empty_like(base).stride()


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients(backend, channels_last, bias):
    shape, lows = (2, 4, 7, 6), [(3, 4, 3), (5, 2, 2)]
    got = make_inputs(shape, lows, bias=bias, channels_last=channels_last, grad=True)
    want = make_inputs(shape, lows, bias=bias, channels_last=channels_last, grad=True)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    fuse_multi_res(*got, backend=backend).backward(grad_out)
    fuse_multi_res_reference(*want).backward(grad_out)
    leaves = lambda a: [a[0], *a[1], *a[2]] + ([a[3]] if bias else [])  # noqa: E731
    for g, w in zip(leaves(got), leaves(want)):
        assert_close(g.grad, w.grad)


@pytest.mark.parametrize("case", ["w32_stage3_o0", "odd", "no_lowres", "no_bias_cl"])
def test_opcheck_cpu(case):
    samples = {
        "w32_stage3_o0": ((1, 8, 16, 12), [(16, 8, 6), (32, 4, 3)], True, False),
        "odd": ((2, 3, 20, 13), [(5, 7, 5)], True, False),
        "no_lowres": ((1, 4, 5, 5), [], True, False),
        "no_bias_cl": ((2, 4, 6, 4), [(3, 3, 2)], False, True),
    }
    shape, lows, bias, cl = samples[case]
    base, lowres, weights, b = make_inputs(shape, lows, bias=bias, channels_last=cl, grad=True)
    torch.library.opcheck(torch.ops.hrnet_fast.fuse_multi_res.default, (base, lowres, weights, b, True))


class _Fuse(torch.nn.Module):
    def __init__(self, weights, bias):
        super().__init__()
        self.weights = torch.nn.ParameterList(weights)
        self.bias = torch.nn.Parameter(bias)

    def forward(self, base, lowres):
        out = fuse_multi_res(base, lowres, list(self.weights), self.bias, backend="cpu")
        return out * 2.0  # something for the compiler to fuse around the op


def test_torch_compile_fullgraph():
    base, lowres, weights, bias = make_inputs((1, 4, 8, 6), [(3, 4, 3), (2, 2, 2)])
    module = _Fuse(weights, bias).eval()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        out = compiled(base, lowres)
    assert_close(out, 2.0 * fuse_multi_res_reference(base, lowres, weights, bias))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_writes_no_full_resolution_intermediate(channels_last):
    """Peak extra memory: the output plus the low-res GEMM results, never a second full-res tensor."""
    base_shape, lows = fusion_case(W32, 4, 0, batch=2)
    base, lowres, weights, bias = make_inputs(base_shape, lows, channels_last=channels_last)
    with torch.inference_mode():
        peak = peak_bytes(lambda: fuse_multi_res(base, lowres, weights, bias, backend="cpu"))
    low_bytes = sum(4 * base_shape[0] * base_shape[1] * h * w for _, h, w in lows)
    assert base.nbytes <= peak <= base.nbytes + low_bytes + 64 * 1024


# ---- bad inputs: the Python API (ValueError/RuntimeError) and direct C++ calls (RuntimeError) ----

def _bad_cases():
    base, lowres, weights, bias = make_inputs((2, 4, 6, 6), [(3, 3, 3)])
    return {
        "batch": ((base, [lowres[0][:1]], weights, bias), "lowres[0] has batch 1 but base has batch 2"),
        "weight_channels": ((base, lowres, [torch.randn(4, 5)], bias), "weights[0] must have shape (4, 3)"),
        "weight_kernel": ((base, lowres, [torch.randn(4, 3, 3, 3)], bias), "weights[0] must have shape (4, 3)"),
        "base_channels": ((base[:, :2], lowres, weights, bias), "weights[0] must have shape (2, 3)"),
        "bias_shape": ((base, lowres, weights, torch.randn(5)), "bias must have shape (4,)"),
        "more_inputs": ((base, [lowres[0], lowres[0]], weights, bias), "got 2 lowres inputs but 1 weights"),
        "base_3d": ((base[0], lowres, weights, bias), "base must be 4-D"),
        "lowres_3d": ((base, [lowres[0][0]], weights, bias), "lowres[0] must be 4-D"),
        "lowres_empty": ((base, [lowres[0][:, :, :0]], weights, bias), "lowres[0] must have a non-empty spatial size"),
        "device": ((base, [lowres[0].to("meta")], weights, bias), "lowres[0] is on meta but base is on cpu"),
        "dtype": ((base, lowres, [weights[0].double()], bias), "weights[0] has dtype torch.float64 but base has"),
        "bias_dtype": ((base, lowres, weights, bias.double()), "bias has dtype torch.float64"),
    }


BAD = sorted(_bad_cases())


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_inputs_public_api(case, backend):
    args, message = _bad_cases()[case]
    with pytest.raises((ValueError, RuntimeError), match=re.escape(message)):
        fuse_multi_res(*args, backend=backend)


# The meta device dispatches to the fake kernel, which has no checks: direct calls mix CPU dtypes only.
@pytest.mark.parametrize("case", [c for c in BAD if c != "device"])
def test_bad_inputs_cpp(case):
    args, message = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.hrnet_fast.fuse_multi_res(*args, True)


def test_cpu_kernel_rejects_float64():
    base, lowres, weights, bias = make_inputs((1, 2, 4, 4), [(2, 2, 2)])
    args = (base.double(), [lowres[0].double()], [weights[0].double()], bias.double())
    with pytest.raises(RuntimeError, match="CPU kernel takes float32 inputs, got base of dtype torch.float64"):
        fuse_multi_res(*args, backend="cpu")


# ---- mode="bilinear": HRNetV2's fusion (segmentation, face and hand landmarks) ----------------------

ALIGN = pytest.mark.parametrize("align_corners", [False, True], ids=["half_pixel", "align_corners"])
# HRNetV2-W18-like branches at a 64x128 input (1/4: 16x32) and sizes that don't divide (the official
# seg model resizes every branch to the exact size of the one it joins)
BILINEAR_CASES = {
    **ODD,
    "v2_w18_o0": ((1, 18, 16, 32), [(36, 8, 16), (72, 4, 8), (144, 2, 4)]),
    "v2_w18_o1_batch2": ((2, 36, 8, 16), [(72, 4, 8), (144, 2, 4)]),
    "odd_ratio_3x": ((1, 6, 15, 9), [(4, 5, 3), (3, 2, 2)]),
}


@ALIGN
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", sorted(BILINEAR_CASES))
def test_reference_bilinear_matches_float64(case, channels_last, align_corners):
    base_shape, lows = BILINEAR_CASES[case]
    base, lowres, weights, b = make_inputs(base_shape, lows, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, b, True, "bilinear", align_corners, backend="torch")
    want = references.fuse_multi_res(base, lowres, weights, b, True, "bilinear", align_corners).float()
    assert_close(out, want)
    assert out.stride() == torch.empty_like(base).stride()


def test_independent_linear_taps_by_hand():
    """tests/references.linear_taps against values worked out by hand."""
    # src = (d + .5) / 2 - .5 = -.25 (clamped to 0), .25, .75, 1.25 (past the last pixel: both taps on it)
    lo, hi, t = references.linear_taps(2, 4, False)
    assert lo.tolist() == [0, 0, 0, 1] and hi.tolist() == [1, 1, 1, 1] and t.tolist() == [0.0, 0.25, 0.75, 0.25]
    lo, hi, t = references.linear_taps(3, 5, True)  # src = d * 2 / 4 = 0, .5, 1, 1.5, 2
    assert lo.tolist() == [0, 0, 1, 1, 2] and hi.tolist() == [1, 1, 2, 2, 2] and t.tolist() == [0, 0.5, 0, 0.5, 0]
    lo, hi, t = references.linear_taps(4, 1, True)  # one output pixel with align_corners: the first source
    assert lo.tolist() == [0] and t.tolist() == [0.0]


@ALIGN
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", sorted(BILINEAR_CASES))
def test_bilinear_cpu(case, channels_last, align_corners):
    base_shape, lows = BILINEAR_CASES[case]
    for bias, relu in [(True, True), (False, False)]:
        base, lowres, weights, b = make_inputs(base_shape, lows, bias=bias, channels_last=channels_last)
        out = fuse_multi_res(base, lowres, weights, b, relu, "bilinear", align_corners, backend="cpu")
        assert_close(out, fuse_multi_res_reference(base, lowres, weights, b, relu, "bilinear", align_corners))
        assert out.stride() == torch.empty_like(base).stride()


@pytest.mark.triton
@pytest.mark.parametrize("case,channels_last,align_corners", [
    ("v2_w18_o0", True, False), ("odd_ratio_3x", False, True), ("six_lowres", True, True), ("downsample", False, False),
    ("one_pixel", True, True),
])
def test_bilinear_triton(case, channels_last, align_corners):
    base_shape, lows = BILINEAR_CASES[case]
    base, lowres, weights, b = make_inputs(base_shape, lows, channels_last=channels_last)
    out = fuse_multi_res(base, lowres, weights, b, True, "bilinear", align_corners, backend="triton")
    assert_close(out, fuse_multi_res_reference(base, lowres, weights, b, True, "bilinear", align_corners))


@pytest.mark.parametrize("backend", COMPILED)
@ALIGN
def test_bilinear_gradients(backend, align_corners):
    shape, lows = (2, 4, 7, 6), [(3, 4, 3), (5, 2, 2)]
    got = make_inputs(shape, lows, channels_last=True, grad=True)
    want = make_inputs(shape, lows, channels_last=True, grad=True)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    fuse_multi_res(*got, True, "bilinear", align_corners, backend=backend).backward(grad_out)
    fuse_multi_res_reference(*want, True, "bilinear", align_corners).backward(grad_out)
    for g, w in zip([got[0], *got[1], *got[2], got[3]], [want[0], *want[1], *want[2], want[3]]):
        assert_close(g.grad, w.grad)


@ALIGN
def test_bilinear_opcheck_cpu(align_corners):
    base, lowres, weights, b = make_inputs((2, 4, 9, 7), [(3, 4, 3), (2, 2, 2)], grad=True)
    torch.library.opcheck(torch.ops.hrnet_fast.fuse_multi_res.default,
                          (base, lowres, weights, b, True, "bilinear", align_corners))


@pytest.mark.parametrize("mode,align_corners,message", [
    ("bicubic", False, "mode must be"), ("nearest", True, "align_corners=True goes with mode='bilinear' only"),
])
def test_bad_mode(mode, align_corners, message):
    base, lowres, weights, b = make_inputs((1, 4, 6, 6), [(3, 3, 3)])
    for backend in ("torch", "cpu"):
        with pytest.raises(ValueError, match=message):
            fuse_multi_res(base, lowres, weights, b, True, mode, align_corners, backend=backend)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.hrnet_fast.fuse_multi_res(base, lowres, weights, b, True, mode, align_corners)


# ---- the CUDA kernel itself, compiled by g++ against tests/emu/cuda_emu.h ----------------------


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory) -> ctypes.CDLL:
    so = tmp_path_factory.mktemp("emu") / "fuse_multi_res_emu.so"
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'tests/emu'}", str(ROOT / "tests/emu/fuse_multi_res_emu.cpp"), "-o", str(so)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    i64, vp = ctypes.c_longlong, ctypes.c_void_p
    lib.fuse_emu_run.argtypes = [ctypes.c_int, vp, vp, vp, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.POINTER(vp), ctypes.POINTER(i64), ctypes.POINTER(i64), i64, ctypes.c_int, ctypes.c_int,
                                ctypes.c_int, ctypes.c_int]
    lib.fuse_emu_run.restype = ctypes.c_int
    lib.fuse_emu_last_plan.restype = ctypes.c_int
    return lib


EMU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


SCALAR, WIDE = 1, 2  # bits of fuse_emu_run's `force` and of fuse_emu_last_plan (VECTOR for the latter)
VECTOR = 1


def run_emulated(lib, base, ys, bias, relu, nhwc, blocks=0, threads=0, guard=37, force=0, mode="nearest",
                 align_corners=False):
    """The kernel on dense NCHW/NHWC storage of base's dtype; `guard` NaNs after the output catch stray writes.

    ys and bias are float32, as the CUDA entry point hands them to the kernel. Returns the output and
    the plan the kernel ran with (VECTOR and WIDE bits).
    """
    def dense(t):
        return (t.permute(0, 2, 3, 1) if nhwc else t).contiguous()

    n, c, h, w = base.shape
    out = torch.full((base.numel() + guard,), float("nan"), dtype=base.dtype)
    b, low = dense(base), [dense(y) for y in ys]
    ptrs = (ctypes.c_void_p * max(1, len(low)))(*[t.data_ptr() for t in low])
    hs = (ctypes.c_longlong * max(1, len(low)))(*[y.shape[2] for y in ys])
    ws = (ctypes.c_longlong * max(1, len(low)))(*[y.shape[3] for y in ys])
    rc = lib.fuse_emu_run(EMU_DTYPES[base.dtype], b.data_ptr(), out.data_ptr(), None if bias is None else bias.data_ptr(), n, c, h, w,
                         int(nhwc), int(relu), len(low), ptrs, hs, ws, blocks, threads, force, int(mode == "bilinear"),
                         int(align_corners))
    assert rc == 0
    assert out[base.numel():].isnan().all(), "the kernel wrote past the end of the output"
    flat = out[: base.numel()]
    return (flat.view(n, h, w, c).permute(0, 3, 1, 2) if nhwc else flat.view(n, c, h, w)), lib.fuse_emu_last_plan()


@pytest.mark.parametrize("force", [0, SCALAR, WIDE, SCALAR | WIDE], ids=["planned", "scalar", "wide", "scalar_wide"])
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("launch", [(0, 0), (3, 7), (1, 32), (500, 64)], ids=["default", "3x7", "1x32", "500x64"])
@pytest.mark.parametrize("case", ["w32_stage4_o2", "7x5_to_20x13", "two_odd", "one_pixel", "no_lowres", "four",
                                  "vector_four", "past_max_grid"])
def test_emulated_cuda_kernel(emu_lib, case, launch, nhwc, force):
    """Projected low-res inputs + the same float32 op order as the reference: results equal bit for bit."""
    shapes = {
        "w32_stage4_o2": ((1, 128, 16, 12), [(128, 8, 6)]),
        "7x5_to_20x13": ((2, 3, 20, 13), [(3, 7, 5)]),
        "two_odd": ((1, 4, 11, 9), [(4, 4, 5), (4, 3, 2)]),
        "one_pixel": ((1, 5, 1, 1), [(5, 1, 1)]),
        "no_lowres": ((2, 6, 5, 7), []),
        "four": ((1, 3, 9, 8), [(3, 3, 4), (3, 9, 8), (3, 2, 3), (3, 1, 1)]),
        "vector_four": ((2, 8, 9, 8), [(8, 3, 4), (8, 9, 8), (8, 2, 3), (8, 1, 1)]),
        # more than kElementwiseMaxBlocks * kElementwiseThreads elements: the default launch relies on the grid-stride loop
        "past_max_grid": ((1, 2, 1030, 1024), [(2, 515, 512)]),
    }
    base_shape, lows = shapes[case]
    for bias_on, relu in [(True, True), (False, False)]:
        base, ys, _, bias = make_inputs(base_shape, lows, bias=bias_on)
        out, plan = run_emulated(emu_lib, base, ys, bias, relu, nhwc, *launch, force=force)
        # 16-byte vectors of 4 float32 channels where the layout and channel count allow, else one element a thread
        assert plan & VECTOR == (nhwc and base_shape[1] % 4 == 0 and not force & SCALAR)
        assert bool(plan & WIDE) == bool(force & WIDE)
        # The reference with identity weights: its GEMM is exact, so its sum order is the kernel's.
        eye = [torch.eye(base_shape[1])] * len(ys)
        assert torch.equal(out, fuse_multi_res_reference(base, ys, eye, bias, relu))


@pytest.mark.parametrize("channels", [5, 16], ids=["scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nhwc", [False, True])
def test_emulated_cuda_kernel_16bit(emu_lib, dtype, nhwc, channels):
    """16-bit base/out: the kernel sums in float32 and rounds once, so it equals the float32 result rounded."""
    base32, ys, _, bias32 = make_inputs((2, channels, 11, 9), [(channels, 4, 5), (channels, 3, 2)])
    base, bias = base32.to(dtype), bias32.to(dtype).float()  # the CUDA entry point casts bias to float32
    for relu in (True, False):
        out, plan = run_emulated(emu_lib, base, ys, bias, relu, nhwc, 3, 64)
        assert plan & VECTOR == (nhwc and channels % 8 == 0)  # 8 channels of 16 bits per 16-byte vector
        eye = [torch.eye(channels)] * len(ys)
        assert out.dtype == dtype
        assert torch.equal(out, fuse_multi_res_reference(base.float(), ys, eye, bias, relu).to(dtype))


def test_emulated_cuda_kernel_misaligned_falls_back(emu_lib):
    """A base that starts 4 bytes into its storage cannot be read in 16-byte vectors: the scalar kernel runs."""
    storage = torch.randn(8 * 6 * 5 + 1)
    base = storage[1:].view(1, 6, 5, 8).permute(0, 3, 1, 2)  # NHWC storage at a 4-byte offset
    assert base.data_ptr() % 16 != 0
    _, ys2, _, bias2 = make_inputs((1, 8, 6, 5), [(8, 3, 3)])
    # run_emulated copies base densely (aligned), so hand the kernel the misaligned storage directly
    n, c, h, w = base.shape
    out = torch.full((base.numel() + 1,), float("nan"))[1:]
    low = ys2[0].permute(0, 2, 3, 1).contiguous()
    rc = emu_lib.fuse_emu_run(0, base.data_ptr(), out.data_ptr(), bias2.data_ptr(), n, c, h, w, 1, 1, 1,
                             (ctypes.c_void_p * 1)(low.data_ptr()), (ctypes.c_longlong * 1)(3),
                             (ctypes.c_longlong * 1)(3), 0, 0, 0, 0, 0)
    assert rc == 0 and emu_lib.fuse_emu_last_plan() & VECTOR == 0
    expect = fuse_multi_res_reference(base.contiguous(), ys2, [torch.eye(8)], bias2, True)
    assert torch.equal(out.view(1, 6, 5, 8).permute(0, 3, 1, 2), expect)


def _bilinear_expect(base, ys, bias, relu, align_corners):
    """float64: base + bias + sum_k F.interpolate(y_k, bilinear), then ReLU (ys are already projected)."""
    acc = base.double() + (0 if bias is None else bias.double().view(1, -1, 1, 1))
    for y in ys:
        acc = acc + torch.nn.functional.interpolate(y.double(), size=base.shape[-2:], mode="bilinear",
                                                    align_corners=align_corners)
    return acc.clamp_min(0) if relu else acc


@pytest.mark.parametrize("align_corners", [False, True], ids=["half_pixel", "align_corners"])
@pytest.mark.parametrize("force", [0, SCALAR, WIDE], ids=["planned", "scalar", "wide"])
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("case", ["x2_x4_x8", "odd_ratios", "same_size", "one_pixel_source", "to_one_pixel"])
def test_emulated_cuda_kernel_bilinear(emu_lib, case, nhwc, force, align_corners):
    """mode="bilinear": ATen's source coordinates and weights for both align_corners values, any ratio."""
    shapes = {
        "x2_x4_x8": ((2, 8, 16, 12), [(8, 8, 6), (8, 4, 3), (8, 2, 2)]),
        "odd_ratios": ((1, 4, 17, 11), [(4, 5, 4), (4, 9, 10)]),
        "same_size": ((1, 8, 5, 7), [(8, 5, 7)]),
        "one_pixel_source": ((1, 4, 6, 5), [(4, 1, 1)]),
        "to_one_pixel": ((1, 4, 1, 1), [(4, 3, 2)]),
    }
    base_shape, lows = shapes[case]
    for bias_on, relu in [(True, True), (False, False)]:
        base, ys, _, bias = make_inputs(base_shape, lows, bias=bias_on)
        out, plan = run_emulated(emu_lib, base, ys, bias, relu, nhwc, 3, 32, force=force, mode="bilinear",
                                 align_corners=align_corners)
        assert plan & VECTOR == (nhwc and base_shape[1] % 4 == 0 and not force & SCALAR)
        expect = _bilinear_expect(base, ys, bias, relu, align_corners)
        torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
