"""CUDA-graph replay of an optimized model's forward: one graph per input shape, captured on first use.

At batch 1 a GPU forward of HRNet is bound by launches and host overhead (hundreds of kernel
launches, each a few microseconds of Python and dispatch), not by arithmetic. A captured CUDA graph
replays every kernel of the forward with one launch.

What it assumes, and what it does about it:
- Inputs are CUDA tensors on the model's device. Each distinct (shape, dtype, strides) of the inputs
  gets its own graph, captured the first time it is seen, after two warm-up calls on a side stream
  (so cuDNN plan searches, Triton compiles and allocations happen before the capture). At most
  MAX_GRAPHS are kept; the least recently used is dropped first. All graphs share one memory pool.
- The inputs are copied into the graph's static input buffers, and the outputs are returned as
  fresh copies of the graph's static outputs: a later call never overwrites what an earlier one
  returned (the copies cost one small kernel per output).
- Inference only: with grad enabled and an input that requires grad, the call raises (use the
  model without cuda_graph to differentiate). The weights are baked into the graph by address:
  load_state_dict / in-place edits of the weights take effect (same tensors), replacing a weight
  tensor object does not (call `reset()`).
- Calls are serialised by a lock: a graph's static buffers serve one call at a time.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

MAX_GRAPHS = 8
WARMUP_CALLS = 2


def capture(fn: Callable[[], Any], warmup_calls: int = WARMUP_CALLS, pool: Any = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture fn() in a CUDA graph: (graph, fn's output as captured). fn must read only static buffers.

    Warm-up calls run first on a side stream, as the CUDA-graph docs ask, so that nothing happens for
    the first time inside the capture (cuDNN plan searches, Triton compiles, allocator growth).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def keep_instance_forward(module: nn.Module) -> None:
    """Before a graph forward takes `module.forward`: keep a forward the instance has of its own (one
    optimize() gave it, fused/seg_head.py, or the caller's) as `_hrnet_fast_forward`, which it calls."""
    own = module.__dict__.get("forward")
    if own is not None and "_hrnet_fast_forward" not in module.__dict__:
        module._hrnet_fast_forward = own


def inner_forward(module: nn.Module) -> Callable[..., Any]:
    """The forward a graph forward records or captures: the instance's own, else its class's."""
    own = module.__dict__.get("_hrnet_fast_forward")
    return own if own is not None else type(module).forward.__get__(module)


def _key(args: tuple) -> tuple:
    return tuple(
        (tuple(a.shape), a.dtype, a.stride(), a.device) if isinstance(a, torch.Tensor) else ("const", repr(a))
        for a in args
    )


class _Graph:
    """One captured forward: static inputs, the graph, its static outputs."""

    def __init__(self, fn: Callable[..., Any], args: tuple, pool: Any) -> None:
        with torch.inference_mode(False):  # static buffers must accept copy_ in and out of inference mode
            self.static_in = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                                   if isinstance(a, torch.Tensor) else a for a in args)
        self._copy_in(args)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):  # the side stream and the capture on the inputs' GPU
            self.graph, self.static_out = capture(lambda: fn(*self.static_in), pool=pool)

    def _copy_in(self, args: tuple) -> None:
        for dst, src in zip(self.static_in, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)

    def __call__(self, args: tuple) -> Any:
        self._copy_in(args)
        self.graph.replay()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_out)


class CUDAGraphForward:
    """Replaces a module's forward with a graph-replaying one (the module, its hooks and state_dict stay)."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool: Any = None
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, module: nn.Module) -> nn.Module:
        """Give `module` a graph-replaying forward; returns it."""
        keep_instance_forward(module)
        module.forward = cls(module)  # an instance attribute: Module.__call__ finds it before the class's
        return module

    def __reduce__(self):
        # copies and pickles get no graphs (they hold device addresses): they capture their own
        return (CUDAGraphForward, (self._module,))

    def _forward(self, *args: Any) -> Any:
        return inner_forward(self._module)(*args)

    def reset(self) -> None:
        """Drop every captured graph; the next call of each shape captures again."""
        with self._lock:
            self._graphs.clear()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _check(self, args: tuple) -> None:
        tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        if not tensors:
            raise ValueError("cuda_graph=True needs at least one tensor input")
        for t in tensors:
            if t.device.type != "cuda":
                raise ValueError(f"this model replays CUDA graphs, so its inputs must be CUDA tensors, got one on {t.device}")
            if torch.is_grad_enabled() and t.requires_grad:
                raise RuntimeError(
                    "a CUDA-graphed model (optimize(..., cuda_graph=True)) runs inference only, but an input "
                    "requires grad: call it under torch.no_grad()/torch.inference_mode(), or optimize without "
                    "cuda_graph (backend='torch') to differentiate"
                )
        if any(not isinstance(a, torch.Tensor) for a in args):
            raise ValueError("cuda_graph=True takes tensor positional inputs only (a graph's inputs are static buffers)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise ValueError(f"cuda_graph=True takes positional tensor inputs only, got keyword arguments {sorted(kwargs)}")
        if torch.compiler.is_compiling():
            return self._forward(*args)
        self._check(args)
        key = _key(args)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                try:
                    graph = _Graph(self._forward, args, self._pool)
                except Exception as e:  # noqa: BLE001  (say which model and input could not be captured)
                    raise RuntimeError(
                        f"capturing a CUDA graph of this model for inputs {[tuple(a.shape) for a in args]} failed "
                        f"({type(e).__name__}: {e}); optimize without cuda_graph=True runs it ungraphed"
                    ) from e
                self._graphs[key] = graph
                while len(self._graphs) > MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            return graph(args)
