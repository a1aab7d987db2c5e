"""The Triton kernels compile for an H100 (sm_90) here, without a GPU (tests/triton_sm90.py): what
the interpreter cannot show, the code a GPU would run, checked before any GPU run. fp32 under TF32
("tf32_rna") is one TF32 product a product (a third of "tf32x3"'s), fp16 and bf16 run their own
tensor cores (bf16 with 64-bit indices too), IEEE fp32 none; with HRNet's channel counts every tile is
loaded by 16-byte asynchronous copies into several stages of shared memory."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="this triton has no NVIDIA backend to compile with")


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


TF32 = "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32"


def test_fp32_under_tf32_is_one_rounded_product(compiled):
    rna, x3 = compiled["conv fp32 tf32_rna"], compiled["conv fp32 tf32x3"]
    assert rna["kinds"] == [TF32] and x3["kinds"] == [TF32]
    # BLOCK_K 32 is 4 steps of k8: one TF32 product each, against tf32x3's three
    assert rna["wgmma"] == 4 and x3["wgmma"] == 3 * rna["wgmma"]


def test_ieee_fp32_takes_no_tensor_cores(compiled):
    assert compiled["conv fp32 ieee"]["wgmma"] == 0


def test_fp16_takes_f16_tensor_cores(compiled):
    assert compiled["conv fp16"]["kinds"] == ["wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16"]


def test_channel_loads_are_16_byte_async_copies(compiled):
    """The kernels let Triton specialise channel counts (not in do_not_specialize): a multiple of 16
    makes the channel masks constant over 16 channels, so the loads are 16-byte cp.async into a
    pipeline of shared-memory stages. Without it fp16 tiles are loaded synchronously, one stage."""
    for name, summary in compiled.items():
        if name not in ("triton", "resources") and "not multiples of 16" not in name:
            assert summary["async_copy_bytes"] == [16], name
    fp16, plain = compiled["conv fp16"], compiled["conv fp16, channel counts not multiples of 16"]
    assert plain["async_copy_bytes"] == []
    # 3 stages of a 64x32 and a 32x64 fp16 tile (8 KiB a stage) against one
    assert fp16["shared"] >= 3 * plain["shared"]


def test_bf16_takes_bf16_tensor_cores(compiled):
    bf16 = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"
    assert compiled["conv bf16 64-bit indices"]["kinds"] == [bf16]
    fusion = compiled["fusion bf16 3 inputs bilinear align_corners"]
    # three low-res inputs, each 2 steps of k16 (BLOCK_K 32)
    assert fusion["kinds"] == [bf16] and fusion["wgmma"] == 6


@pytest.mark.parametrize("bilinear", [False, True])
def test_fusion_compiles_with_tf32_products(compiled, bilinear):
    fusion = compiled[f"fusion fp32 tf32_rna bilinear={bilinear}"]
    # two low-res inputs, each 4 steps of k8 (BLOCK_K 32)
    assert fusion["kinds"] == [TF32] and fusion["wgmma"] == 8


def test_untuned_tiles_do_not_spill(compiled):
    """The tiles the kernels pick without timing (the fusion always; the conv under torch.compile or
    with autotuning off) for W32's convs and fusions, fp16 and fp32, nearest and bilinear, keep every
    value in registers: no spill stack on sm_90."""
    used = compiled["resources"]
    assert any(name.startswith("conv") for name in used) and any(name.startswith("fusion") for name in used)
    spilling = {name: u["spill_bytes"] for name, u in used.items() if u["spill_bytes"]}
    assert not spilling, spilling
