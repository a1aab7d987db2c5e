"""Argument checks shared by the ops' Python entry points: errors name the argument and what was expected."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_4d(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_same(ref_name: str, ref: torch.Tensor, others: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Every tensor in `others` must share `ref`'s device and dtype."""
    for name, t in others:
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all inputs must share a device")
        if t.dtype != ref.dtype:
            raise RuntimeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: all inputs must share a dtype")


def check_bias(bias: torch.Tensor | None, channels: int) -> None:
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {tuple(bias.shape)}")


def pair(name: str, v: int | Sequence[int]) -> list[int]:
    """An int or a pair of ints as a list of two non-negative ints."""
    vals = [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]
    if len(vals) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return vals


def same_device(op: str, named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """Raise when the tensors in `named` are not all on one device. The fake kernels call it: with one
    meta tensor among real ones the dispatcher runs the fake (Meta) kernel, never the C++ checks, and
    would hand back an empty tensor instead of an error."""
    tensors = [(n, t) for n, t in named if t is not None]
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}: all inputs must share a device")
