"""Independent work on parallel CUDA streams: an HR module's branches, and its fused outputs.

At small batches one branch's kernels each fill a few of the GPU's multiprocessors for a few
microseconds, so running the branches one after another leaves most of the GPU idle. Forking them
onto side streams (each waits for the current stream first, and the current stream waits for all of
them after) lets them overlap; inside a CUDA-graph capture the fork and join become graph edges, so a
replayed graph runs them concurrently too.

Memory: a tensor made on a side stream and used after the join on the current stream is marked with
record_stream, so the caching allocator does not hand its memory to the side stream again before the
current stream is done with it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

_LOCK = threading.Lock()
_SIDE: dict[int, list[torch.cuda.Stream]] = {}


def side_streams(device: torch.device, n: int) -> list[torch.cuda.Stream]:
    """n side streams of `device`, made once per process and shared (use only from the forward)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = _SIDE.get(index)
    if streams is None or len(streams) < n:
        with _LOCK:
            streams = _SIDE.setdefault(index, [])
            while len(streams) < n:
                streams.append(torch.cuda.Stream(device=index))
    return streams[:n]


def _mark(out: object, stream: torch.cuda.Stream) -> None:
    if isinstance(out, torch.Tensor):
        out.record_stream(stream)
    elif isinstance(out, (list, tuple)):
        for o in out:
            _mark(o, stream)


def run_concurrently(fns: Sequence[Callable[[], T]], device: torch.device) -> list[T]:
    """[f() for f in fns], each on its own side stream of `device`, ordered after everything the
    current stream has queued and before everything it queues next."""
    if len(fns) < 2:
        return [f() for f in fns]
    current = torch.cuda.current_stream(device)
    outs: list[T] = []
    streams = side_streams(device, len(fns))
    for f, s in zip(fns, streams):
        s.wait_stream(current)
        with torch.cuda.stream(s):
            outs.append(f())
    for s in streams:
        current.wait_stream(s)
    for o in outs:
        _mark(o, current)
    return outs
