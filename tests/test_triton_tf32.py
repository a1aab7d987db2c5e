"""fp32 products in TF32 as cuDNN does them ("tf32_rna", hrnet_fast/triton/_common.py): the rounding
against an independent float64 one, and both ops' products taking both operands rounded.

Run with TRITON_INTERPRET=1 set before triton is imported (CPU tensors); on a GPU the same kernels
run with the tensor cores (tests/test_cuda.py compares whole models with eager's cuDNN TF32).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from test_triton import conv_inputs, fuse_inputs

from hrnet_fast.ops import conv_bias_act, conv_bias_act_reference, fuse_multi_res, fuse_multi_res_reference
from hrnet_fast.ops._backend import triton_available

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not triton_available(torch.device("cpu")), reason="needs triton and TRITON_INTERPRET=1 set before pytest starts"
    ),
]

F32_MAX = torch.finfo(torch.float32).max


def rna_reference(v: float) -> float:
    """v rounded to TF32 (10 mantissa bits, fp32's exponent range) to nearest, ties away from zero,
    by arithmetic in float64: the grid is 2**-10 of v's binade, 2**-136 among subnormals."""
    if v == 0 or math.isnan(v) or math.isinf(v):
        return v
    _, e = math.frexp(v)  # |v| in [2**(e-1), 2**e)
    ulp = 2.0 ** (max(e - 1, -126) - 10)
    r = math.copysign(math.floor(abs(v) / ulp + 0.5) * ulp, v)
    return math.copysign(math.inf, v) if abs(r) > F32_MAX else r


def tf32_rna(t: torch.Tensor) -> torch.Tensor:
    """The rounding of fp32 tensors, elementwise, through rna_reference."""
    return torch.tensor([rna_reference(v) for v in t.flatten().tolist()], dtype=torch.float32).reshape(t.shape)


if os.environ.get("TRITON_INTERPRET") == "1":  # triton is imported only by the interpreted test process
    import triton
    import triton.language as tl

    from hrnet_fast.triton._common import tf32_round

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tf32_round(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def _round_with_the_kernel_helper(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
    return y


def test_tf32_round_matches_float64_rounding():
    one = 1.0
    special = [
        0.0, -0.0, one, -one,
        one + 2**-11,  # a tie: away from zero, to 1 + 2**-10
        -(one + 2**-11),
        one + 2**-11 - 2**-23,  # just below the tie: down to 1
        one + 3 * 2**-11,  # a tie between 1 + 2**-10 and 1 + 2**-9: away, to 1 + 2**-9
        2.0 - 2**-23,  # rounds up into the next binade: 2
        F32_MAX,  # past the largest TF32 value: Inf, as cvt.rna gives
        -F32_MAX,
        2.0**-149, 2.0**-137, 3 * 2.0**-137, 2.0**-126 - 2.0**-149,  # subnormals
        math.inf, -math.inf,
    ]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.tensor(special, dtype=torch.float32),
        torch.randn(500, generator=g) * torch.logspace(-30, 30, 500),
    ])
    got, want = _round_with_the_kernel_helper(x), tf32_rna(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (x[got != want], got[got != want], want[got != want])
    assert (got.view(torch.int32) & 0x1FFF == 0).all()  # TF32: the 13 low mantissa bits are zero


def test_tf32_round_keeps_nan():
    x = torch.tensor([math.nan, 1.0, -math.nan], dtype=torch.float32)
    y = _round_with_the_kernel_helper(x)
    assert torch.isnan(y[0]) and torch.isnan(y[2]) and y[1] == 1.0


def _rounding_differs(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return (a - b).abs().max().item() > 10 * tol


@pytest.mark.parametrize("residual", [False, True])
def test_conv_rounds_both_operands(monkeypatch, residual):
    from hrnet_fast.triton import conv as triton_conv

    monkeypatch.setattr(triton_conv, "dot_precision", lambda dtype: "tf32_rna")
    x, w, b, r = conv_inputs((2, 24, 7, 6), (20, 24, 3, 3), residual_shape=(2, 20, 7, 6) if residual else None, seed=5)
    out = conv_bias_act(x, w, b, 1, 1, r, True, backend="triton")
    # every product of TF32-rounded operands is exact in fp32: only the sums round
    want = conv_bias_act_reference(tf32_rna(x).double(), tf32_rna(w).double(), b.double(), [1, 1], [1, 1],
                                   None if r is None else r.double(), True).float()
    tol = 2e-6 * want.abs().max().item()
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
    # and the rounding is visible: the unrounded operands give another answer
    assert _rounding_differs(out, conv_bias_act_reference(x, w, b, [1, 1], [1, 1], r, True), tol)


def test_fusion_rounds_both_operands(monkeypatch):
    from hrnet_fast.triton import fusion as triton_fusion

    monkeypatch.setattr(triton_fusion, "dot_precision", lambda dtype: "tf32_rna")
    base, lowres, weights, bias = fuse_inputs((1, 20, 8, 6), [(24, 4, 3), (36, 2, 2)], seed=6)
    out = fuse_multi_res(base, lowres, weights, bias, backend="triton")  # nearest: the low-res pixels as they are
    want = fuse_multi_res_reference(base.double(), [tf32_rna(x).double() for x in lowres],
                                    [tf32_rna(w).double() for w in weights], bias.double()).float()
    tol = 2e-6 * want.abs().max().item()
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
    assert _rounding_differs(out, fuse_multi_res_reference(base, lowres, weights, bias), tol)
