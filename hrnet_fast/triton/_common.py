"""Helpers shared by the Triton ops: interpreter detection, tile sizes, PyTorch's nearest-index scale."""
from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.library import triton_op

# tl.dot needs every tile dimension >= 16 on GPUs; the interpreter accepts the same sizes.
MIN_BLOCK = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints. triton.cdiv and triton.next_power_of_2 are jit functions: called from
    Python each costs microseconds of argument unwrapping, a launch's host time several times over."""
    return -(-a // b)


def channel_block(channels: int, cap: int) -> int:
    """A power-of-two tile over `channels`, at least MIN_BLOCK and at most `cap`."""
    return max(MIN_BLOCK, min(cap, 1 << (max(1, channels) - 1).bit_length()))  # the next power of two


def dot_precision(dtype: torch.dtype) -> str:
    """How fp32 products are done: the DOT_PRECISION the kernels pass to `dot`. While
    torch.backends.cudnn.allow_tf32 is set (torch's default) eager's cuDNN convolutions run in TF32, and
    so do the Triton ops: "tf32_rna", one TF32 product per product with both inputs rounded to TF32 to
    nearest first, as cuDNN's conversion (cvt.rna) does. Triton's own "tf32" truncates the inputs
    instead, whose error is biased: the whole W32 model came out an order of magnitude further from
    float64 than eager with cuDNN's TF32 (the first GPU run in benchmarks/GPU-NOTES.md), 11-15x as
    far in a float64 simulation of the two roundings (benchmarks/sim_tf32_rounding.py); "tf32x3"
    (three TF32 products) matched, at three times the tensor-core work. IEEE fp32 otherwise.
    (16-bit inputs multiply exactly whatever the setting; "tf32" is Triton's default for them.)"""
    if dtype != torch.float32:
        return "tf32"
    return "tf32_rna" if torch.backends.cudnn.allow_tf32 and not interpreting() else "ieee"


@triton.jit
def tf32_round(x):
    """fp32 `x` rounded to TF32 (10 mantissa bits) to nearest, ties away from zero (PTX cvt.rna.tf32.f32):
    add half of the 13 dropped bits' weight to the magnitude and clear them. The carry can only reach
    the exponent, so a value rounds up to the next binade, and past the largest TF32 value to Inf, as
    cvt.rna does; Inf stays Inf. NaN is returned as it is (a carry could turn a NaN with a small payload
    into Inf)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b at DOT_PRECISION (dot_precision()): Triton's input_precision, or "tf32_rna"."""
    if DOT_PRECISION == "tf32_rna":  # a compile-time branch: one dot per variant
        acc = tl.dot(tf32_round(a), tf32_round(b), acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


def tracing(t: torch.Tensor) -> bool:
    """True while the op is being traced rather than run: Dynamo, make_fx (opcheck, AOT autograd)
    or fake tensors. Launch choices made by timing real runs (the autotuner) must not happen then."""
    return torch.compiler.is_compiling() or is_fake(t) or get_proxy_mode() is not None


def remembered(cache: dict, key: Any, make: Callable[[], Any]) -> Any:
    """cache[key], made by make() when missing. Bounded: a long-running process may meet many shapes,
    so the cache starts again empty at 4096 entries. Hot callers try cache.get(key) first, so that a
    hit builds no closure for `make`."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= 4096:
            cache.clear()
        value = cache[key] = make()
    return value


# suggest_memory_format of real tensors by (shape, strides): torch's Python version of the rule
# (symbolic-shape safe) took ~5 us a call, an eighth of an op's host time before the launch.
_FORMATS: dict[tuple, torch.memory_format] = {}


def memory_format(t: torch.Tensor, traced: bool) -> torch.memory_format:
    """torch._prims_common.suggest_memory_format(t), remembered per shape and strides when run for real."""
    if traced:
        return suggest_memory_format(t)
    key = (t.shape, t.stride())
    return _FORMATS.get(key) or remembered(_FORMATS, key, lambda: suggest_memory_format(t))


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's GPU current for the launch (Triton launches on the current device); a no-op on CPU
    and where it is current already (the usual case, where torch.cuda.device's switch in and out
    would cost more than the check)."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def _remembered_for_plain_ints(fn: Callable[..., float]) -> Callable[..., float]:
    """`fn` remembered per argument tuple when every size is a plain int. Traced with symbolic sizes
    (opcheck, torch.compile with dynamic shapes) they are SymInts, which cannot be hashed: computed
    each time then (GPU run 5: opcheck of the Triton fusion failed so)."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def scale(*args: Any) -> float:
        return cached(*args) if all(type(a) in (int, bool) for a in args) else fn(*args)

    return scale


@_remembered_for_plain_ints
def nearest_scale(in_size: int, out_size: int) -> float:
    """float32(in_size) / float32(out_size) rounded to float32, as aten's nearest upsampling computes it.

    Sizes below 2**24 are exact in float32 and a double quotient rounded once to float32 equals the
    float32 quotient, so this is computed on the host (a GPU's fp32 `/` may be approximate).
    """
    return struct.unpack("f", struct.pack("f", in_size / out_size))[0]


@_remembered_for_plain_ints
def linear_scale(in_size: int, out_size: int, align_corners: bool) -> float:
    """aten's scale for F.interpolate(size=..., mode="bilinear") (area_pixel_compute_scale), float32:
    (in - 1) / (out - 1) with align_corners (0 for a 1-pixel output), else in / out."""
    if align_corners:
        ratio = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    else:
        ratio = in_size / out_size
    return struct.unpack("f", struct.pack("f", ratio))[0]


def define_op(qualname: str, fake: Callable[..., torch.Tensor]) -> Callable[[Callable[..., torch.Tensor]], Any]:
    """Decorator: `fn` as a torch.library.triton_op, or an opaque custom_op under TRITON_INTERPRET=1.

    On a GPU torch.compile traces through a triton_op and sees each wrap_triton launch as a graph
    node. Under the interpreter wrap_triton hands back the interpreted kernel itself, which tracing
    would either run on fake tensors or drop; an opaque custom op with `fake` as its meta function
    keeps the launch inside the op instead. Both take the schema from `fn`'s annotations.
    """

    def wrap(fn: Callable[..., torch.Tensor]) -> Any:
        if interpreting():
            op = torch.library.custom_op(qualname, mutates_args=())(fn)
            op.register_fake(fake)
        else:
            op = triton_op(qualname, mutates_args=())(fn)
        _PLAIN[op] = fn
        return op

    return wrap


_PLAIN: dict[Any, Callable[..., torch.Tensor]] = {}


def plain_function(op: Any) -> Callable[..., torch.Tensor]:
    """The Python function an op of define_op runs, for calls that need none of the op's machinery
    (hrnet_fast.ops._backend calls it directly when nothing observes the call)."""
    return _PLAIN[op]
