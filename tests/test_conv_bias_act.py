"""conv_bias_act: the plain-PyTorch reference against an independent float64 convolution
(tests/references.py), the compiled backends against the reference: values, memory format,
pre-packed weights, gradients, opcheck, torch.compile and input validation."""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest
import references
import torch
from torch._prims_common import suggest_memory_format

from hrnet_fast import _extension
from hrnet_fast.ops import conv_bias_act, conv_bias_act_reference
from hrnet_fast.ops._meta import conv_output_shape
from hrnet_fast.ops.conv import prepack

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last

BACKENDS = [pytest.param("torch"), pytest.param("cpu"), pytest.param("triton", marks=pytest.mark.triton)]
needs_ext = pytest.mark.skipif(not _extension.has_kernel("conv_bias_act", "CPU"), reason="C++ extension not built")

# (x shape, weight shape, stride, padding): HRNet's conv kinds, plus odd sizes.
CASES = {
    "3x3s1": ((2, 8, 10, 7), (8, 8, 3, 3), 1, 1),
    "3x3s2_odd": ((1, 6, 9, 7), (12, 6, 3, 3), 2, 1),
    "1x1": ((2, 16, 5, 6), (4, 16, 1, 1), 1, 0),
    "3x3s2_1x1_spatial": ((1, 4, 1, 1), (8, 4, 3, 3), 2, 1),
    "stem_rgb": ((1, 3, 12, 10), (8, 3, 3, 3), 2, 1),
}
# (relu, bias)
ACTS = [(True, True), (False, True), (True, False)]


def make(case: str, x_cl: bool = False, res: str | None = None, bias: bool = True, seed: int = 0, dtype=torch.float32):
    """Inputs for CASES[case]; res is None, "nchw" or "cl" (the residual's memory format)."""
    xs, ws, stride, padding = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=dtype)
    w = torch.randn(ws, generator=g, dtype=dtype) / ws[1] ** 0.5
    b = torch.randn(ws[0], generator=g, dtype=dtype) if bias else None
    if x_cl:
        x = x.contiguous(memory_format=CL)
    r = None
    if res is not None:
        r = torch.randn(conv_output_shape(x, w, [stride] * 2, [padding] * 2), generator=g, dtype=dtype)
        r = r.contiguous(memory_format=CL) if res == "cl" else r
    return x, w, b, stride, padding, r


def ref(x, w, b, stride, padding, r, relu):
    return conv_bias_act_reference(x, w, b, [stride] * 2, [padding] * 2, r, relu)


def exact(x, w, b, stride, padding, r, relu):
    """The independent float64 answer, in x's dtype."""
    return references.conv_bias_act(x, w, b, stride, padding, r, relu).to(x.dtype)


def assert_format_follows_x(y: torch.Tensor, x: torch.Tensor) -> None:
    """y is laid out like torch.empty(shape).contiguous(suggest_memory_format(x)) (the fake's promise)."""
    expected = torch.empty(y.shape).contiguous(memory_format=suggest_memory_format(x))
    significant = [(a, b) for a, b, n in zip(y.stride(), expected.stride(), y.shape) if n > 1]
    assert all(a == b for a, b in significant), f"strides {y.stride()} but expected {expected.stride()}"


def _triton_slice(x_cl: bool, res: str | None, relu: bool, bias: bool) -> bool:
    """Per case and x layout: no residual with bias+ReLU, and a residual in x's layout with one act
    dropped (ReLU off for channels_last, bias off for NCHW): each feature at least once, interpreted."""
    if res is None:
        return (relu, bias) == (True, True)
    if res != ("cl" if x_cl else "nchw"):
        return False
    return (relu, bias) == ((False, True) if x_cl else (True, False))


# every case x layout x residual format x act
VALUE_CASES = [(case, x_cl, res, relu, bias) for case in CASES for x_cl in (False, True) for res in (None, "nchw", "cl")
               for relu, bias in ACTS]


