"""Triton kernels of both ops under TRITON_INTERPRET=1, against the plain-PyTorch references.

fp32 is compared tightly; fp16 flash-attention style: the kernel's error vs an fp32 reference must be
within 2x the fp16 reference's own error plus a small atol. Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import math

import pytest
import torch

import hrnet_fast
from hrnet_fast.ops import conv_bias_act_reference, fuse_multi_res_reference

pytestmark = pytest.mark.triton

CL = torch.channels_last


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close_fp32(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * scale)


def _close_lowp(out: torch.Tensor, ref_lowp: torch.Tensor, ref32: torch.Tensor, atol: float = 1e-3) -> None:
    """Kernel error <= 2x the low-precision reference's own error (both vs fp32) + atol."""
    err = (out.float() - ref32).abs().max().item()
    ref_err = (ref_lowp.float() - ref32).abs().max().item()
    assert err <= 2 * ref_err + atol, f"kernel error {err} vs reference's own error {ref_err}"


# ---- conv_bias_act ---------------------------------------------------------------------------

# (N, C_in, H, W, C_out, k, stride, padding): 3x3/1x1, stride 1/2, odd sizes, padding 0/1, 1 pixel
CONV_CASES = [
    (1, 5, 7, 9, 6, 3, 1, 1),
    (2, 3, 9, 7, 4, 3, 2, 1),
    (1, 4, 5, 5, 3, 3, 2, 0),
    (2, 17, 3, 4, 18, 1, 1, 0),
    (1, 3, 1, 1, 5, 3, 1, 1),
    (1, 6, 6, 5, 7, 1, 2, 0),
]


def _conv_inputs(case, *, cl: bool, bias: bool, residual: bool, dtype=torch.float32, seed: int = 0):
    n, ci, h, w, co, k, s, p = case
    g = _gen(seed)
    x = torch.randn(n, ci, h, w, generator=g)
    x = x.contiguous(memory_format=CL) if cl else x
    wt = torch.randn(co, ci, k, k, generator=g) / math.sqrt(ci * k * k)
    b = torch.randn(co, generator=g) if bias else None
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    # the residual in the other layout than x: any strides must work
    r = torch.randn(n, co, ho, wo, generator=g) if residual else None
    r = r.contiguous(memory_format=torch.contiguous_format if cl else CL) if residual else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(wt), cast(b), (s, s), (p, p), cast(r)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(CONV_CASES)))
def test_conv_fp32(i: int, cl: bool) -> None:
    # cycle bias/residual/relu over the cases so each combination appears without a full product
    bias, residual, relu = bool(i & 1), not i & 2, i % 3 != 2
    x, w, b, s, p, r = _conv_inputs(CONV_CASES[i], cl=cl, bias=bias, residual=residual)
    out = hrnet_fast.conv_bias_act(x, w, b, s, p, r, relu, backend="triton")
    ref = conv_bias_act_reference(x, w, b, s, p, r, relu)
    assert out.shape == ref.shape
    assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    _close_fp32(out, ref)


@pytest.mark.parametrize("i", [0, 1, 3])
def test_conv_fp16(i: int) -> None:
    x, w, b, s, p, r = _conv_inputs(CONV_CASES[i], cl=True, bias=True, residual=True, dtype=torch.float16)
    out = hrnet_fast.conv_bias_act(x, w, b, s, p, r, backend="triton")
    assert out.dtype == torch.float16
    f = lambda t: t.float()  # noqa: E731
    ref32 = conv_bias_act_reference(f(x), f(w), f(b), s, p, f(r))
    _close_lowp(out, conv_bias_act_reference(x, w, b, s, p, r), ref32)


def test_conv_strided_views() -> None:
    """Non-dense x, transposed weight storage, strided bias: strides are kernel arguments."""
    g = _gen(1)
    x = torch.randn(1, 8, 6, 10, generator=g)[:, ::2, :, ::2]
    w = torch.randn(4, 3, 3, 3, generator=g).transpose(0, 1)  # [3, 4, 3, 3] with C_in-major storage
    b = torch.randn(3, 2, generator=g)[:, 1]
    out = hrnet_fast.conv_bias_act(x, w, b, 1, 1, backend="triton")
    _close_fp32(out, conv_bias_act_reference(x, w, b, (1, 1), (1, 1)))


def test_conv_grad() -> None:
    x, w, b, s, p, r = _conv_inputs(CONV_CASES[1], cl=False, bias=True, residual=True)
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    out = hrnet_fast.conv_bias_act(x, w, b, s, p, r, backend="triton")
    gy = torch.randn(out.shape, generator=_gen(2))
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(conv_bias_act_reference(x, w, b, s, p, r), leaves, gy)
    for a, e in zip(got, want):
        _close_fp32(a, e)


# ---- fuse_multi_res --------------------------------------------------------------------------

# (base [N, C, H, W], lowres [(C_k, h, w)]): divisible ratios, non-divisible ones, 1 pixel, 0..3 inputs
FUSE_CASES = [
    ((1, 6, 8, 6), [(5, 4, 3)]),
    ((2, 5, 7, 5), [(4, 3, 2), (3, 2, 1)]),
    ((1, 18, 9, 7), [(17, 5, 4), (4, 2, 3), (3, 1, 1)]),
    ((2, 4, 1, 1), [(3, 1, 1)]),
    ((1, 3, 5, 4), []),
]


