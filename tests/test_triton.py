"""The Triton kernels beyond fp32 values (those are in test_fuse_multi_res.py / test_conv_bias_act.py):
fp16 accuracy against fp16 and fp32 references, one launch per call, autograd through both ops,
torch.compile, bad inputs, and optimize(model, backend="triton") end to end.

Run in its own process with TRITON_INTERPRET=1 set before triton is imported (CPU tensors):
    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton.py
"""
from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_bn

import hrnet_fast
from hrnet_fast import _extension
from hrnet_fast.ops import _backend, conv_bias_act, conv_bias_act_reference, fuse_multi_res, fuse_multi_res_reference
from hrnet_fast.ops._backend import triton_available
from hrnet_fast.reference import tiny_pose_hrnet

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not triton_available(torch.device("cpu")), reason="needs triton and TRITON_INTERPRET=1 set before pytest starts"
    ),
]
CL = torch.channels_last


def _randn(*shape: int, g: torch.Generator, scale: float = 1.0, fmt=torch.contiguous_format) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).contiguous(memory_format=fmt)


def fuse_inputs(base_shape, lowres_shapes, *, seed: int = 0, fmt=torch.contiguous_format):
    """base [N, C, H, W], lowres [(C_k, h, w)], weights [C, C_k] scaled so outputs are O(1), bias [C]."""
    g = torch.Generator().manual_seed(seed)
    n, c = base_shape[:2]
    base = _randn(*base_shape, g=g, fmt=fmt)
    lowres = [_randn(n, ck, h, w, g=g, fmt=fmt) for ck, h, w in lowres_shapes]
    weights = [_randn(c, ck, g=g, scale=1 / math.sqrt(ck)) for ck, _, _ in lowres_shapes]
    return base, lowres, weights, _randn(c, g=g)


def conv_inputs(x_shape, w_shape, *, seed: int = 0, fmt=torch.contiguous_format, residual_shape=None):
    g = torch.Generator().manual_seed(seed)
    x = _randn(*x_shape, g=g, fmt=fmt)
    w = _randn(*w_shape, g=g, scale=1 / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))
    r = None if residual_shape is None else _randn(*residual_shape, g=g, fmt=fmt)
    return x, w, _randn(w_shape[0], g=g), r


def half(ts):
    return [None if t is None else [u.half() for u in t] if isinstance(t, list) else t.half() for t in ts]


def assert_flash_close(out: torch.Tensor, ref16: torch.Tensor, ref32: torch.Tensor, atol: float = 1e-3) -> None:
    """flash-attention style: the kernel's error vs fp32 within 2x the fp16 reference's own error + atol."""
    assert out.dtype == ref16.dtype
    scale = max(1.0, ref32.abs().max().item())
    err = (out.float() - ref32).abs().max().item()
    ref_err = (ref16.float() - ref32).abs().max().item()
    assert err <= 2 * ref_err + atol * scale, f"kernel error {err:.3g} vs fp16 reference error {ref_err:.3g}"


# ---- fp16 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("lows", [[(6, 5, 4)], [(6, 5, 4), (10, 3, 2), (20, 2, 1)]], ids=["one", "three"])
def test_fuse_multi_res_fp16(lows, fmt):
    args32 = fuse_inputs((2, 8, 10, 7), lows, fmt=fmt)
    # the fp32 reference sees exactly the fp16 inputs, so only the arithmetic differs
    args16 = half(args32)
    ref32 = fuse_multi_res_reference(*[t if t is None else [u.float() for u in t] if isinstance(t, list) else t.float()
                                       for t in args16])
    out = fuse_multi_res(*args16, backend="triton")
    assert_flash_close(out, fuse_multi_res_reference(*args16), ref32)
    assert out.stride() == torch.empty_like(args16[0]).stride()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("w_shape,stride,padding", [((12, 8, 3, 3), 1, 1), ((12, 8, 3, 3), 2, 1), ((6, 8, 1, 1), 1, 0)],
                         ids=["3x3s1", "3x3s2", "1x1"])