def value_params():
    """VALUE_CASES on cpu; a smaller slice on Triton (interpreted)."""
    out = [pytest.param("cpu", *c) for c in VALUE_CASES]
    out += [pytest.param("triton", *c, marks=pytest.mark.triton) for c in VALUE_CASES if _triton_slice(*c[1:])]
    return out


@pytest.mark.parametrize("case,x_cl,res,relu,bias", VALUE_CASES)
def test_reference_matches_float64(case, x_cl, res, relu, bias):
    """backend="torch" (conv_bias_act_reference, what the other backends are held to) against the sum
    over sliding windows in float64."""
    x, w, b, stride, padding, r = make(case, x_cl, res, bias)
    y = conv_bias_act(x, w, b, stride, padding, r, relu, backend="torch")
    torch.testing.assert_close(y, exact(x, w, b, stride, padding, r, relu), rtol=1e-5, atol=1e-5)
    assert_format_follows_x(y, x)
    if relu:
        assert (y >= 0).all()


@pytest.mark.parametrize("backend,case,x_cl,res,relu,bias", value_params())
def test_matches_reference(backend, case, x_cl, res, relu, bias):
    x, w, b, stride, padding, r = make(case, x_cl, res, bias)
    y = conv_bias_act(x, w, b, stride, padding, r, relu, backend=backend)
    torch.testing.assert_close(y, ref(x, w, b, stride, padding, r, relu), rtol=1e-4, atol=1e-4)
    assert_format_follows_x(y, x)
    if relu:
        assert (y >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    ["nchw", "cl", "cl_1x1_spatial", "one_channel", "sliced"],
)
def test_output_memory_format(backend, layout):
    """channels_last out exactly when x suggests channels_last, including ambiguous and strided x."""
    g = torch.Generator().manual_seed(1)
    if layout == "cl_1x1_spatial":
        x = torch.randn(2, 4, 1, 1, generator=g).contiguous(memory_format=CL)
    elif layout == "one_channel":
        x = torch.randn(2, 1, 6, 5, generator=g).contiguous(memory_format=CL)
    elif layout == "sliced":
        x = torch.randn(2, 8, 6, 10, generator=g)[:, ::2, :, ::2]
    else:
        x = torch.randn(2, 4, 6, 5, generator=g)
        x = x.contiguous(memory_format=CL) if layout == "cl" else x
    w = torch.randn(3, x.shape[1], 3, 3, generator=g)
    y = conv_bias_act(x, w, None, 1, 1, None, True, backend=backend)
    torch.testing.assert_close(y, exact(x, w, None, 1, 1, None, True), rtol=1e-4, atol=1e-4)
    assert_format_follows_x(y, x)
    wants_cl = suggest_memory_format(x) == CL
    assert y.is_contiguous(memory_format=CL if wants_cl else torch.contiguous_format)


# ---- pre-packed weights (cpu backend) ----------------------------------------------------


@needs_ext
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("x_cl,res", [(True, None), (True, "cl"), (True, "nchw"), (False, None), (False, "nchw")])
def test_packed_matches_dense(case, x_cl, res):
    x, w, b, stride, padding, r = make(case, x_cl, res, seed=2)
    wp = prepack(w, x.shape, stride, padding)
    assert wp.is_mkldnn and wp.shape == w.shape
    torch.testing.assert_close(wp.to_dense(), w, rtol=0, atol=0)
    dense = conv_bias_act(x, w, b, stride, padding, r, backend="cpu")
    packed = conv_bias_act(x, wp, b, stride, padding, r, backend="cpu")
    direct = torch.ops.hrnet_fast.conv_bias_act(x, wp, b, [stride] * 2, [padding] * 2, r, True)
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direct, packed, rtol=0, atol=0)
    torch.testing.assert_close(packed, ref(x, w, b, stride, padding, r, True), rtol=1e-4, atol=1e-4)
    assert_format_follows_x(packed, x)


@needs_ext
def test_packed_weight_works_for_other_input_shapes():
    """x_shape only picks oneDNN's layout: another batch and size still give the right answer."""
    x, w, b, stride, padding, _ = make("3x3s1", x_cl=True)
    wp = prepack(w, (4, 8, 32, 24), stride, padding)
    torch.testing.assert_close(
        conv_bias_act(x, wp, b, stride, padding, backend="auto"), ref(x, w, b, stride, padding, None, True),
        rtol=1e-4, atol=1e-4,
    )


