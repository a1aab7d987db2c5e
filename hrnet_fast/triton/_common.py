"""Helpers shared by the Triton ops: interpreter detection, tile sizes, PyTorch's nearest-index scale."""
from __future__ import annotations

import os
import struct

import torch
import triton

# tl.dot needs every tile dimension >= 16 on GPUs; the interpreter accepts the same sizes.
MIN_BLOCK = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def channel_block(channels: int, cap: int) -> int:
    """A power-of-two tile over `channels`, at least MIN_BLOCK and at most `cap`."""
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(max(1, channels))))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in IEEE fp32 (not TF32), so results match fp32 references; 16-bit inputs are exact."""
    return "ieee" if dtype == torch.float32 else "tf32"


def nearest_scale(in_size: int, out_size: int) -> float:
    """float32(in_size) / float32(out_size) rounded to float32, as aten's nearest upsampling computes it.

    Sizes below 2**24 are exact in float32 and a double quotient rounded once to float32 equals the
    float32 quotient, so this is computed on the host (a GPU's fp32 `/` may be approximate).
    """
    return struct.unpack("f", struct.pack("f", in_size / out_size))[0]