def test_conv_bias_act_fp16(w_shape, stride, padding, fmt):
    x_shape = (2, 8, 9, 7)
    ho = (x_shape[2] + 2 * padding - w_shape[2]) // stride + 1
    wo = (x_shape[3] + 2 * padding - w_shape[3]) // stride + 1
    x, w, b, r = half(conv_inputs(x_shape, w_shape, fmt=fmt, residual_shape=(2, w_shape[0], ho, wo)))
    s, p = [stride] * 2, [padding] * 2
    ref32 = conv_bias_act_reference(x.float(), w.float(), b.float(), s, p, r.float(), True)
    out = conv_bias_act(x, w, b, stride, padding, r, True, backend="triton")
    assert_flash_close(out, conv_bias_act_reference(x, w, b, s, p, r, True), ref32)
    assert out.is_contiguous(memory_format=fmt)


# ---- one launch per call --------------------------------------------------------------------


def _count_launches(monkeypatch, kernel) -> list[object]:
    """Record every launch of `kernel` (the @triton.jit object): kernel[grid](...) goes through .run."""
    calls: list[object] = []
    run = kernel.run

    def counting_run(*args, **kwargs):
        calls.append(kwargs.get("grid"))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counting_run)
    return calls


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_fuse_multi_res_is_one_launch(monkeypatch, count):
    from hrnet_fast.triton import fusion

    calls = _count_launches(monkeypatch, fusion._fuse_multi_res_kernel)
    lows = [(4, 6, 5), (8, 3, 3), (16, 2, 2)][:count]
    args = fuse_inputs((1, 5, 12, 10), lows)
    out = fuse_multi_res(*args, backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, fuse_multi_res_reference(*args), rtol=0, atol=1e-5 * max(1.0, out.abs().max().item()))


def test_fuse_multi_res_more_than_three_lowres_chains_launches(monkeypatch):
    """HRNet never fuses more than 3, but the op takes any number (the shared odd-shape tests use 6):
    each launch takes up to 3 inputs and accumulates through fp32, with ReLU once at the end."""
    from hrnet_fast.triton import fusion

    calls = _count_launches(monkeypatch, fusion._fuse_multi_res_kernel)
    args = fuse_inputs((1, 4, 6, 6), [(2, 3, 3), (3, 2, 2), (2, 1, 1), (3, 6, 6)])
    out = fuse_multi_res(*args, relu=True, backend="triton")
    assert len(calls) == 2
    ref = fuse_multi_res_reference(*args, relu=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_conv_bias_act_is_one_launch(monkeypatch):
    from hrnet_fast.triton import conv

    calls = _count_launches(monkeypatch, conv._conv_bias_act_kernel)
    x, w, b, r = conv_inputs((1, 4, 7, 6), (5, 4, 3, 3), residual_shape=(1, 5, 7, 6))
    out = conv_bias_act(x, w, b, 1, 1, r, True, backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, conv_bias_act_reference(x, w, b, [1, 1], [1, 1], r, True), rtol=1e-5, atol=1e-5)


# ---- autograd and torch.compile through both ops ----------------------------------------------


class _Block(torch.nn.Module):
    """conv_bias_act (3x3, residual) feeding fuse_multi_res: both Triton ops in one forward."""

    def __init__(self, backend: str, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backend = backend
        self.conv_w = torch.nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) / 6)
        self.conv_b = torch.nn.Parameter(torch.randn(4, generator=g))
        self.fuse_w = torch.nn.ParameterList([torch.randn(4, 6, generator=g) / 3, torch.randn(4, 8, 1, 1, generator=g) / 3])
        self.fuse_b = torch.nn.Parameter(torch.randn(4, generator=g))

    def forward(self, x: torch.Tensor, lowres: list[torch.Tensor]) -> torch.Tensor:
        if self.backend == "torch-reference":
            y = conv_bias_act_reference(x, self.conv_w, self.conv_b, [1, 1], [1, 1], x, True)
            return fuse_multi_res_reference(y, lowres, list(self.fuse_w), self.fuse_b, True) * 2.0
        y = conv_bias_act(x, self.conv_w, self.conv_b, 1, 1, x, True, backend=self.backend)
        return fuse_multi_res(y, lowres, list(self.fuse_w), self.fuse_b, True, backend=self.backend) * 2.0


