"""count_ops(fn, *args): kernel-launching ops of one call, and the bytes they read and write.

A TorchDispatchMode sees every op that reaches a backend (aten and hrnet_fast alike), after
autograd and the Python wrappers, which is where a GPU would launch a kernel. Views, allocations
and metadata queries launch nothing and are left out. Bytes are an estimate of memory traffic:
the size of every distinct tensor argument (read) plus every output (written), per op.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that only allocate or touch metadata: no kernel runs for them.
_NO_KERNEL = frozenset(
    {
        "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
        "aten::detach", "aten::alias", "aten::lift_fresh", "aten::size", "aten::stride", "aten::sym_size",
        "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::is_contiguous",
        "aten::_local_scalar_dense", "aten::resize_",
    }
)


def _nbytes(t: torch.Tensor) -> int:
    # numel * itemsize, not the storage: oneDNN (Mkldnn) tensors have none, and a view reads only its elements
    return t.numel() * t.element_size()


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching ops (total and per op name) and the bytes their tensors hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in _NO_KERNEL:
            return out
        self.ops += 1
        self.by_op[name] = self.by_op.get(name, 0) + 1
        seen: set[int] = set()
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self.bytes += _nbytes(t)
        return out


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run fn(*args, **kwargs) once under no_grad: {"ops": int, "bytes": int, "by_op": {name: count}}."""
    counter = OpCounter()
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return {"ops": counter.ops, "bytes": counter.bytes, "by_op": dict(sorted(counter.by_op.items()))}


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Native stderr (fd 2) to /dev/null for the block: the profiler's C++ library (Kineto) prints
    stage, USDT and "gpuGetDeviceCount failed" lines there on every start, which would land in the
    middle of a benchmark's table. Python exceptions still surface after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Highest CPU-allocator total during one call of fn, minus the total just before it.

    From the profiler's allocation events (profile_memory=True), so allocations made inside C++ ops
    through torch's allocator count too; oneDNN's own scratchpad does not. fn's result is included.
    """
    from torch._C._profiler import _EventType

    with _native_stderr_silenced(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = fn()
    del out
    events = []

    def walk(node: Any) -> None:
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    # the total before the first allocation of the call: its running total less its own size
    return max(total for _, _, total in events) - (events[0][2] - events[0][1])


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes a module keeps for inference: its parameters and buffers, every tensor its modules
    cache in their attributes (hrnet_fast's oneDNN-packed weights), each distinct tensor once, and for
    an optimize()d cpu model the free blocks (and replay slabs) of the caching allocator its forwards use (shared by all
    such models in the process; csrc/cpu/cpu_arena.cpp). What a served model costs in memory besides
    the activations of the forward running."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if not t.is_mkldnn else _nbytes(t)

    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b is not None]:
            add(t)
        for value in vars(m).values():  # caches held outside parameters and buffers
            if isinstance(value, torch.Tensor):
                add(value)
            elif isinstance(value, dict) and value is not m._modules:
                for v in value.values():
                    if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                        add(v)
    if getattr(module, "hrnet_fast_backend", None) == "cpu":
        total += torch.ops.hrnet_fast.cpu_arena_stats()[0]
    return total


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), None elsewhere."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