@needs_ext
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "xs,ws,stride", [((1, 4, 2, 2), (8, 4, 3, 3), 2), ((2, 4, 5, 3), (1, 4, 3, 3), 1)], ids=["1x1_out", "one_channel_out"]
)
def test_residual_where_nchw_and_nhwc_coincide(xs, ws, stride, packed):
    """A residual on oneDNN's NHWC path (channels_last x or a packed weight) with an output whose NCHW
    and NHWC layouts coincide (1x1, or one channel): torch 2.11's oneDNN cannot fuse the add there."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(xs, generator=g).contiguous(memory_format=CL)
    w = torch.randn(ws, generator=g) / ws[1] ** 0.5
    b = torch.randn(ws[0], generator=g)
    r = torch.randn(conv_output_shape(x, w, [stride] * 2, [1, 1]), generator=g)
    y = conv_bias_act(x, prepack(w, xs, stride, 1) if packed else w, b, stride, 1, r, backend="cpu")
    torch.testing.assert_close(y, ref(x, w, b, stride, 1, r, True), rtol=1e-4, atol=1e-4)
    assert_format_follows_x(y, x)


@needs_ext
def test_prepack_rejects_bad_input():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"x_shape must be \[N, 3, H, W\]"):
        prepack(w, (1, 4, 8, 8))
    with pytest.raises(ValueError, match="float32 CPU weight"):
        prepack(w.double(), (1, 3, 8, 8))
    with pytest.raises(ValueError, match="weight must be 4-D"):
        prepack(w[0], (1, 3, 8, 8))
    wp = prepack(w, (1, 3, 8, 8))
    assert prepack(wp, (1, 3, 8, 8)) is wp
    with pytest.raises(ValueError, match="only the cpu backend accepts"):
        conv_bias_act(torch.randn(1, 3, 8, 8), wp, backend="torch")
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        conv_bias_act(x, wp, backend="cpu")


# ---- autograd, opcheck, torch.compile --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,x_cl,res,relu", [("3x3s2_odd", False, "nchw", True), ("1x1", True, "cl", False),
                                               ("3x3s1", True, None, True)])
def test_gradients_match_float64(backend, case, x_cl, res, relu):
    """Every backend's gradients (the reference's are aten's conv backward) against autograd through
    the float64 sliding-window sum."""
    inputs = make(case, x_cl, res, seed=3)
    x, w, b, stride, padding, r = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)] + [
        r.detach().clone().requires_grad_() if r is not None else None
    ]
    exact_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    g = torch.randn(conv_output_shape(x, w, [stride] * 2, [padding] * 2), generator=torch.Generator().manual_seed(4))
    y = conv_bias_act(leaves[0], leaves[1], leaves[2], stride, padding, leaves[3], relu, backend=backend)
    y.backward(g)
    references.conv_bias_act(exact_leaves[0], exact_leaves[1], exact_leaves[2], stride, padding, exact_leaves[3],
                             relu).backward(g.double())
    for name, got, want in zip(("x", "weight", "bias", "residual"), leaves, exact_leaves):
        if got is not None:
            torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@needs_ext
@pytest.mark.parametrize("case,x_cl,res,bias", [("3x3s1", False, "nchw", True), ("3x3s2_odd", True, "cl", False),
                                               ("1x1", True, None, True)])
def test_opcheck(case, x_cl, res, bias):
    x, w, b, stride, padding, r = make(case, x_cl, res, bias, seed=5)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(torch.ops.hrnet_fast.conv_bias_act.default, (x, w, b, [stride] * 2, [padding] * 2, r, True))


@needs_ext
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("x_cl,res,packed", [(True, "cl", False), (True, None, False), (False, "nchw", False),
                                             (True, "cl", True)])
def test_out_writes_a_slice_of_a_batch(case, x_cl, res, packed):
    """conv_bias_act_into images [1, 1 + N) of a larger channels_last tensor (ChunkedStage's use): the
    same bits as conv_bias_act, the images around it untouched, nothing returned. Channels_last x and
    a dense weight take the direct kernel's write in place, the rest conv_bias_act's result copied in."""
    x, w, b, stride, padding, r = make(case, x_cl, res, seed=11)
    if packed:
        w = prepack(w, x.shape, stride, padding)
    expected = torch.ops.hrnet_fast.conv_bias_act(x, w, b, [stride] * 2, [padding] * 2, r, True)
    n, *rest = expected.shape
    big = torch.full([n + 2, *rest], 7.0).contiguous(memory_format=CL)
    out = big.narrow(0, 1, n)
    assert torch.ops.hrnet_fast.conv_bias_act_into(x, w, b, [stride] * 2, [padding] * 2, r, True, out) is None
    assert torch.equal(out, expected)
    assert (big[0] == 7).all() and (big[-1] == 7).all()


@needs_ext
def test_out_rejects_a_mismatched_out():
    x, w, b, stride, padding, r = make("1x1", True, "cl", seed=12)
    args = (x, w, b, [stride] * 2, [padding] * 2, r, True)
    shape = list(r.shape)
    with pytest.raises(RuntimeError, match=r"out must have the output's sizes \[2, 4, 5, 6\], got \[2, 4, 5, 5\]"):
        torch.ops.hrnet_fast.conv_bias_act_into(*args, torch.empty(shape[:3] + [5]))
    with pytest.raises(RuntimeError, match="out must be a dense CPU tensor of x's dtype"):
        torch.ops.hrnet_fast.conv_bias_act_into(*args, torch.empty(shape, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="unsupported operation"):  # aten's overlap check: out is the residual
        torch.ops.hrnet_fast.conv_bias_act_into(*args, r)
    with pytest.raises(ValueError, match="out must have the output's shape"):  # the fake's check
        torch.ops.hrnet_fast.conv_bias_act_into(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args),
                                                torch.empty(shape[:3] + [5], device="meta"))


@needs_ext
@pytest.mark.parametrize("case,x_cl,res", [("1x1", True, "cl"), ("3x3s2_odd", False, None)])
def test_out_opcheck(case, x_cl, res):
    x, w, b, stride, padding, r = make(case, x_cl, res, seed=13)
    out = torch.empty(conv_output_shape(x, w, [stride] * 2, [padding] * 2)).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.hrnet_fast.conv_bias_act_into.default, (x, w, b, [stride] * 2, [padding] * 2, r, True, out))


class _Block(torch.nn.Module):
    """A BasicBlock with BN folded: two conv_bias_act calls, the second adding the residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.w1 = torch.nn.Parameter(torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5))
        self.w2 = torch.nn.Parameter(torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5))
        self.b = torch.nn.Parameter(torch.randn(c, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.hrnet_fast.conv_bias_act(x, self.w1, self.b, [1, 1], [1, 1], None, True)
        return conv_bias_act(y, self.w2, None, 1, 1, residual=x, relu=True, backend="cpu")


@needs_ext
def test_torch_compile_fullgraph():
    m = _Block(8).eval()
    x = torch.randn(2, 8, 9, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = torch.relu(
            torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(x, m.w1, m.b, 1, 1)), m.w2, None, 1, 1) + x
        )
        got = torch.compile(m, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert_format_follows_x(got, x)


# ---- bad input ----------------------------------------------------------------------


def _bad_inputs():
    x, w, b = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)
    out = torch.randn(1, 6, 8, 8)
    return [
        pytest.param(dict(x=x, weight=torch.randn(6, 5, 3, 3)), ValueError, r"weight must have shape \(C_out, 4, kH, kW\)",
                     id="weight_channels"),
        pytest.param(dict(x=x, weight=w, residual=torch.randn(1, 6, 7, 8)), ValueError,
                     r"residual must have the output's shape \(1, 6, 8, 8\)", id="residual_shape"),
        pytest.param(dict(x=x, weight=w, bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)", id="bias_shape"),
        pytest.param(dict(x=x, weight=w.double()), RuntimeError, "weight has dtype torch.float64 but x has torch.float32",
                     id="mixed_dtype"),
        pytest.param(dict(x=x, weight=w, residual=out.to("meta")), RuntimeError, "residual is on meta but x is on cpu",
                     id="mixed_device"),
        pytest.param(dict(x=torch.randn(1, 4, 2, 2), weight=torch.randn(6, 4, 5, 5)), ValueError, "too small",
                     id="too_small"),
        pytest.param(dict(x=x[0], weight=w), ValueError, r"x must be 4-D", id="x_3d"),
        pytest.param(dict(x=x.long(), weight=w.long()), ValueError, "x must be a floating-point tensor", id="x_int"),
        pytest.param(dict(x=x, weight=w, stride=0), ValueError, "stride must be >= 1", id="stride_0"),
        pytest.param(dict(x=x, weight=w, padding=(1, 1, 1)), ValueError, "padding must be an int or a pair", id="padding_3"),
    ]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("kwargs,exc,msg", _bad_inputs())
def test_bad_input_raises(backend, kwargs, exc, msg):
    kwargs = {"padding": 1, **kwargs}
    with pytest.raises(exc, match=msg):
        conv_bias_act(backend=backend, **kwargs)


@needs_ext
@pytest.mark.parametrize(
    "args,msg",
    [
        pytest.param((torch.randn(1, 4, 8, 8), torch.randn(6, 5, 3, 3), None, [1, 1], [1, 1]),
                     r"weight must have shape \(C_out, 4, kH, kW\)", id="weight_channels"),
        pytest.param((torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(5), [1, 1], [1, 1]),
                     r"bias must have shape \(6,\)", id="bias_shape"),
        pytest.param((torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3), None, [1, 1], [1, 1], torch.randn(1, 6, 8, 7)),
                     "residual must have the output's shape", id="residual_shape"),
        pytest.param((torch.randn(1, 4, 2, 2), torch.randn(6, 4, 5, 5), None, [1, 1], [0, 0]), "too small", id="too_small"),
        pytest.param((torch.randn(1, 4, 8, 8).double(), torch.randn(6, 4, 3, 3).double(), None, [1, 1], [1, 1]),
                     "supports float32 only", id="float64"),
        pytest.param((torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3).double(), None, [1, 1], [1, 1]),
                     "weight has dtype Double but x has Float", id="mixed_dtype"),
    ],
)
def test_direct_op_checks(args, msg):
    """torch.ops.hrnet_fast.conv_bias_act skips the Python checks: the C++ kernel checks too."""
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.hrnet_fast.conv_bias_act(*args)


