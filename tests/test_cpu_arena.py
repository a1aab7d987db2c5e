"""The cpu backend's caching allocator (csrc/cpu/cpu_arena.cpp) and stage-1 chunking (ChunkedStage):
same outputs as eager, the allocator installed only during a forward, blocks reused, released on
request, and safe with threads, exceptions and oneDNN's own (raw) allocations."""
from __future__ import annotations

import gc

import pytest
import torch

import hrnet_fast
from hrnet_fast import _extension
from hrnet_fast.fused.blocks import ChunkedStage
from hrnet_fast.profile import held_bytes
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import in_threads, randomize_bn

pytestmark = pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")


def _stats() -> tuple[int, bool]:
    cached, installed, _ = torch.ops.hrnet_fast.cpu_arena_stats()
    return cached, bool(installed)


def _misses() -> int:
    """Blocks the arena has allocated anew (none of the size was free) so far."""
    return torch.ops.hrnet_fast.cpu_arena_stats()[2]


def _models(batch: int = 3, size: int = 64, cpu_graph: bool = True):
    model = randomize_bn(tiny_pose_hrnet()).eval()
    # tasks off: side by side, the threads' allocations interleave differently each forward, and so do
    # the arena's block counts this file checks exactly (tests/test_cpu_tasks.py runs the arena with them)
    fused = hrnet_fast.optimize(model, backend="cpu", tasks=False, cpu_graph=cpu_graph)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    return model, fused, x, ref


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_forward_reuses_blocks_and_uninstalls():
    _, fused, x, ref = _models()
    torch.ops.hrnet_fast.cpu_arena_release()
    with torch.no_grad():
        _assert_close(fused(x), ref)
    cached, installed = _stats()
    assert not installed, "the arena must be torch's CPU allocator only while a forward runs"
    # stage 1's 256-channel 16x16 activations (262 KB an image) are past the arena's 256 KiB minimum
    assert cached > 0
    with torch.no_grad():
        # best fit settles within a few forwards (which blocks serve which requests), and the CPU graph's
        # memory plan is learned (its first replay, the fourth forward) and used (a slab, from the fifth)
        for _ in range(5):
            fused(x)
        cached, misses = _stats()[0], _misses()
        _assert_close(fused(x), ref)
    assert (_stats()[0], _misses()) == (cached, misses), "a further forward of the same shape reuses the same blocks"
    held = held_bytes(fused)  # the model's memory includes the arena's free blocks
    assert torch.ops.hrnet_fast.cpu_arena_release() == cached
    assert _stats() == (0, False)
    assert held - held_bytes(fused) == cached


