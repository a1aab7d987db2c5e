"""hrnet_fast.bench.cpu_parts: the part-by-part clock names the parts in forward order and its parts
add up to the forward, on the reference model and on the optimized one."""
from __future__ import annotations

import time

import pytest
import torch

import hrnet_fast
from hrnet_fast import _extension
from hrnet_fast.bench.cpu_parts import PartClock
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import randomize_bn


@pytest.mark.parametrize("optimized", [False, True], ids=["reference", "optimized"])
def test_parts_in_order_and_adding_up_to_the_forward(optimized):
    if optimized and not _extension.is_built():
        pytest.skip("needs the compiled extension")
    model = randomize_bn(tiny_pose_hrnet()).eval()
    if optimized:
        model = hrnet_fast.optimize(model, backend="cpu")
    clock = PartClock(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)  # first call: caches made on first use
        t0 = time.perf_counter()
        model(x)
        wall_ms = (time.perf_counter() - t0) * 1e3
    parts = clock.parts_ms()
    assert list(parts) == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert all(v > 0 for v in parts.values())
    # from the model's own pre-hook to its forward hook: all but the call's way in and out
    assert 0.5 * wall_ms < sum(parts.values()) <= wall_ms


@pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")
def test_main_puts_the_cpu_variant_back_and_records_it(tmp_path):
    """main switches the Winograd variant (and thread count) per configuration; afterwards the CPU's own
    variant and the caller's thread count are back, the JSON's machine info names that variant, and each
    row names the variant it timed."""
    import json

    from hrnet_fast.bench import cpu_parts

    before, threads = torch.ops.hrnet_fast.cpu_isa(), torch.get_num_threads()
    other = "avx2" if before == "avx512" else "base"  # a variant every CPU that runs `before` runs too
    rc = cpu_parts.main(["--threads", "1", "--batch", "1", "--rounds", "1", "--runs", "1", "--isa", other,
                         "--out", str(tmp_path)])
    assert rc == 0
    assert torch.ops.hrnet_fast.cpu_isa() == before
    assert torch.get_num_threads() == threads  # the thread count it timed at (1) is not left behind
    data = json.loads((tmp_path / "cpu_parts.json").read_text())
    assert data["device"]["hrnet_fast_cpu_isa"] == before
    assert [r["isa"] for r in data["rows"]] == [other]
