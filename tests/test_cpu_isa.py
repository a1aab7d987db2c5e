"""The CPU kernels' instruction set, chosen at run time (csrc/cpu/cpu_isa.cpp): every variant this CPU
can run gives the Winograd conv's answers (against float64 direct convolution); the ones it cannot
run are refused with the reason; the choice follows what the CPU reports, or HRNET_FAST_CPU_ISA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hrnet_fast import _extension
from hrnet_fast.ops.winograd import conv3x3_winograd, panel_major, transform_weight, transform_weight_reference

pytestmark = pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("base", "avx2", "avx512")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as the OS lists them (independent of the extension's own detection)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _runs_here(isa: str) -> bool:
    flags = _cpu_flags()
    x86 = os.uname().machine in ("x86_64", "AMD64")
    return {
        "base": True,
        "avx2": x86 and {"avx2", "fma"} <= flags,
        "avx512": x86 and {"avx512f", "avx512vl", "avx2", "fma"} <= flags,
    }[isa]


@pytest.fixture
def restore_isa():
    saved = torch.ops.hrnet_fast.cpu_isa()
    yield
    torch.ops.hrnet_fast.cpu_isa(saved)


def test_default_is_the_best_variant_the_cpu_runs():
    best = next(isa for isa in reversed(VARIANTS) if _runs_here(isa))
    env = {k: v for k, v in os.environ.items() if k != "HRNET_FAST_CPU_ISA"}
    code = "import torch, hrnet_fast; print(torch.ops.hrnet_fast.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == best


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("m", [2, 4])
# odd channel counts: the vector tails; 2 images of 13x11: border tiles. 40 -> 48 channels on 6x5: few
# tiles for the weight, so each thread transforms its own panels of the dense weight, 32 input
# channels at a time (a slice of 8 last)
@pytest.mark.parametrize("n,cin,cout,h,w", [(2, 19, 21, 13, 11), (1, 40, 48, 6, 5)])
def test_each_variant_matches_direct_convolution(isa, m, n, cin, cout, h, w, restore_isa):
    if not _runs_here(isa):
        with pytest.raises(RuntimeError, match=f"cpu_isa\\(use\\)={isa} cannot run: this CPU does not report {isa}"):
            torch.ops.hrnet_fast.cpu_isa(isa)
        return
    assert torch.ops.hrnet_fast.cpu_isa(isa) == isa
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
    b = torch.randn(cout, generator=g)
    r = torch.randn(n, cout, h, w, generator=g)
    u = transform_weight(weight, m)
    torch.testing.assert_close(u.double(), transform_weight_reference(weight.double(), m), rtol=0, atol=1e-6 * u.abs().max().item())
    out = conv3x3_winograd(x, u, cout, b, r, relu=True)
    want = (F.conv2d(x.double(), weight.double(), b.double(), padding=1) + r.double()).relu()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())
    # the dense weight, transformed by the kernel per call: the same bits, on 1 thread and on 2, read
    # OIHW (in blocks transposed in registers), IHWO or panel-major
    before = torch.get_num_threads()
    ihwo = weight.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for dense in (weight, ihwo, panel_major(weight)):
                assert torch.equal(conv3x3_winograd(x, dense, cout, b, r, relu=True, tile=m), out)
    finally:
        torch.set_num_threads(before)


def test_unknown_variant_is_refused(restore_isa):
    with pytest.raises(RuntimeError, match="cpu_isa\\(use\\) must be one of base, avx2, avx512, got 'sse9'"):
        torch.ops.hrnet_fast.cpu_isa("sse9")


@pytest.mark.parametrize("value,expect", [("base", "base"), ("sse9", "HRNET_FAST_CPU_ISA must be one of")])
def test_environment_variable_forces_a_variant(value, expect):
    code = "import torch, hrnet_fast; print(torch.ops.hrnet_fast.cpu_isa())"
    env = {**os.environ, "HRNET_FAST_CPU_ISA": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert expect in (out.stdout + out.stderr)


def test_optimize_keeps_onednn_where_only_the_portable_variant_runs(restore_isa):
    """The portable Winograd build is for correctness; with it, optimize() packs the 3x3 convs for oneDNN."""
    import hrnet_fast
    from hrnet_fast.fused.conv import FusedConv
    from hrnet_fast.reference import tiny_pose_hrnet

    model = tiny_pose_hrnet().eval()
    torch.ops.hrnet_fast.cpu_isa("base")
    fast = hrnet_fast.optimize(model, backend="cpu")
    assert not any(m._winograd for m in fast.modules() if isinstance(m, FusedConv))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    if _runs_here("avx2"):
        torch.ops.hrnet_fast.cpu_isa("avx2")
        fast = hrnet_fast.optimize(model, backend="cpu")
        assert any(m._winograd for m in fast.modules() if isinstance(m, FusedConv))