def test_blocks_of_sizes_no_longer_asked_for_make_room():
    """A forward of another shape first (a bigger batch: bigger blocks, the higher peak) leaves blocks
    no later forward asks for; they are freed to make room for the new sizes, so from the second forward
    of the new shape on every block comes from the arena (kept, they filled its budget for good and every
    forward allocated its activations anew: W32 at batch 8, ~8,000 page faults a forward). Python forwards
    (no CPU graph: a graph's replays have a memory plan of their own, test_replays_run_in_a_planned_slab)."""
    model, fused, _, _ = _models(cpu_graph=False)
    torch.ops.hrnet_fast.cpu_arena_release()
    big, small = torch.randn(8, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused(big)
        fused(small)
        cached, misses = _stats()[0], _misses()
        for _ in range(3):
            _assert_close(fused(small), model(small))
    assert _misses() == misses, "blocks of the sizes the forward asks for again are all free ones"
    assert 0 < _stats()[0] <= cached


def test_a_larger_free_block_serves_a_request():
    """Best fit: with no free block of the size asked for, the smallest larger one is handed out (none
    allocated anew), and it comes back as the size it is."""
    torch.ops.hrnet_fast.cpu_arena_release()
    torch.ops.hrnet_fast.cpu_arena_scope(True)
    try:
        a, b = torch.empty(1 << 20), torch.empty(1 << 19)  # 4 MiB and 2 MiB blocks, both in use
        del a, b  # both free: 6 MiB held, within the peak
        assert _stats()[0] == 6 << 20
        misses = _misses()
        c = torch.empty(300_000)  # 1.2 MB: the 2 MiB block, the best fit
        assert _misses() == misses and _stats()[0] == 4 << 20
        d = torch.empty(600_000)  # 2.4 MB: the 4 MiB one
        assert _misses() == misses and _stats()[0] == 0
        e = torch.empty(400_000)  # nothing free: allocated anew
        assert _misses() == misses + 1
        del c, d, e
        # all three kept: the blocks as they are (in use together, the new peak)
        assert _stats()[0] == (6 << 20) + -(-1_600_000 // 4096) * 4096
    finally:
        torch.ops.hrnet_fast.cpu_arena_scope(False)
        torch.ops.hrnet_fast.cpu_arena_release()


@pytest.mark.parametrize("cpu_graph", [False, True])
def test_steady_forwards_allocate_nothing_anew(cpu_graph):
    """Forward after forward of one shape, every block comes from the arena (by exact size they could
    not all wait for their own size within the budget: W32 at batch 8 allocated 54 anew every forward,
    and glibc faulted some in afresh); replayed, from the slab its memory plan laid out."""
    model, fused, x, ref = _models(batch=6, cpu_graph=cpu_graph)
    torch.ops.hrnet_fast.cpu_arena_release()
    with torch.no_grad():
        for _ in range(5):  # replayed: three Python forwards, the plan learned, a slab
            fused(x)
        misses = _misses()
        for _ in range(3):
            _assert_close(fused(x), ref)
    assert _misses() == misses


def test_block_freed_after_the_forward_comes_back():
    _, fused, x, _ = _models(batch=8)
    kept: list[torch.Tensor] = []
    fused.layer1.register_forward_hook(lambda m, args, out: kept.append(out))  # made during the forward
    with torch.no_grad():
        fused(x)
    torch.ops.hrnet_fast.cpu_arena_release()
    assert kept[0].numel() * 4 >= 256 << 10  # one of the arena's blocks
    kept.clear()  # freed outside any forward: its deleter is still the arena's
    assert _stats()[0] >= 8 * 256 * 16 * 16 * 4


def test_exception_in_forward_uninstalls():
    _, fused, _, _ = _models()
    with pytest.raises(ValueError, match="must be"), torch.no_grad():
        fused(torch.randn(2, 5, 64, 64))  # 5 channels where the stem takes 3
    assert not _stats()[1]


def test_threads_share_the_model():
    _, fused, x, ref = _models()

    def work(_: int) -> None:
        for _ in range(4):
            with torch.no_grad():
                _assert_close(fused(x), ref)

    in_threads(work, 3)
    assert not _stats()[1], "the last forward to leave uninstalls the arena"


def test_onednn_weights_packed_in_a_forward_outlive_it():
    # winograd=False: every conv runs oneDNN, whose weights are packed on first use, inside the
    # forward, through whichever CPU allocator is installed (ideep's raw_allocate), and freed with the
    # model, outside any forward (raw_deallocate through the default allocator).
    model = randomize_bn(tiny_pose_hrnet()).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        for _ in range(2):
            fused = hrnet_fast.optimize(model, backend="cpu", winograd=False)
            _assert_close(fused(x), ref)
            del fused
            gc.collect()
        torch.ops.hrnet_fast.cpu_arena_release()
        _assert_close(hrnet_fast.optimize(model, backend="cpu", winograd=False)(x), ref)


def test_stage_one_runs_in_chunks(monkeypatch):
    model, fused, x, ref = _models(batch=5)
    assert isinstance(fused.layer1, ChunkedStage)
    # the state_dict keeps the Sequential's keys
    assert [k for k in fused.state_dict() if k.startswith("layer1.")] == [
        k for k in hrnet_fast.optimize(model, backend="torch").state_dict() if k.startswith("layer1.")
    ]
    stage_in = torch.randn(5, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    per_image = 256 * 16 * 16 * 4
    assert fused.layer1.chunk(stage_in) == ChunkedStage.CHUNK_BYTES // per_image
    calls: list[int] = []
    fused.layer1[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(ChunkedStage, "CHUNK_BYTES", 2 * per_image)
    with torch.no_grad():
        out = fused(x)
    assert calls == [2, 2, 1]
    _assert_close(out, ref)
    with torch.no_grad(), torch.profiler.profile() as prof:
        chunked = fused.layer1(stage_in)
    assert chunked.is_contiguous(memory_format=torch.channels_last)
    # each chunk's last conv writes its images of the stage's output: no concatenation afterwards
    names = [e.name for e in prof.events()]
    assert names.count("hrnet_fast::conv_bias_act_into") == 3 and "aten::cat" not in names
    monkeypatch.setattr(ChunkedStage, "CHUNK_BYTES", 1 << 40)
    with torch.no_grad():
        assert torch.equal(fused.layer1(stage_in), chunked)


def test_only_the_cpu_backend_chunks():
    model = randomize_bn(tiny_pose_hrnet()).eval()
    assert not isinstance(hrnet_fast.optimize(model, backend="torch").layer1, ChunkedStage)
    fused = hrnet_fast.optimize(model, backend="cpu")
    # the HR modules' branches stay plain Sequentials
    assert not any(isinstance(m, ChunkedStage) for m in fused.stage2.modules())


def test_replays_run_in_a_planned_slab():
    """A CPU graph's first replay learns its allocations; each later replay is served from one buffer (a
    slab) at offsets laid out by when each block is alive (csrc/cpu/cpu_arena.h), so what the arena keeps
    after a forward is about the replay's own peak, not the Python forwards' that recorded it."""
    model, fused, x, ref = _models(batch=6)
    torch.ops.hrnet_fast.cpu_arena_release()
    with torch.no_grad():
        for _ in range(3):  # Python forwards, the last two recorded
            _assert_close(fused(x), ref)
        python_held = _stats()[0]
        learned = fused(x)  # the first replay: the plan learned
        _assert_close(learned, ref)
        outs = [fused(x) for _ in range(3)]  # from the slab
        misses = _misses()
        planned_held = _stats()[0]
        outs += [fused(x) for _ in range(2)]
    assert all(torch.equal(o, learned) for o in outs), "the same bits from the slab as before"
    assert _misses() == misses and _stats()[0] == planned_held, "one slab, reused"
    assert 0 < planned_held < python_held
    switch = torch.ops.hrnet_fast.cpu_arena_replay_plans
    assert switch()
    try:
        switch(False)  # every block served as before: the same bits
        with torch.no_grad():
            assert all(torch.equal(fused(x), learned) for _ in range(3))
    finally:
        switch(True)


def test_replays_of_two_shapes_share_one_slab():
    """Replays one at a time keep one free slab, the largest: a smaller shape's replay runs in it."""
    model, fused, _, _ = _models()
    big, small = torch.randn(8, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = {n: model(t) for n, t in (("big", big), ("small", small))}
        torch.ops.hrnet_fast.cpu_arena_release()
        for _ in range(6):
            fused(big)
        big_held = _stats()[0]
        for _ in range(6):
            fused(small)
        misses = _misses()
        for _ in range(3):
            for name, t in (("big", big), ("small", small)):
                _assert_close(fused(t), want[name])
    assert _misses() == misses, "each replay served from the slab kept"
    assert _stats()[0] <= big_held


def test_replays_on_threads_and_a_changed_thread_count():
    """Replays at once on threads each take a slab of their own; a thread count changed between calls
    (other scratch sizes: the plan no longer matches) is served as before and learned again."""
    model, fused, x, ref = _models(batch=6)
    with torch.no_grad():
        for _ in range(5):
            fused(x)

    def work(_: int) -> None:
        for _ in range(4):
            with torch.no_grad():
                _assert_close(fused(x), ref)

    in_threads(work, 3)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 1, 3, 2, 2, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                _assert_close(fused(x), ref)
    finally:
        torch.set_num_threads(before)
