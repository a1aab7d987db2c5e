"""Kernel-launching ops per forward and bytes they move: hrnet_fast.profile.count_ops when present, else ours.

Ours is a minimal TorchDispatchMode counter, kept only until hrnet_fast.profile lands: it counts
every aten/custom op that reaches a backend kernel, except views and allocations (no kernel runs),
and estimates traffic as the bytes of every tensor read or written by those ops.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that allocate or only touch metadata: no kernel is launched for them.
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::detach", "aten::alias",
    "aten::lift_fresh", "aten::_to_copy_meta", "aten::size", "aten::stride", "aten::sym_size",
}


def _nbytes(t: torch.Tensor) -> int:
    # oneDNN (MkldnnCPU) tensors have no storage to ask; numel * itemsize is what is read.
    return t.numel() * t.element_size()


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if getattr(func, "is_view", False) or name in _NO_KERNEL:
            return out
        self.ops += 1
        self.by_op[name] = self.by_op.get(name, 0) + 1
        seen: set[int] = set()
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self.bytes += _nbytes(t)
        return out


def count_ops_fallback(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run fn(*args) once under a dispatch counter: {"ops", "bytes", "by_op"}."""
    counter = _Counter()
    with torch.inference_mode(), counter:
        fn(*args)
    return {"ops": counter.ops, "bytes": counter.bytes, "by_op": dict(counter.by_op)}


def count_ops(fn: Callable[..., Any], *args: Any) -> tuple[int | None, int | None, str]:
    """(kernel-launching ops, estimated bytes, which counter) for one fn(*args)."""
    try:
        from hrnet_fast.profile import count_ops as project_count_ops
    except ImportError:
        res, source = count_ops_fallback(fn, *args), "hrnet_fast.bench.opcount"
    else:
        with torch.inference_mode():
            res, source = project_count_ops(fn, *args), "hrnet_fast.profile"
    ops = next((res[k] for k in ("ops", "kernel_ops", "launches", "num_ops", "ops_per_forward") if k in res), None)
    nbytes = next((res[k] for k in ("bytes", "est_bytes", "bytes_moved") if k in res), None)
    return ops, nbytes, source