@needs_ext
def test_cpu_backend_rejects_float64_clearly():
    x, w = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="supports float32 only"):
        conv_bias_act(x, w, backend="cpu")
    torch.testing.assert_close(conv_bias_act(x, w, backend="torch"), exact(x, w, None, 1, 0, None, True))


# ---- the CUDA epilogue kernel itself, compiled by g++ against tests/emu/cuda_emu.h --------------


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory) -> ctypes.CDLL:
    so = tmp_path_factory.mktemp("emu") / "conv_bias_act_emu.so"
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'tests/emu'}", str(ROOT / "tests/emu/conv_bias_act_emu.cpp"), "-o", str(so)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    i64, vp = ctypes.c_longlong, ctypes.c_void_p
    lib.conv_bias_act_emu_run.argtypes = [vp, vp, vp, i64, i64, i64, ctypes.c_int, ctypes.c_int, i64, ctypes.c_int, ctypes.c_int]
    lib.conv_bias_act_emu_run.restype = ctypes.c_int
    lib.conv_bias_act_emu_last_plan.restype = ctypes.c_int
    return lib


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("relu,bias,res", [(True, True, True), (False, True, False), (True, False, True),
                                           (False, False, True)])
@pytest.mark.parametrize("launch", [(0, 0), (2, 32), (64, 128)], ids=["default", "grid_stride", "oversized"])
@pytest.mark.parametrize("force", [0, 1, 2], ids=["planned", "scalar", "wide"])
def test_emulated_cuda_epilogue(emu_lib, nhwc, relu, bias, res, launch, force):
    """The CUDA path's bias + residual + ReLU pass over a bias-free conv output equals the reference.

    The planned kernel for NHWC with 12 channels reads 16-byte vectors of 4 channels; `force` 1 takes
    the element-per-thread kernel instead, 2 the 64-bit-index one."""
    x, w, b, stride, padding, r = make("3x3s2_odd", x_cl=nhwc, res="cl" if nhwc else "nchw", bias=bias, seed=7)
    r = r if res else None
    fmt = CL if nhwc else torch.contiguous_format
    # guard elements after the output catch writes past the end
    conv = torch.nn.functional.conv2d(x, w, None, stride, padding).contiguous(memory_format=fmt)
    flat = torch.cat([conv.permute(0, 2, 3, 1).reshape(-1) if nhwc else conv.reshape(-1), torch.full((37,), 7.0)])
    n, c, h, wd = conv.shape
    rflat = None if r is None else (r.permute(0, 2, 3, 1).reshape(-1) if nhwc else r.reshape(-1)).contiguous()
    rc = emu_lib.conv_bias_act_emu_run(flat.data_ptr(), None if b is None else b.data_ptr(),
                             None if rflat is None else rflat.data_ptr(), conv.numel(), c, h * wd, int(nhwc),
                             int(relu), *launch, force)
    assert rc == 0
    plan = emu_lib.conv_bias_act_emu_last_plan()
    assert plan & 1 == (nhwc and force != 1) and bool(plan & 2) == (force == 2)
    assert (flat[conv.numel():] == 7.0).all(), "kernel wrote past the output"
    body = flat[: conv.numel()]
    got = body.view(n, h, wd, c).permute(0, 3, 1, 2) if nhwc else body.view(n, c, h, wd)
    torch.testing.assert_close(got, ref(x, w, b, stride, padding, r, relu), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "cl", "packed"])
