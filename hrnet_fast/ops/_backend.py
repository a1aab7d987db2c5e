"""Backend choice shared by every op: explicit name, or automatic by device."""
from __future__ import annotations

import importlib.util
import os

import torch

from hrnet_fast import _extension

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
# Looked up once: Dynamo cannot trace importlib (a fullgraph compile through the ops would break).
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Map `backend` ("auto" or a name in BACKENDS) to the one that will run `op` on `device`.

    auto: the compiled kernel for the device if built, else Triton on CUDA, else the torch reference.
    An explicit backend that cannot run raises a RuntimeError that says why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if backend == "auto":
        if key is not None and _extension.has_kernel(op, key):
            return device.type
        if device.type == "cuda" and triton_available(device):
            return "triton"
        return "torch"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise RuntimeError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
        _extension.require(op, key)
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device}: needs triton and a CUDA device, "
            "or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )
    return backend