def _block_inputs(fmt=torch.contiguous_format, grad: bool = False):
    g = torch.Generator().manual_seed(1)
    x = _randn(2, 4, 6, 5, g=g, fmt=fmt)
    lowres = [_randn(2, 6, 3, 3, g=g, fmt=fmt), _randn(2, 8, 2, 1, g=g, fmt=fmt)]
    if grad:
        for t in [x, *lowres]:
            t.requires_grad_(True)
    return x, lowres


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_gradients_through_both_ops(fmt):
    got, want = _Block("triton"), _Block("torch-reference")
    x, lowres = _block_inputs(fmt, grad=True)
    xr, lowres_r = _block_inputs(fmt, grad=True)
    grad_out = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    got(x, lowres).backward(grad_out)
    want(xr, lowres_r).backward(grad_out)
    pairs = [("x", x, xr)] + [(f"lowres[{k}]", a, b) for k, (a, b) in enumerate(zip(lowres, lowres_r))]
    pairs += [(n, p, dict(want.named_parameters())[n]) for n, p in got.named_parameters()]
    for name, a, b in pairs:
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_torch_compile_fullgraph_both_ops():
    # Under the interpreter the ops are opaque custom ops (wrap_triton cannot trace interpreted
    # kernels), so inductor compiles the graph around them and calls them as extern kernels; on a
    # GPU the same ops are triton_ops whose launches inductor sees. fullgraph=True: no graph breaks.
    module, ref_module = _Block("triton").eval(), _Block("torch-reference").eval()
    x, lowres = _block_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, lowres)
        ref = ref_module(x, lowres)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_ops_coexist_with_the_cpp_library():
    """The Python-defined Triton ops live in the hrnet_fast namespace that the C++ extension defines."""
    _backend.define_triton_ops()
    names = {"fuse_multi_res_triton", "conv_bias_act_triton"}
    if _extension.is_built():
        names |= {"fuse_multi_res", "conv_bias_act"}
    for name in names:
        assert isinstance(getattr(torch.ops.hrnet_fast, name), torch._ops.OpOverloadPacket), name


# ---- bad inputs -----------------------------------------------------------------------------


def _bad_fuse():
    base, lowres, weights, bias = fuse_inputs((2, 4, 6, 6), [(3, 3, 3)])
    return {
        "more_lowres_than_weights": ((base, [lowres[0], lowres[0]], weights, bias), ValueError,
                                     "got 2 lowres inputs but 1 weights"),
        "weight_shape": ((base, lowres, [torch.randn(4, 5)], bias), ValueError, "weights[0] must have shape (4, 3)"),
        "batch": ((base, [lowres[0][:1]], weights, bias), ValueError, "lowres[0] has batch 1 but base has batch 2"),
        "dtype": ((base, lowres, [weights[0].half()], bias), RuntimeError, "weights[0] has dtype torch.float16"),
        "bias_shape": ((base, lowres, weights, torch.randn(3)), ValueError, "bias must have shape (4,)"),
    }


@pytest.mark.parametrize("case", sorted(_bad_fuse()))
def test_fuse_multi_res_bad_inputs(case):
    args, error, message = _bad_fuse()[case]
    with pytest.raises(error, match=re.escape(message)):
        fuse_multi_res(*args, backend="triton")


def test_fuse_multi_res_op_checks_pairing_itself():
    """The op called directly (no Python checks in front) still refuses unpaired lowres/weights."""
    _backend.define_triton_ops()
    base, lowres, weights, bias = fuse_inputs((1, 4, 6, 6), [(3, 3, 3), (2, 2, 2)])
    with pytest.raises(ValueError, match=re.escape("got 2 lowres inputs but 1 weights")):
        torch.ops.hrnet_fast.fuse_multi_res_triton(base, lowres, weights[:1], bias, True)


