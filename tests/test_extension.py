"""The compiled extension: what the build carries, and what happens without it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hrnet_fast
from hrnet_fast import _extension
from hrnet_fast.ops import _backend

OPS = ("conv_bias_act", "fuse_multi_res")


def _cuda_toolchain() -> bool:
    """What setup.py's HRNET_FAST_CUDA=auto looks for: nvcc and a CUDA build of torch."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = (Path(home) / "bin" / "nvcc").exists() or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and nvcc


def test_extension_loads_with_cpu_kernels():
    assert _extension.is_built(), _extension.LOAD_ERROR
    for op in OPS:
        assert _extension.has_kernel(op, "CPU"), op
    # packed (oneDNN-layout) weights dispatch to the same CPU kernel
    assert _extension.has_kernel("conv_bias_act", "MkldnnCPU")
    # the Winograd convolution is a CPU kernel only (cuDNN chooses its own algorithms on CUDA)
    assert _extension.has_kernel("conv3x3_winograd", "CPU")


@pytest.mark.skipif(os.environ.get("HRNET_FAST_CUDA") == "0", reason="CUDA kernels switched off for this build")
def test_cuda_kernels_are_compiled_where_a_toolchain_exists():
    """CI has nvcc and a CUDA torch but no GPU: the CUDA sources must still have been built in."""
    if not _cuda_toolchain():
        pytest.skip("no CUDA toolchain here")
    for op in OPS:
        assert _extension.has_kernel(op, "CUDA"), f"{op} has no CUDA kernel though nvcc and a CUDA torch are present"


def test_package_works_without_the_extension(tmp_path):
    """With hrnet_fast._C unimportable: the reference path runs, and compiled backends say how to build."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "hrnet_fast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, hrnet_fast
        assert not hrnet_fast._extension.is_built()
        x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
        ref = torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
        assert torch.allclose(hrnet_fast.conv_bias_act(x, w, None, 1, 1), ref)  # auto -> torch
        model = hrnet_fast.optimize(hrnet_fast.reference.tiny_pose_hrnet().eval())
        assert model.hrnet_fast_backend == "torch"
        try:
            hrnet_fast.conv_bias_act(x, w, None, 1, 1, backend="cpu")
        except RuntimeError as e:
            print("ERROR:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERROR: hrnet_fast's C++ extension is not built" in out.stdout
    assert "make setup" in out.stdout


def test_backend_resolution_errors():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("mkl", cpu, "conv_bias_act")
    with pytest.raises(RuntimeError, match="backend='cuda' needs cuda tensors"):
        _backend.resolve("cuda", cpu, "conv_bias_act")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            _backend.resolve("triton", cpu, "fuse_multi_res")
    assert _backend.resolve("auto", cpu, "conv_bias_act") == "cpu"
    assert _backend.resolve("torch", cpu, "fuse_multi_res") == "torch"


def test_public_names():
    for name in ("get_pose_net", "pose_hrnet_w32", "pose_hrnet_w48", "load_checkpoint", "optimize",
                 "conv_bias_act", "fuse_multi_res"):
        assert callable(getattr(hrnet_fast, name)), name