@pytest.mark.parametrize("res", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (1, 1, 0)], ids=["3x3s2", "1x1"])
def test_cpu_relu_keeps_nan_and_inf(layout, res, k, stride, padding):
    """oneDNN's ReLU post-op is max(x, 0), which drops NaN: the cpu backend must not (eager keeps it)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 8, 9, 7, generator=g)
    x[0, 1, 4, 3] = float("nan")
    x[1, 5, 2, 2] = float("inf")
    w = torch.randn(6, 8, k, k, generator=g) / 8
    b = torch.randn(6, generator=g)
    ref = conv_bias_act_reference(x, w, b, [stride] * 2, [padding] * 2, None, True)
    r = torch.randn(ref.shape, generator=g) if res else None
    ref = conv_bias_act_reference(x, w, b, [stride] * 2, [padding] * 2, r, True)
    fmt = torch.contiguous_format if layout == "nchw" else CL
    wk = prepack(w, x.shape, stride, padding) if layout == "packed" else w
    out = conv_bias_act(x.contiguous(memory_format=fmt), wk, b, stride, padding,
                            None if r is None else r.contiguous(memory_format=fmt), True, backend="cpu")
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-4)


@needs_ext
def test_direct_calls_with_a_meta_tensor_among_cpu_ones_are_refused():
    """The dispatcher runs the fake (Meta) kernel when any input is meta: it must refuse, not return memory."""
    x, w = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)
    with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
        torch.ops.hrnet_fast.conv_bias_act(x, w.to("meta"), None, [1, 1], [1, 1], None, True)
    with pytest.raises(RuntimeError, match="residual is on meta but x is on cpu"):
        torch.ops.hrnet_fast.conv_bias_act(x, w, None, [1, 1], [1, 1], torch.empty(1, 5, 6, 6, device="meta"), True)
    with pytest.raises(RuntimeError, match=r"weights\[0\] is on meta but base is on cpu"):
        torch.ops.hrnet_fast.fuse_multi_res(x, [torch.randn(1, 3, 3, 3)], [torch.randn(4, 3, device="meta")], None, True)
