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


def test_scaling_table_efficiency_and_time_lost():
    """Hand-made op times: efficiency t(T0) T0 / (T t(T)), lost t(T) - t(T0) T0 / T, most lost first,
    an op seen at one count only, and the totals."""
    from hrnet_fast.bench.cpu_parts import scaling_table

    conv, fuse, cat = ("hrnet_fast.conv", "1x8x4x4"), ("hrnet_fast.fuse", "1x8x4x4"), ("aten.cat", "")
    times = {1: {conv: [4.0, 8.0], fuse: [2.0, 2.0]}, 4: {conv: [4.0, 4.0], fuse: [2.0, 0.5], cat: [1.0, 0.25]}}
    text = scaling_table(times, {1: 12.0, 4: 6.0}, batch=1)
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert rows[0] == "| hrnet_fast.conv | 1x8x4x4 | 4 | 8.00 (100%) | 4.00 (50%) | 2.00 |"
    assert rows[1] == "| aten.cat |  | 1 |  | 0.25 (0%) | 0.25 |"
    assert rows[2] == "| hrnet_fast.fuse | 1x8x4x4 | 2 | 2.00 (100%) | 0.50 (100%) | 0.00 |"
    assert rows[3] == "| all ops | | | 10.00 (100%) | 4.75 (53%) | 2.25 |"
    assert rows[4] == "| forward (wall) | | | 12.00 (100%) | 6.00 (50%) | 3.00 |"


@pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")
def test_op_clock_times_each_call_of_the_forward():
    """_op_times sees each hrnet_fast op the optimized forward calls, as often as hrnet_fast.profile's
    op counter does, and its op times add up to no more than the wall time."""
    from hrnet_fast.bench.cpu_parts import _op_times
    from hrnet_fast.profile import count_ops

    model = hrnet_fast.optimize(randomize_bn(tiny_pose_hrnet()).eval(), backend="cpu", cpu_graph=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ops, wall = _op_times(model, x, forwards=2)
        counted = count_ops(model, x)["by_op"]
    ours = {}
    for (name, _), (calls, _, _) in ops.items():
        if name.startswith("hrnet_fast."):
            ours[name.split(".")[1]] = ours.get(name.split(".")[1], 0) + calls
    want = {name.split("::")[1].split(".")[0]: n for name, n in counted.items() if name.startswith("hrnet_fast::")}
    assert ours == want and sum(want.values()) > 10
    assert 0 < sum(ms for _, ms, _ in ops.values()) <= wall
    assert all(faults >= 0 for _, _, faults in ops.values())


def test_fault_lines_sum_and_name_the_faulting_ops():
    """Hand-made op times with page faults: the total a forward at each thread count, the ops with most
    first; none at a count: no list."""
    from hrnet_fast.bench.cpu_parts import fault_lines

    conv, fuse = ("hrnet_fast.conv", "1x8x4x4"), ("hrnet_fast.fuse", "1x8x4x4")
    text = fault_lines({2: {conv: [1.0, 1.0, 0.0]}, 16: {conv: [1.0, 1.0, 6777.0], fuse: [2.0, 1.0, 12.0]}}, batch=1)
    assert text.splitlines() == [
        "batch 1, 2 threads: 0 page faults a forward",
        "batch 1, 16 threads: 6789 page faults a forward (hrnet_fast.conv 1x8x4x4: 6777; hrnet_fast.fuse 1x8x4x4: 12)",
    ]


def test_op_clock_names_tensor_lists_by_their_shapes():
    """An op taking tensor lists (winograd_branches: one call a module) is keyed by the lists' shapes too,
    so each stage's modules get a row of their own: up to 4 shapes listed, else the first and the count."""
    from hrnet_fast.bench.cpu_parts import _shapes

    xs = [torch.empty(1, 32, 64, 48), torch.empty(1, 64, 32, 24)]
    assert _shapes(xs[0]) == "1x32x64x48"
    assert _shapes(xs) == "[1x32x64x48 1x64x32x24]"
    assert _shapes([torch.empty(32, 32, 3, 3)] * 8) == "[32x32x3x3 ... (8)]"
