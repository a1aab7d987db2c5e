"""Backends, in one place for the functional API (hrnet_fast.ops) and the fused modules (hrnet_fast.fused):
which backend runs (`resolve`: an explicit name, or automatic by device) and the function that
runs an op on it (`kernel`).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from hrnet_fast import _extension
from hrnet_fast.ops.reference import conv_bias_act_reference, fuse_multi_res_reference

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


# ---- the function that runs each op on each backend ----------------------------------------------
# Module-level functions, so the fused modules that hold them can be pickled and deep-copied; each
# takes the op schema's arguments in order, without checks (the functional API checks before).


def _conv_bias_act_compiled(x, weight, bias, stride, padding, residual, relu):
    return torch.ops.hrnet_fast.conv_bias_act(x, weight, bias, stride, padding, residual, relu)


# The Triton ops' plain Python functions, by op (filled by define_triton_ops).
_TRITON_FNS: dict[str, Callable[..., torch.Tensor]] = {}


def _unobserved() -> bool:
    """Whether an op call here is a plain run that nothing else sees: no gradient, no tracing (Dynamo,
    make_fx, fake tensors), no dispatch mode (op counters), no functorch transform, no profiler.
    Then a Triton op may run as its Python function: through torch's triton_op it cost 30 us more a
    call (GPU run 6, benchmarks/results/gpu/triton_host_cost_h200_run6.json: 143 against 113 us),
    a quarter of the un-graphed Triton backend's host time. Each check is a C call (~0.4 us all)."""
    return not (
        torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
        or torch._C._autograd._profiler_enabled() or torch._C._are_functorch_transforms_active()
    )


def _triton_fn(op: str) -> Callable[..., torch.Tensor]:
    fn = _TRITON_FNS.get(op)
    if fn is None:  # a module unpickled before the ops were defined in this process
        define_triton_ops()
        fn = _TRITON_FNS[op]
    return fn


def _conv_bias_act_triton(x, weight, bias, stride, padding, residual, relu):
    if _unobserved():
        return _triton_fn("conv_bias_act")(x, weight, bias, stride, padding, residual, relu)
    return torch.ops.hrnet_fast.conv_bias_act_triton(x, weight, bias, stride, padding, residual, relu)


def _fuse_multi_res_compiled(base, lowres, weights, bias, relu, mode="nearest", align_corners=False):
    return torch.ops.hrnet_fast.fuse_multi_res(base, lowres, weights, bias, relu, mode, align_corners)


def _fuse_multi_res_triton(base, lowres, weights, bias, relu, mode="nearest", align_corners=False):
    if _unobserved():
        return _triton_fn("fuse_multi_res")(base, lowres, weights, bias, relu, mode, align_corners)
    return torch.ops.hrnet_fast.fuse_multi_res_triton(base, lowres, weights, bias, relu, mode, align_corners)


# torch: the plain-PyTorch reference; cpu and cuda: the C++ library (csrc/), one op for both devices;
# triton: the ops that hrnet_fast/triton/ defines.
_KERNELS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "conv_bias_act": {
        "torch": conv_bias_act_reference,
        "cpu": _conv_bias_act_compiled,
        "cuda": _conv_bias_act_compiled,
        "triton": _conv_bias_act_triton,
    },
    "fuse_multi_res": {
        "torch": fuse_multi_res_reference,
        "cpu": _fuse_multi_res_compiled,
        "cuda": _fuse_multi_res_compiled,
        "triton": _fuse_multi_res_triton,
    },
}

_triton_defined = False


def define_triton_ops() -> None:
    """Define torch.ops.hrnet_fast.*_triton, once. Importing hrnet_fast/triton/ imports triton itself,
    so it happens here, on first use of the triton backend, and nowhere else."""
    global _triton_defined
    if not _triton_defined:
        from hrnet_fast.triton._common import plain_function
        from hrnet_fast.triton.conv import conv_bias_act_triton
        from hrnet_fast.triton.fusion import fuse_multi_res_triton

        _TRITON_FNS["conv_bias_act"] = plain_function(conv_bias_act_triton)
        _TRITON_FNS["fuse_multi_res"] = plain_function(fuse_multi_res_triton)
        _triton_defined = True


def kernel(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The function that runs `op` ("conv_bias_act", "fuse_multi_res") on `backend`, a resolved one
    ("torch", "cpu", "cuda" or "triton": see `resolve`). For "triton" the Triton ops are defined first."""
    if backend == "triton":
        define_triton_ops()
    return _KERNELS[op][backend]
