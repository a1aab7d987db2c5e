"""Build hrnet_fast._C: CPU kernels always, CUDA kernels when a CUDA toolchain and a CUDA torch exist.

HRNET_FAST_CUDA=auto|0|1 (auto by default) decides the CUDA part. It builds against the torch that
is installed (use `pip install --no-build-isolation`): torch's C++ ABI changes between releases.
TORCH_CUDA_ARCH_LIST, when unset, is the visible GPUs' compute capabilities, or 8.0;9.0 where no GPU
can be seen. The CUDA headers that torch's own headers need but the toolkit may lack (cuBLAS,
cuSPARSE: /usr/local/cuda/include here has neither) are taken from the nvidia wheels in
site-packages, searched after the toolkit's own headers (-isystem) so that they never shadow them.
"""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

# torch.utils.cpp_extension reads CUDA_HOME at import time; the `nvcc` on PATH may be a wrapper.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent


def _want_cuda() -> bool:
    mode = os.environ.get("HRNET_FAST_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"HRNET_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    have = CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not have:
        sys.exit(
            "HRNET_FAST_CUDA=1 but no CUDA build is possible: "
            f"CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
        )
    return have and mode != "0"


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST: the user's, else every visible GPU's capability, else 8.0;9.0 (A100, H100)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = set()
    if torch.cuda.is_available():
        caps = {"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(sorted(caps)) or "8.0;9.0"


def _nvidia_include_flags() -> list[str]:
    """-isystem flags for the nvidia-* wheels' headers (cu13 toolkit, cuDNN), only where the toolkit
    lacks cublas_v2.h. -isystem folders are searched after every -I folder (the toolkit's include is
    one), so a version skew between wheel and toolkit cannot shadow the toolkit's own headers."""
    if CUDA_HOME is not None and (Path(CUDA_HOME) / "include" / "cublas_v2.h").exists():
        return []
    flags: list[str] = []
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cudnn/include"):
            d = Path(sp) / sub
            if d.is_dir() and str(d) not in flags:
                flags += ["-isystem", str(d)]
    return flags


def _cpu_flags() -> list[str]:
    """Baseline x86-64 code for everything: the SIMD kernels are built once per instruction set
    (csrc/cpu/isa/) and chosen at run time, so one build runs on any CPU of the architecture."""
    return ["-O3", "-fopenmp"]


def extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/cpu/isa/*.cpp"))
    include_dirs = [str(ROOT / "csrc")]
    extra = {"cxx": _cpu_flags()}
    if _want_cuda():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvidia = _nvidia_include_flags()
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-DHRNET_FAST_WITH_CUDA", "-lineinfo"] + nvidia
        extra["cxx"] += ["-DHRNET_FAST_WITH_CUDA"] + nvidia
        return [
            CUDAExtension(
                "hrnet_fast._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args=extra,
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "hrnet_fast._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="hrnet_fast",
    packages=find_packages(include=["hrnet_fast", "hrnet_fast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