def _bad_conv():
    x, w, b, _ = conv_inputs((1, 4, 6, 6), (5, 4, 3, 3))
    return {
        "weight_channels": ((x, torch.randn(5, 3, 3, 3), b, 1, 1, None), ValueError, "weight must have shape (C_out, 4, kH, kW)"),
        "residual_shape": ((x, w, b, 1, 1, torch.randn(1, 5, 5, 5)), ValueError, "residual must have the output's shape (1, 5, 6, 6)"),
        "too_small": ((x, torch.randn(5, 4, 9, 9), b, 1, 0, None), ValueError, "is too small for a (9, 9) kernel"),
        "bias_dtype": ((x, w, b.double(), 1, 1, None), RuntimeError, "bias has dtype torch.float64"),
    }


@pytest.mark.parametrize("case", sorted(_bad_conv()))
def test_conv_bias_act_bad_inputs(case):
    args, error, message = _bad_conv()[case]
    with pytest.raises(error, match=re.escape(message)):
        conv_bias_act(*args, backend="triton")


# ---- the whole model ------------------------------------------------------------------------


def test_optimize_tiny_pose_hrnet_end_to_end(monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()  # non-trivial BN statistics, so folding matters
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fused = hrnet_fast.optimize(model, backend="triton")
        from hrnet_fast.triton import conv, fusion

        conv_calls = _count_launches(monkeypatch, conv._conv_bias_act_kernel)
        fuse_calls = _count_launches(monkeypatch, fusion._fuse_multi_res_kernel)
        out = fused(x)
    assert fused.hrnet_fast_backend == "triton"
    assert conv_calls and fuse_calls, "the fused model must run both Triton kernels"
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


# ---- fp32 extras: several K/N tiles, residual in the other layout, strided views ----------------

# (N, C_in, H, W, C_out, k, stride, padding): odd sizes, padding 0/1, one pixel, and channel counts
# past the interpreter's 32-wide tiles so the K loop and the C_out grid take several steps
CONV_CASES = [
    (1, 5, 7, 9, 6, 3, 1, 1),
    (2, 3, 9, 7, 4, 3, 2, 1),
    (1, 4, 5, 5, 3, 3, 2, 0),
    (2, 17, 3, 4, 18, 1, 1, 0),
    (1, 3, 1, 1, 5, 3, 1, 1),
    (1, 40, 5, 4, 36, 3, 1, 1),
    (1, 70, 3, 3, 65, 1, 2, 0),
]


def _conv_case(case, *, cl: bool, bias: bool, residual: bool, seed: int = 0):
    n, ci, h, w, co, k, s, p = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g)
    x = x.contiguous(memory_format=CL) if cl else x
    wt = torch.randn(co, ci, k, k, generator=g) / math.sqrt(ci * k * k)
    b = torch.randn(co, generator=g) if bias else None
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    # the residual in the other layout than x: its strides are kernel arguments of their own
    r = torch.randn(n, co, ho, wo, generator=g).contiguous(memory_format=torch.contiguous_format if cl else CL) \
        if residual else None
    return x, wt, b, [s, s], [p, p], r


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(CONV_CASES)))
def test_conv_fp32_cases(i: int, cl: bool) -> None:
    # cycle bias/residual/relu over the cases so each combination appears without a full product
    bias, residual, relu = bool(i & 1), not i & 2, i % 3 != 2
    x, w, b, s, p, r = _conv_case(CONV_CASES[i], cl=cl, bias=bias, residual=residual)
    out = conv_bias_act(x, w, b, s, p, r, relu, backend="triton")
    ref = conv_bias_act_reference(x, w, b, s, p, r, relu)
    assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * max(1.0, ref.abs().max().item()))