def _fuse_inputs(case, *, cl: bool, bias: bool, dtype=torch.float32, seed: int = 0):
    (n, c, h, w), lows = case
    g = _gen(seed)
    fmt = CL if cl else torch.contiguous_format
    base = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt).to(dtype)
    lowres = [torch.randn(n, ck, hk, wk, generator=g).contiguous(memory_format=fmt).to(dtype) for ck, hk, wk in lows]
    # alternate the [C, Ck] and [C, Ck, 1, 1] weight forms
    weights = [
        (torch.randn(c, ck, generator=g) / math.sqrt(ck)).reshape((c, ck) if k % 2 else (c, ck, 1, 1)).to(dtype)
        for k, (ck, _, _) in enumerate(lows)
    ]
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    return base, lowres, weights, b


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(FUSE_CASES)))
def test_fuse_fp32(i: int, cl: bool) -> None:
    bias, relu = bool(i & 1) or cl, not i & 2
    base, lowres, weights, b = _fuse_inputs(FUSE_CASES[i], cl=cl, bias=bias)
    out = hrnet_fast.fuse_multi_res(base, lowres, weights, b, relu, backend="triton")
    assert out.stride() == torch.empty_like(base).stride()
    _close_fp32(out, fuse_multi_res_reference(base, lowres, weights, b, relu))


@pytest.mark.parametrize("i", [1, 2])
def test_fuse_fp16(i: int) -> None:
    base, lowres, weights, b = _fuse_inputs(FUSE_CASES[i], cl=True, bias=True, dtype=torch.float16)
    out = hrnet_fast.fuse_multi_res(base, lowres, weights, b, backend="triton")
    assert out.dtype == torch.float16
    f = lambda ts: [t.float() for t in ts]  # noqa: E731
    ref32 = fuse_multi_res_reference(base.float(), f(lowres), f(weights), b.float())
    _close_lowp(out, fuse_multi_res_reference(base, lowres, weights, b), ref32)


@pytest.mark.parametrize("i", [0, 2, 4])
def test_fuse_one_launch(i: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """0..3 low-res inputs: exactly one kernel launch per call."""
    from hrnet_fast.triton import fuse_multi_res as mod

    launches: list[object] = []
    real = mod.wrap_triton

    def counting(kernel):
        launches.append(kernel)
        return real(kernel)

    monkeypatch.setattr(mod, "wrap_triton", counting)
    base, lowres, weights, b = _fuse_inputs(FUSE_CASES[i], cl=False, bias=True)
    out = hrnet_fast.fuse_multi_res(base, lowres, weights, b, backend="triton")
    assert launches == [mod._fuse_multi_res_kernel]
    _close_fp32(out, fuse_multi_res_reference(base, lowres, weights, b))


def test_fuse_grad() -> None:
    base, lowres, weights, b = _fuse_inputs(FUSE_CASES[1], cl=False, bias=True)
    leaves = [t.requires_grad_() for t in (base, *lowres, *weights, b)]
    out = hrnet_fast.fuse_multi_res(base, lowres, weights, b, backend="triton")
    gy = torch.randn(out.shape, generator=_gen(3))
    got = torch.autograd.grad(out, leaves, gy)
    want = torch.autograd.grad(fuse_multi_res_reference(base, lowres, weights, b), leaves, gy)
    for a, e in zip(got, want):
        _close_fp32(a, e)


# ---- torch.compile and bad inputs ------------------------------------------------------------


class _TinyFusion(torch.nn.Module):
    """conv_bias_act on the high-res branch, then fuse_multi_res with a low-res branch."""

    def __init__(self) -> None:
        super().__init__()
        g = _gen(4)
        self.w = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=g) / 5)
        self.b = torch.nn.Parameter(torch.randn(4, generator=g))
        self.w_low = torch.nn.Parameter(torch.randn(4, 5, generator=g) / 3)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        y = hrnet_fast.conv_bias_act(x, self.w, self.b, 1, 1, residual=None, backend="triton")
        return hrnet_fast.fuse_multi_res(y, [low], [self.w_low], None, backend="triton")


@pytest.mark.parametrize("compile_backend", ["inductor", "aot_eager"])
def test_compile_fullgraph(compile_backend: str) -> None:
    """Under the interpreter the ops are opaque custom ops; inductor on CPU compiles around them."""
    torch._dynamo.reset()
    m = _TinyFusion()
    x, low = torch.randn(1, 3, 6, 5, generator=_gen(5)), torch.randn(1, 5, 3, 3, generator=_gen(6))
    with torch.no_grad():
        ref = fuse_multi_res_reference(conv_bias_act_reference(x, m.w, m.b, (1, 1), (1, 1)), [low], [m.w_low])
        out = torch.compile(m, fullgraph=True, backend=compile_backend)(x, low)
    _close_fp32(out, ref)


def test_bad_inputs_raise() -> None:
    base, lowres, weights, b = _fuse_inputs(FUSE_CASES[1], cl=False, bias=True)
    with pytest.raises(ValueError, match="lowres inputs but .* weights"):
        hrnet_fast.fuse_multi_res(base, lowres, weights[:1], b, backend="triton")
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape"):
        hrnet_fast.fuse_multi_res(base, lowres, [weights[1], weights[0]], b, backend="triton")
    with pytest.raises(RuntimeError, match="dtype"):
        hrnet_fast.fuse_multi_res(base, [lowres[0].half()], [weights[0]], b, backend="triton")
    # the op itself checks the list lengths too (it is reachable without the public API)
    from hrnet_fast.triton import fuse_multi_res as _  # noqa: F401

    with pytest.raises(ValueError, match="one weight per input"):
        torch.ops.hrnet_fast.fuse_multi_res_triton(base, lowres, weights[:1], b, True)
    x, w, *_ = _conv_inputs(CONV_CASES[0], cl=False, bias=False, residual=False)
    with pytest.raises(ValueError, match="weight must have shape"):
        hrnet_fast.conv_bias_act(x, w[:, :2], backend="triton")
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        hrnet_fast.conv_bias_act(x, w, None, 1, 1, residual=torch.zeros(1, 6, 3, 3), backend="triton")
