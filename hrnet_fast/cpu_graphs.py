"""CPU-graph replay of an optimized cpu model's forward: the ops it dispatches, recorded per input shape
and replayed from C++ (csrc/cpu/cpu_graph.cpp), without the Python between them.

An optimized W32 forward at batch 1 is ~290 op calls; the Python around each (the fused modules'
forward, turning Python arguments into the op's) cost 8-10 ms of a 64 ms forward on 2 threads, while
the other thread waited. A replay makes each call one boxed dispatch from C++ (README, "CPU graphs").

When a recording is replayed, and what keeps it right:
- Only a forward in inference mode (an optimized model's forward enters it under no_grad) with CPU
  tensor positional inputs, on one thread, no hooks on any submodule, no global module hooks.
  Anything else runs the Python forward, as does a shape whose recordings never agree.
- Each (shape, strides, dtype) of the inputs is recorded while the Python forward runs, and the
  recording is used only once two calls in a row recorded the same ops on the same weights wired the
  same way: a first call's one-off work (oneDNN packing weights for a new shape) or a tensor made per
  call outside the dispatcher's view (which a replay would freeze) shows as a difference. Recordings
  that return a value to Python (`.item()`, `bool(t)`) or draw random numbers are never replayed.
- Weights are read by reference, so in-place edits reach the replay; a graph is dropped and recorded
  again when a tensor of the model's state_dict was edited in place (load_state_dict: the cpu backend
  derives packed weights from it), when any module anywhere gets a parameter, buffer or submodule set
  (torch's global registration hooks), or when a fused conv's tensors are converted (`.to()`).
  A `.to()` of another submodule alone is not seen: call `reset()`.
- Hooks added to a submodule after its shape was recorded are not called by the replay (as with CUDA
  graphs): call `reset()`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_globals  # torch's global module hooks
from torch.utils._pytree import tree_flatten, tree_unflatten

from hrnet_fast.fused import staleness
from hrnet_fast.fused.conv import _MAX_PACKED_SHAPES
from hrnet_fast.graphs import inner_forward, keep_instance_forward

# Input shapes with a graph or a recording (the first recorded dropped first): as many as a fused conv
# keeps oneDNN-packed weights for, since a graph holds those of its shape.
MAX_GRAPHS = _MAX_PACKED_SHAPES
# Recordings of one shape tried before its forward stays in Python: two in a row must agree.
MAX_RECORDINGS = 3

_hooks_installed = False
_recording = threading.local()


def _install_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        _module_globals.register_module_buffer_registration_hook(staleness.tensors_replaced)
        _module_globals.register_module_parameter_registration_hook(staleness.tensors_replaced)
        _module_globals.register_module_module_registration_hook(staleness.tensors_replaced)
        _hooks_installed = True


def _mark(model: nn.Module) -> None:
    for m in model.modules():  # copies and pickles keep the mark with the module's __dict__
        m.__dict__[staleness.MARK] = True  # not through setattr: that would be a registration of its own


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def _submodule_with_hooks(module: nn.Module) -> str | None:
    for name, m in module.named_modules():
        if name and (m._forward_hooks or m._forward_pre_hooks):
            return name
    return None


class _Entry:
    """One input shape: the last recording (until two agree), the graph once they do, or why not."""

    __slots__ = ("graph", "ready", "tries", "refused", "outputs")

    def __init__(self) -> None:
        self.graph: Any = None
        self.ready = False
        self.tries = 0
        self.refused: str | None = None
        self.outputs: tuple | None = None  # (treespec, leaves with None where a graph output goes)


class CPUGraphForward:
    """Replaces a cpu model's forward with one that replays recorded graphs (module, hooks, state_dict stay)."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = staleness.generation[0]
        _install_hooks()

    @classmethod
    def attach(cls, module: nn.Module) -> nn.Module:
        """Give `module` a graph-replaying forward; returns it."""
        keep_instance_forward(module)
        _mark(module)
        module.forward = cls(module)  # an instance attribute: Module.__call__ finds it before the class's
        return module

    def __reduce__(self):
        # copies and pickles start without graphs (theirs would read the original's weights)
        return (CPUGraphForward, (self._module,))

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        return inner_forward(self._module)(*args, **kwargs)

    @property
    def __wrapped__(self) -> Any:  # inspect.signature(model.forward) shows the model's own
        return inner_forward(self._module)

    def reset(self) -> None:
        """Drop every recorded graph; the next calls of each shape record again."""
        with self._lock:
            self._graphs.clear()

    def status(self) -> dict[tuple, str]:
        """Per input key: "replaying (N ops)", "recording" or why its forward runs in Python."""
        with self._lock:
            return {
                k: (f"replaying ({e.graph.stats()[0]} ops)" if e.ready else e.refused or "recording")
                for k, e in self._graphs.items()
            }

    @property
    def num_graphs(self) -> int:
        return sum(e.ready for e in self._graphs.values())

    def _key(self, args: tuple) -> tuple | None:
        """The inputs' (shape, strides, dtype) and constants, or None when this call is not graphed."""
        if len(args) == 1 and type(args[0]) is torch.Tensor:  # the common call, without tree_flatten
            t = args[0]
            return (tuple(t.shape), t.stride(), t.dtype) if t.device.type == "cpu" else None
        flat, spec = tree_flatten(args)
        key: list = [spec]
        for a in flat:
            if isinstance(a, torch.Tensor):
                if type(a) is not torch.Tensor or a.device.type != "cpu":
                    return None
                key.append((tuple(a.shape), a.stride(), a.dtype))
            elif a is None or isinstance(a, (bool, int, float, str)):
                key.append(("const", type(a), a))
            else:
                return None
        return tuple(key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (
            kwargs
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or not torch.is_inference_mode_enabled()
            or getattr(_recording, "active", False)
            or _global_hooks()
        ):
            return self._forward(*args, **kwargs)
        key = self._key(args)
        if key is None:
            return self._forward(*args)
        if self._generation != staleness.generation[0]:
            self.reset()
            self._generation = staleness.generation[0]
        entry = self._graphs.get(key)
        if entry is not None and entry.ready:
            outs = entry.graph.run(self._tensors(args))
            if outs is not None:
                spec, leaves = entry.outputs
                it = iter(outs)
                return tree_unflatten([next(it) if leaf is None else leaf for leaf in leaves], spec)
            with self._lock:  # a watched weight was edited in place: record again
                self._graphs.pop(key, None)
            entry = None
        if entry is not None and entry.refused is not None:
            return self._forward(*args)
        return self._record(key, args)

    @staticmethod
    def _tensors(args: tuple) -> list[torch.Tensor]:
        if len(args) == 1 and type(args[0]) is torch.Tensor:  # as in _key: the common call
            return [args[0]]
        return [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]

    def _record(self, key: tuple, args: tuple) -> Any:
        graph = torch.classes.hrnet_fast.CpuGraph()
        graph.begin(self._tensors(args))
        _recording.active = True
        try:
            out = self._forward(*args)
        except BaseException:
            graph.end([])
            raise
        finally:
            _recording.active = False
        leaves, spec = tree_flatten(out)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        why = graph.end(tensors)
        hooked = _submodule_with_hooks(self._module)
        if hooked is not None:
            why = f"{hooked} has forward hooks, which a replay would not call"
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = _Entry()
                while len(self._graphs) > MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            if entry.ready:
                # another thread's recordings of this shape agreed while this one ran: theirs is the
                # graph (threads replay it without the lock, so a ready entry's graph never changes)
                return out
            entry.tries += 1
            if why:  # maybe a one-off (weights packed again after load_state_dict query the CPU): try again
                entry.graph = None
                if entry.tries >= MAX_RECORDINGS:
                    entry.refused = why
            elif entry.graph is not None and not entry.ready and entry.graph.same_as(graph):
                graph.watch([t for t in self._module.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)])
                _mark(self._module)  # submodules set since attach() too
                entry.graph, entry.ready = graph, True
                entry.outputs = (spec, [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])
            elif entry.tries >= MAX_RECORDINGS:
                entry.refused = f"{entry.tries} recordings of its forward never agreed twice in a row"
            else:
                entry.graph = graph
        return out