def test_conv_strided_views() -> None:
    """Non-dense x, transposed weight storage, strided bias: every stride is a kernel argument."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 6, 10, generator=g)[:, ::2, :, ::2]
    w = torch.randn(4, 3, 3, 3, generator=g).transpose(0, 1)  # [3, 4, 3, 3] with C_in-major storage
    b = torch.randn(3, 2, generator=g)[:, 1]
    out = conv_bias_act(x, w, b, 1, 1, backend="triton")
    torch.testing.assert_close(out, conv_bias_act_reference(x, w, b, [1, 1], [1, 1]), rtol=0, atol=2e-5 * 4)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_fuse_fp32_wide_channels(cl: bool) -> None:
    """C and C_k past the 32-wide tiles: several channel programs and K steps, both weight forms."""
    fmt = CL if cl else torch.contiguous_format
    base, lowres, weights, bias = fuse_inputs((1, 40, 5, 4), [(36, 3, 2), (70, 1, 2)], fmt=fmt)
    weights = [weights[0], weights[1][:, :, None, None]]
    out = fuse_multi_res(base, lowres, weights, bias, backend="triton")
    ref = fuse_multi_res_reference(base, lowres, weights, bias)
    assert out.stride() == torch.empty_like(base).stride()
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * max(1.0, ref.abs().max().item()))


def test_torch_compile_aot_eager() -> None:
    """The same module through aot_eager: AOTAutograd's functionalization must keep the ops' launches."""
    module, ref_module = _Block("triton").eval(), _Block("torch-reference").eval()
    x, lowres = _block_inputs(CL)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(module, fullgraph=True, backend="aot_eager")(x, lowres)
        ref = ref_module(x, lowres)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_conv_launches_a_remembered_tuned_tile_directly(monkeypatch):
    """On a GPU the tile the autotuner chose is remembered per shape and launched without the
    Autotuner; here the remembered-tile path runs under the interpreter with a tile put in by hand."""
    from hrnet_fast.triton import conv as triton_conv

    x, w, b, r = conv_inputs((2, 8, 9, 7), (16, 8, 3, 3), residual_shape=(2, 16, 9, 7), seed=3)
    monkeypatch.setattr(triton_conv, "autotuning", lambda: True)
    monkeypatch.setattr(triton_conv, "_BEST", {})
    monkeypatch.setattr(triton_conv, "_tuner", lambda *a: pytest.fail("the Autotuner ran although a tuned tile was remembered"))
    expect = conv_bias_act_reference(x, w, b, [1, 1], [1, 1], r, True)
    args = (2 * 9 * 7, 16, 8, 9, 7, 9, 7, 1, 1, 1, 1)
    flags = dict(KH=3, KW=3, HAS_BIAS=True, HAS_RESIDUAL=True, RELU=True, DOT_PRECISION=triton_conv.dot_precision(x.dtype),
                 INDEX_64=False)
    tile = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "NUM_STAGES": 1, "num_warps": 1, "num_stages": 1}
    triton_conv._BEST[(x.dtype, x.device, args, tuple(flags.items()))] = tile
    out = conv_bias_act(x, w, b, 1, 1, r, True, backend="triton")
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_tracing_is_told_apart_from_running():
    """The autotuner runs only for real launches: not under fake tensors, make_fx (opcheck, AOT) or Dynamo."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from hrnet_fast.triton import _common as common

    x = torch.randn(2, 3)
    assert not common.tracing(x)
    with FakeTensorMode() as mode:
        assert common.tracing(mode.from_tensor(x))
    seen = []
    make_fx(lambda t: seen.append(common.tracing(t)) or t + 1)(x)
    assert seen == [True]
    torch.compile(lambda t: seen.append(common.tracing(t)) or t + 1, backend="eager", fullgraph=False)(x)
    assert seen[-1] is True


# ---- nothing to import first: the backend table defines the Triton ops on first use -------------


