"""Loads the compiled extension (hrnet_fast._C) if it was built; the reference path works without it."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

BUILD_HINT = (
    "build it with `make setup`, or against the installed torch with "
    "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`); "
    "set CUDA_HOME to the CUDA toolkit for the CUDA kernels"
)

try:
    from hrnet_fast import _C  # noqa: F401  (registers torch.ops.hrnet_fast.*)

    LOAD_ERROR: Exception | None = None
except ImportError as e:  # not built: reference (and Triton) paths only
    LOAD_ERROR = e
    # Built but unloadable (most often: compiled against another torch release, whose C++ ABI differs):
    # say so loudly, since backend="auto" would otherwise quietly fall back to slower paths.
    built = sorted(Path(__file__).parent.glob("_C*.so")) + sorted(Path(__file__).parent.glob("_C*.pyd"))
    if built:
        warnings.warn(
            f"hrnet_fast's compiled extension {built[0].name} exists but failed to load ({e}); it was probably "
            f"built against another torch than this one ({torch.__version__}); {BUILD_HINT}. "
            "Until then only the torch reference and Triton backends run.",
            RuntimeWarning,
            stacklevel=2,
        )


def is_built() -> bool:
    """True when hrnet_fast._C loaded and torch.ops.hrnet_fast.* exist."""
    return LOAD_ERROR is None


# A constant for torch.compile: Dynamo cannot trace the dispatcher query (fullgraph would break).
@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled library has a `dispatch_key` ("CPU", "CUDA") kernel for hrnet_fast::`op`."""
    if not is_built():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"hrnet_fast::{op}", dispatch_key)


def require(op: str, dispatch_key: str) -> None:
    """Raise a RuntimeError saying how to build, when the `dispatch_key` kernel of `op` is missing."""
    if not is_built():
        raise RuntimeError(f"hrnet_fast's C++ extension is not built ({LOAD_ERROR}); {BUILD_HINT}")
    if not has_kernel(op, dispatch_key):
        raise RuntimeError(
            f"hrnet_fast::{op} has no {dispatch_key} kernel in this build; {BUILD_HINT}"
            + (" with a CUDA toolchain and a CUDA build of torch" if dispatch_key == "CUDA" else "")
        )