def _run_fresh(script: str, *args: str) -> None:
    """`script` in a new interpreter (TRITON_INTERPRET=1, so on CPU tensors) that has imported nothing yet."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_fused_conv_built_directly_in_a_fresh_interpreter():
    _run_fresh(
        """
        import sys
        import torch
        from hrnet_fast.fused.conv import FusedConv
        from hrnet_fast.ops import conv_bias_act_reference

        assert not any(m.startswith("hrnet_fast.triton.") for m in sys.modules)
        g = torch.Generator().manual_seed(0)
        w, b, x = torch.randn(6, 4, 3, 3, generator=g) / 6, torch.randn(6, generator=g), torch.randn(2, 4, 7, 5, generator=g)
        conv = FusedConv(w, b, stride=(2, 2), padding=(1, 1), relu=True, backend="triton")
        conv.pack()
        with torch.no_grad():
            out = conv(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, conv_bias_act_reference(x, w, b, [2, 2], [1, 1]), rtol=1e-5, atol=1e-5)
        """
    )


def test_compiled_first_call_defines_the_triton_ops():
    """torch.compile(fullgraph=True) of the functional API as the first Triton use: the ops are
    defined while Dynamo traces, without a graph break."""
    _run_fresh(
        """
        import torch
        from hrnet_fast.ops import conv_bias_act, conv_bias_act_reference

        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(1, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g) / 5, torch.randn(4, generator=g)
        fn = torch.compile(lambda x: conv_bias_act(x, w, b, 1, 1, backend="triton") * 2, fullgraph=True, backend="eager")
        torch.testing.assert_close(fn(x), conv_bias_act_reference(x, w, b, [1, 1], [1, 1]) * 2, rtol=1e-5, atol=1e-5)
        """
    )


def test_triton_model_unpickled_in_a_fresh_interpreter(tmp_path):
    """An optimize()d triton model pickled here runs in a process that never asked for the triton
    backend: unpickling its fused modules defines the ops."""
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = hrnet_fast.optimize(model, backend="triton")
        expected = fused(x)
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps((fused, x, expected)))
    _run_fresh(
        """
        import pickle, sys
        import torch

        fused, x, expected = pickle.loads(open(sys.argv[1], "rb").read())
        with torch.no_grad():
            torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-6)
        """,
        str(path),
    )


def test_host_shortcuts_match_torch():
    """The conv op's host-side shortcuts give what the slow ways give: the output's memory format
    (remembered per shape and strides) and whether element offsets fit 32 bits (numel for dense tensors)."""
    from torch._prims_common import suggest_memory_format

    from hrnet_fast.triton._common import memory_format
    from hrnet_fast.triton.conv import _offsets_fit_int32, _span

    base = torch.randn(2, 3, 4, 5)
    cases = [
        base, base.contiguous(memory_format=CL), base[:, :1], base[:, :, :1, :1],  # ambiguous formats too
        base.contiguous(memory_format=CL)[:, :, :1, :1], base[:, :, ::2], base.permute(0, 2, 3, 1)[..., :2],
        torch.randn(1, 8, 1, 1), torch.randn(3, 1, 1, 4).expand(3, 6, 1, 4),
    ]
    for t in cases:
        for _ in range(2):  # computed, then remembered
            assert memory_format(t, traced=False) == suggest_memory_format(t), (t.shape, t.stride())
        assert _offsets_fit_int32([t], traced=False) == (_span(t) < 2**31)
    huge = torch.empty_strided((2, 2), (2**31, 1), device="meta")  # sparse: 4 elements, offsets past 2**31
    assert not _offsets_fit_int32([huge], traced=True) and not _offsets_fit_int32([huge], traced=False)


def test_host_arithmetic_matches_triton():
    """cdiv and channel_block's power of two, done in plain Python, equal triton.cdiv / next_power_of_2."""
    import triton

    from hrnet_fast.triton._common import MIN_BLOCK, cdiv, channel_block

    for a in range(0, 300):
        for b in (1, 16, 32, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for c in range(1, 1100):
        for cap in (32, 64, 128):
            assert channel_block(c, cap) == max(MIN_BLOCK, min(cap, triton.next_power_of_2(c)))


def test_host_arithmetic_takes_symbolic_sizes():
    """Traced with symbolic sizes (opcheck's dynamic-shape pass, torch.compile(dynamic=True)) the sizes
    are SymInts: the remembered interpolation scales, cdiv and channel_block still give the plain ints'
    answers (GPU run 5: the scales' cache could not hash a SymInt)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hrnet_fast.triton._common import cdiv, channel_block, linear_scale, nearest_scale

    seen = {}

    def trace(x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        (_, c, h, w), (_, _, hi, wi) = x.shape, low.shape
        assert isinstance(h, torch.SymInt)
        seen["symbolic"] = (nearest_scale(hi, h), nearest_scale(wi, w), linear_scale(hi, h, False),
                            linear_scale(wi, w, True), cdiv(h * w, 16), channel_block(c, 64))
        return x + 1

    make_fx(trace, tracing_mode="symbolic")(torch.randn(2, 24, 12, 10), torch.randn(2, 8, 5, 3))
    want = (nearest_scale(5, 12), nearest_scale(3, 10), linear_scale(5, 12, False), linear_scale(3, 10, True),
            cdiv(120, 16), channel_block(24, 64))
    assert tuple(float(v) if isinstance(v, torch.SymFloat) else int(v) if isinstance(v, torch.SymInt) else v
                 for v in seen["symbolic"]) == want


@pytest.mark.parametrize("op", ["conv_bias_act", "fuse_multi_res"])
def test_unobserved_calls_run_the_plain_function(monkeypatch, op):
    """A plain run (no gradient) calls the Triton op's Python function directly; with gradients, under a
    dispatch mode (what counts ops) or the profiler, the call goes through torch.ops, where each of them
    sees it. Same answers either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _backend.define_triton_ops()
    direct = []
    plain = _backend._TRITON_FNS[op]
    monkeypatch.setitem(_backend._TRITON_FNS, op, lambda *a: direct.append(1) or plain(*a))
    if op == "conv_bias_act":
        args = conv_inputs((1, 4, 7, 6), (5, 4, 3, 3), residual_shape=(1, 5, 7, 6))
        run = lambda *a: conv_bias_act(a[0], a[1], a[2], 1, 1, a[3], True, backend="triton")  # noqa: E731
        ref = conv_bias_act_reference(*args[:3], [1, 1], [1, 1], args[3], True)
    else:
        args = fuse_inputs((1, 5, 12, 10), [(4, 6, 5), (8, 3, 3)])
        run = lambda *a: fuse_multi_res(*a, backend="triton")  # noqa: E731
        ref = fuse_multi_res_reference(*args)

    class Ops(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        outs = [run(*args)]
        assert len(direct) == 1
        with Ops():
            outs.append(run(*args))
        assert f"hrnet_fast.{op}_triton.default" in Ops.names
        with torch.profiler.profile():
            outs.append(run(*args))
    leaf = args[0].clone().requires_grad_()
    outs.append(run(leaf, *args[1:]))
    assert outs[-1].grad_fn is not None
    assert len(direct) == 1, "only the plain no-grad run may skip the op"
    for out in outs:
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


def test_conv_plans_are_made_once_per_signature(monkeypatch):
    """The conv's shape, layout, offset width and flags are worked out once per call signature: a
    second call with new data reuses them, another layout or geometry gets its own, answers stay right."""
    from hrnet_fast.triton import conv as triton_conv

    made = []
    make = triton_conv._make_plan
    monkeypatch.setattr(triton_conv, "_PLANS", {})
    monkeypatch.setattr(triton_conv, "_make_plan", lambda *a, **k: made.append(1) or make(*a, **k))
    for seed, cl, stride in ((0, True, 1), (1, True, 1), (2, False, 1), (3, True, 2), (4, True, 1)):
        x, w, b, r = conv_inputs((1, 8, 9, 7), (16, 8, 3, 3), seed=seed)
        x = x.contiguous(memory_format=CL if cl else torch.contiguous_format)
        with torch.no_grad():
            out = conv_bias_act(x, w, b, stride, 1, None, True, backend="triton")
        torch.testing.assert_close(out, conv_bias_act_reference(x, w, b, [stride] * 2, [1, 1], None, True),
                                   rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert len(made) == 3, "one plan per signature: channels_last, NCHW, stride 2"


def test_conv_direct_launch_hands_the_launcher_every_parameter_in_order(monkeypatch):
    """HRNET_FAST_TRITON_DIRECT_LAUNCH=1: a plan's first call goes through Triton and keeps the compiled
    launcher; later calls hand it their own tensors and everything else Triton was given, every
    parameter in the kernel's order, constexprs included; a pointer aligned otherwise gets a launcher
    of its own. Triton's kernel is a stand-in here (launching needs a GPU); the GPU tests run the real one."""
    from hrnet_fast.triton import conv as triton_conv

    names = triton_conv._conv_bias_act_kernel.arg_names
    through_triton, direct = [], []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *a: direct.append((grid, a))

    class Kernel:
        arg_names = names

        def __getitem__(self, grid):
            return lambda *a, **k: through_triton.append((grid, a, k)) or Compiled()

    tile = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "NUM_STAGES": 1, "num_warps": 1, "num_stages": 1}

    class Tuned(dict):
        def get(self, key, default=None):
            return tile

    monkeypatch.setattr(triton_conv, "_conv_bias_act_kernel", Kernel())
    monkeypatch.setattr(triton_conv, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(triton_conv, "autotuning", lambda: True)
    monkeypatch.setattr(triton_conv, "_BEST", Tuned())
    monkeypatch.setattr(triton_conv, "_PLANS", {})
    x, w, b, r = conv_inputs((2, 8, 9, 7), (16, 8, 3, 3), residual_shape=(2, 16, 9, 7), seed=3)
    with torch.no_grad():
        for _ in range(3):
            conv_bias_act(x, w, b, 1, 1, r, True, backend="triton")
    assert len(through_triton) == 1 and len(direct) == 2
    grid, args, kwargs = through_triton[0]
    for launch_grid, values in direct:
        assert launch_grid == (*grid, 1) and len(values) == len(names)
        got = dict(zip(names, values))
        for name, value in [*zip(names, args), *kwargs.items()]:
            if name in got and not isinstance(value, torch.Tensor):
                assert got[name] == value, name
        assert got["x_ptr"].data_ptr() == x.data_ptr() and got["res_ptr"].data_ptr() == r.data_ptr()
    assert direct[0][1][names.index("out_ptr")] is not direct[1][1][names.index("out_ptr")]
    unaligned = torch.empty(x.numel() + 1)[1:].view(x.shape).copy_(x)  # 4 bytes past a 16-byte boundary
    with torch.no_grad():
        conv_bias_act(unaligned, w, b, 1, 1, r, True, backend="triton")
    assert len(through_triton) == 2 and len(direct) == 2


def test_fusion_plans_are_made_once_per_signature(monkeypatch):
    """The fusion's launch arguments but its tensors are built once per call signature: new data reuses
    them (the call's own tensors put in), another layout, size or mode gets its own; answers stay right."""
    from hrnet_fast.triton import fusion

    made = []
    make = fusion._make_plan
    monkeypatch.setattr(fusion, "_PLANS", {})
    monkeypatch.setattr(fusion, "_make_plan", lambda *a, **k: made.append(1) or make(*a, **k))
    cases = [((1, 5, 12, 10), "nearest", True), ((1, 5, 12, 10), "nearest", True), ((1, 5, 12, 10), "nearest", False),
             ((1, 5, 12, 10), "bilinear", True), ((2, 5, 12, 10), "nearest", True)]
    for seed, (shape, mode, cl) in enumerate(cases):
        base, low, ws, b = fuse_inputs(shape, [(4, 6, 5), (8, 3, 3)], seed=seed)
        fmt = CL if cl else torch.contiguous_format
        base, low = base.contiguous(memory_format=fmt), [t.contiguous(memory_format=fmt) for t in low]
        with torch.no_grad():
            out = fuse_multi_res(base, low, ws, b, mode=mode, backend="triton")
        ref = fuse_multi_res_reference(base, low, ws, b, mode=mode)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(made) == 4, "one plan per signature: the first two calls share one"
    # the cache keeps arguments, never a call's tensors (they would stay alive with it)
    assert not any(isinstance(a, torch.Tensor) for plan in fusion._PLANS.values() for a in plan.args)
