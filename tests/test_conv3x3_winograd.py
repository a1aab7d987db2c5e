"""conv3x3_winograd against direct convolution (float64 reference): both tile sizes, image borders,
every thread split, the epilogue, memory formats, gradients, opcheck, torch.compile, the tile choice
and input validation; the weight given transformed (transform_weight) or dense (tile=m, transformed
by the kernel on each call), and the filter transform (winograd_weight) against float64 einsums."""
from __future__ import annotations

import pytest
import references
import torch

from hrnet_fast import _extension
from hrnet_fast.ops import conv_bias_act_reference, winograd

from conftest import restoring

CL = torch.channels_last

pytestmark = pytest.mark.skipif(not _extension.has_kernel("conv3x3_winograd", "CPU"), reason="C++ extension not built")

# (N, C_in, C_out, H, W): sizes that are and are not multiples of both tiles, a 1x1 image, more
# output channels than input, channel counts that are not multiples of 8 / 16 (timm's W18 has
# 18, 36, 72, 144; and 3), and (last two) weights past 2 MB, which take the large-block path.
SHAPES = [
    (1, 8, 16, 8, 8),
    (2, 16, 32, 13, 9),
    (1, 8, 16, 1, 1),
    (3, 8, 48, 5, 7),
    (1, 32, 16, 2, 3),
    (2, 18, 18, 7, 6),
    (1, 36, 72, 5, 5),
    (1, 3, 20, 4, 9),
    (2, 128, 128, 6, 5),
    (1, 256, 144, 3, 4),
    (1, 40, 48, 6, 5),  # few tiles for the weight: dense panels transformed 32 input channels at a time
]


def make(shape, seed=0, res=True, bias=True):
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
    b = torch.randn(cout, generator=g) if bias else None
    r = torch.randn(n, cout, h, w, generator=g) if res else None
    return x, weight, b, r


def ihwo(w: torch.Tensor) -> torch.Tensor:
    """w stored [C_in, 3, 3, C_out], seen as OIHW: the kernels read it in place, as they do OIHW."""
    return w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def hwio(w: torch.Tensor) -> torch.Tensor:
    """w stored [3, 3, C_in, C_out], seen as OIHW: a layout the kernels copy to OIHW first."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def reference(x, weight, b, r, relu):
    """Direct convolution in float64: the exact answer the float32 kernels round towards."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return conv_bias_act_reference(d(x), d(weight), d(b), [1, 1], [1, 1], d(r), relu)


def assert_close_to(out: torch.Tensor, expected: torch.Tensor, m: int) -> None:
    # rounding grows with the transform's constants: ~1e-7 relative for F(2x2), ~1e-6 for F(4x4)
    tol = (2e-6 if m == 2 else 2e-5) * expected.abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= tol, f"F({m}x{m},3x3): max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu,res,bias", [(True, True, True), (False, False, True), (True, False, False)])
def test_matches_direct_convolution(m, shape, relu, res, bias):
    x, weight, b, r = make(shape, res=res, bias=bias)
    out = winograd.conv3x3_winograd(x.contiguous(memory_format=CL), winograd.transform_weight(weight, m), shape[2], b, r, relu)
    assert out.is_contiguous(memory_format=CL)
    assert_close_to(out, reference(x, weight, b, r, relu), m)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "shape", [(1, 8, 64, 4, 4), (7, 8, 512, 4, 4), (4, 16, 32, 20, 12)], ids=["one_tile", "weight_bound_blocks", "many_blocks"]
)
def test_thread_counts_agree(threads, shape):
    """Threads share output channels where the weights outweigh the tiles (one tile; 7 tiles in 2
    blocks against 32 panels of weight), and whole blocks otherwise (120 tiles)."""
    x, weight, b, r = make(shape)
    u = winograd.transform_weight(weight, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = winograd.conv3x3_winograd(x, u, shape[2], b, r, True)
    finally:
        torch.set_num_threads(before)
    assert_close_to(out, reference(x, weight, b, r, True), 4)


def test_nchw_input_gives_nchw_output():
    x, weight, b, r = make((2, 8, 16, 6, 5))
    out = winograd.conv3x3_winograd(x, winograd.transform_weight(weight, 2), 16, b, r, True)
    assert out.is_contiguous()
    assert_close_to(out, reference(x, weight, b, r, True), 2)


def test_unaligned_input_view():
    """A view starting mid-allocation is not 32-byte aligned; the kernel copies it rather than fault."""
    x, weight, b, _ = make((1, 8, 16, 4, 4))
    flat = torch.randn(1 + x.numel())
    view = flat[1:].view(1, 4, 4, 8).permute(0, 3, 1, 2)  # channels_last strides, offset by 4 bytes
    assert view.is_contiguous(memory_format=CL) and view.data_ptr() % 32
    out = winograd.conv3x3_winograd(view, winograd.transform_weight(weight, 4), 16, b, None, False)
    assert_close_to(out, reference(view, weight, b, None, False), 4)


def test_nan_propagates_through_its_tile_and_relu():
    """ReLU keeps NaN as torch.relu does; the transforms mix a whole tile, so a NaN input reaches
    every output of its m x m tile (direct convolution: only its 3x3 neighbourhood)."""
    x, weight, b, _ = make((1, 8, 16, 8, 8))
    x[0, 0, 1, 1] = float("nan")
    out = winograd.conv3x3_winograd(x, winograd.transform_weight(weight, 4), 16, b, None, True)
    direct = torch.relu(torch.nn.functional.conv2d(x, weight, b, padding=1))
    assert direct.isnan().any() and not (direct.isnan() & ~out.isnan()).any()
    tile = torch.zeros(8, 8, dtype=torch.bool)
    tile[:4, :4] = True  # the input pixel (1, 1) feeds tile (0, 0) only
    assert torch.equal(out.isnan().any(1)[0], tile)


# Dense-weight paths: every shape above transforms panel by panel inside the tasks (one block of
# tiles); (8, 64, 64, 16, 12) has several blocks at every thread count and transforms once into
# shared scratch on one thread and on 2 and 3 (at most 48 tiles a thread); (4, 32, 32, 64, 48) into
# each thread's own scratch on 2 and 3 (a small U, 96 tiles a thread or more); (1, 64, 64, 32, 24), W32's 64-channel branch at batch 1, makes 2 blocks,
# a block a thread on 2 threads, each transforming every panel (24 tiles a thread), and by tiles with
# U shared on 3 (16 tiles a thread; test_plans_fit_the_team); (1, 256, 256, 8, 6) and (8, 256, 256, 8, 6) are W32's weight-bound 8x6 branch at
# batch 1 and 8 (one block, per panel, though at batch 8 its V and Mt spill from L2); (1, 256, 256,
# 40, 44) is weight-bound in F(4x4) with more V and Mt than one block may take (scratch), and not
# weight-bound in F(2x2) (several blocks, scratch).
def plan(x_size, c_out, m, threads, dense=True):
    """conv3x3_winograd's split of a conv: (blocks, splits, tiles a block, per_panel, own_u)."""
    return tuple(torch.ops.hrnet_fast.conv3x3_winograd_plan(list(x_size), c_out, m, dense, threads)[:5])


# W32's branch convs at batch 1 and 8 with the tile optimize() picks (test_choose_tile): on 2 threads
# the splits tuned there; on 16 threads tasks (blocks x splits) for every thread wherever the tiles allow,
# the 64- and 128-channel convs at batch 1 split by tiles as well as panels (they made 8 tasks), and
# no U shared where blocks of 24 tiles times groups of panels fill the team and U is over 640 KB
# (panel groups: the 128-channel conv at batch 8); the 32- and 64-channel convs' smaller U shared.
@pytest.mark.parametrize(
    "x_size,c_out,m,threads,want",
    [
        ((1, 32, 64, 48), 32, 4, 2, (4, 1, 48, False, True)),
        ((1, 64, 32, 24), 64, 4, 2, (2, 1, 24, True, False)),
        ((1, 64, 32, 24), 64, 4, 3, (3, 1, 18, False, False)),
        ((1, 128, 16, 12), 128, 4, 2, (1, 2, 12, True, False)),
        ((1, 256, 8, 6), 256, 2, 2, (1, 2, 12, True, False)),
        ((8, 32, 64, 48), 32, 4, 2, (30, 1, 54, False, True)),
        ((8, 256, 8, 6), 256, 4, 2, (1, 2, 36, True, False)),
        ((1, 32, 64, 48), 32, 4, 16, (16, 1, 12, False, False)),
        ((1, 64, 32, 24), 64, 4, 16, (4, 4, 12, False, False)),
        ((1, 128, 16, 12), 128, 4, 16, (2, 8, 6, True, False)),
        ((1, 256, 8, 6), 256, 2, 16, (1, 16, 12, True, False)),
        ((8, 64, 32, 24), 64, 4, 16, (16, 1, 24, False, False)),
        ((8, 128, 16, 12), 128, 4, 2, (2, 1, 48, True, False)),
        ((8, 128, 16, 12), 128, 4, 16, (4, 4, 24, True, False)),
        ((8, 256, 8, 6), 256, 4, 16, (1, 16, 36, True, False)),
    ],
    ids=str,
)
def test_plan_of_w32s_convs(x_size, c_out, m, threads, want):
    assert winograd.choose_tile(x_size, c_out) == m
    assert plan(x_size, c_out, m, threads) == want


fit_team_restored = restoring("conv3x3_winograd_fit_team")


def busy(x_size, c_out, m, threads):
    """Threads that get a task when each takes a contiguous ceil(tasks / threads) of them, the tasks, and
    the tiles a block."""
    blocks, splits, tb = plan(x_size, c_out, m, threads)[:3]
    tasks = blocks * splits
    chunk = -(-tasks // threads)
    return -(-tasks // chunk), tasks, tb


# HRNets' branch and transition convs (W18 to W64, batch 1 to 16, 256x192 and 512x512 maps) on 3 to 32
# threads: fitted to the team (fit_team), no plan leaves more than a quarter of the threads it could keep
# busy without work (tasks between one and two a thread did: W32's 128-channel 16x12 conv at batch 8
# on 6 threads made 8 tasks for 4 threads), unless its blocks are single micro-kernel rows of 6 tiles,
# which no split makes finer (W32's transition conv at batch 1 on 25 to 31 threads: 32 rows of tiles);
# unfitted, many did. The 2-thread plans are the same either way.
def hrnet_convs():
    for c0 in (18, 32, 48, 64):
        for n in (1, 4, 8, 16):
            for i in range(4):
                yield (n, c0 << i, 64 >> i, 48 >> i), c0 << i
                yield (n, c0 << i, 128 >> i, 128 >> i), c0 << i
            yield (n, 256, 64, 48), c0


def test_plans_fit_the_team(fit_team_restored):
    idle = {}
    for fit in (False, True):
        fit_team_restored(fit)
        idle[fit] = []
        for x_size, c_out in hrnet_convs():
            m = winograd.choose_tile(x_size, c_out)
            for threads in range(3, 33):
                used, tasks, tb = busy(x_size, c_out, m, threads)
                if used * 4 < 3 * min(threads, tasks) and tb > 6:
                    idle[fit].append((x_size, c_out, threads, used, tasks))
    assert idle[True] == [] and len(idle[False]) > 100, (idle[True][:5], len(idle[False]))
    for x_size, c_out in hrnet_convs():
        m = winograd.choose_tile(x_size, c_out)
        fit_team_restored(False)
        before = [plan(x_size, c_out, m, t) for t in (1, 2)]
        fit_team_restored(True)
        assert [plan(x_size, c_out, m, t) for t in (1, 2)] == before, x_size


# The fitted plans by value, and what they were: W32's 64-channel 32x24 conv at batch 1 by tiles with U
# shared on 3 and 4 threads (split by channels: on 3 one thread had 2 of its 4 panels); its 128-channel
# 16x12 conv at batch 8 on 6 threads 3 groups of tiles x 2 of panels (4 x 2: 8 tasks, 4 threads busy);
# the transition's 256 -> 32 conv at batch 1 on 10 threads 8 x 1 (8 x 2: 16 tasks, 8 busy).
@pytest.mark.parametrize(
    "x_size,c_out,threads,unfitted,want",
    [
        ((1, 64, 32, 24), 64, 3, (1, 3, 48, True, False), (3, 1, 18, False, False)),
        ((1, 64, 32, 24), 64, 4, (1, 4, 48, True, False), (4, 1, 12, False, False)),
        ((8, 128, 16, 12), 128, 6, (4, 2, 24, True, False), (3, 2, 36, True, False)),
        ((1, 256, 64, 48), 32, 10, (8, 2, 24, True, False), (8, 1, 24, True, False)),
    ],
    ids=str,
)
def test_fitted_plans(fit_team_restored, x_size, c_out, threads, unfitted, want):
    m = winograd.choose_tile(x_size, c_out)
    assert plan(x_size, c_out, m, threads) == want
    fit_team_restored(False)
    assert plan(x_size, c_out, m, threads) == unfitted


# Each fitted plan computes what the unfitted one did (within float rounding: a block's tiles and a
# task's panels may differ, not the sums) and what a direct conv does, on those teams.
@pytest.mark.parametrize("x_size,c_out,threads", [((1, 64, 32, 24), 64, 3), ((8, 128, 16, 12), 128, 6),
                                                  ((1, 256, 64, 48), 32, 10)], ids=str)
def test_fitted_plans_compute_the_conv(fit_team_restored, x_size, c_out, threads):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(x_size, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, x_size[1], 3, 3, generator=g) * 0.05
    b = torch.randn(c_out, generator=g)
    m = winograd.choose_tile(x_size, c_out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for fit in (False, True):
            fit_team_restored(fit)
            out[fit] = winograd.conv3x3_winograd(x, w, c_out, b, None, True, tile=m)
    finally:
        torch.set_num_threads(before)
    want = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)).float()
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True], want, rtol=1e-4, atol=1e-4)


def test_plan_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="tile must be 2 or 4"):
        plan((1, 8, 4, 4), 8, 3, 2)
    with pytest.raises(RuntimeError, match=r"x_size must be \[N, C_in, H, W\]"):
        plan((1, 8, 4), 8, 2, 2)


# winograd_plan_cost, by hand: multiply-adds of the slowest thread's tasks, each its GEMMs (whole rows
# of 6 tiles, K^2 x C_in x 16 a row and panel, K = 6 for F(4x4)), its tiles' input transform (2 K^3 a
# tile and input channel), its output transform (m K^2 + m^2 K = 240 a tile and output channel) and,
# transformed in the task, its panels' filter transform (16 (9K + 3K^2) = 2592 a panel and input channel).
# One 16-channel 4x4 map: one tile (a row of 6 with padding), one panel, one task:
# 16 x 432 + 6 x 36 x 16 x 16 + 16 x 240 + 16 x 2592 = 6912 + 55296 + 3840 + 41472 = 107520.
# Two panels on one thread: 6912 + 2 x 55296 + 2 x 3840 + 2 x 41472 = 208128; on 2 and on 3 threads a
# panel each (the third idle): 107520. W32's 64-channel 32x24 conv at batch 1 on 3 threads, unfitted
# (fit_team off), 4 panels in parts of 1, 1 and 2: the last 48 x 64 x 432 + 48 x 36 x 64 x 2 x 16 + 48 x
# 2 x 16 x 240 + 2 x 64 x 2592 = 5566464, 0.57 of its 9805824 on one thread, where 3 threads would give
# 0.33 each; fitted, 3 blocks of its 8 rows of tiles (2, 3 and 3) with U shared, transformed a third of
# its input channels each first: the last 18 x 64 x 432 + 18 x 36 x 64 x 4 x 16 + 18 x 64 x 240 + 4 x 64
# x 2592 / 3 = 497664 + 2654208 + 276480 + 221184 = 3649536 (0.37).
@pytest.mark.parametrize(
    "x_size,c_out,threads,fit,want",
    [((1, 16, 4, 4), 16, 1, True, 107520), ((1, 16, 4, 4), 32, 1, True, 208128),
     ((1, 16, 4, 4), 32, 2, True, 107520), ((1, 16, 4, 4), 32, 3, True, 107520),
     ((1, 64, 32, 24), 64, 3, False, 5566464), ((1, 64, 32, 24), 64, 3, True, 3649536)],
    ids=str,
)
def test_plan_cost_by_hand(fit_team_restored, x_size, c_out, threads, fit, want):
    fit_team_restored(fit)
    assert torch.ops.hrnet_fast.conv3x3_winograd_cost(list(x_size), c_out, 4, threads) == want


def test_thread_times_time_each_threads_share():
    """conv3x3_winograd_thread_times runs each thread's share on this thread: a thread with no task (a
    two-panel conv on 3 threads: a panel each for two) takes next to nothing, the others their panel;
    likewise with a plan given, and with the caches evicted before each share."""
    x, w = torch.randn(1, 16, 12, 12), torch.randn(32, 16, 3, 3)
    assert plan((1, 16, 12, 12), 32, 4, 3)[:2] == (1, 2)
    times = torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 4, 3, 5)
    assert len(times) == 3 and min(times[:2]) > 10 * times[2] >= 0
    with pytest.raises(RuntimeError, match="tile must be 2 or 4"):
        torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 3, 3)
    with pytest.raises(RuntimeError, match="threads and repeats must be positive"):
        torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 4, 0)
    # a plan given instead of its own: one block, one split, so one task, on the first thread of 3
    times = torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 4, 3, 5, [1, 1, 1, 0])
    assert times[0] > 10 * max(times[1:])
    with pytest.raises(RuntimeError, match=r"plan must be \[blocks, splits, per_panel, sliced\]"):
        torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 4, 3, 5, [1, 3, 1, 0])  # 2 panels, not 3
    # each share after the caches are evicted (8 MiB streamed through first): still the idle one apart
    times = torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 4, 3, 5, None, 8 << 20)
    assert len(times) == 3 and min(times[:2]) > 10 * times[2] >= 0
    with pytest.raises(RuntimeError, match="evict_bytes must be 0 or more"):
        torch.ops.hrnet_fast.conv3x3_winograd_thread_times(x, w, 4, 3, 5, None, -1)


# More threads than tasks: the tiles are split further (plan_winograd), and a dense weight transformed
# panel by panel in one block (per_panel) is then so in each block of tiles (`wide`): W32's 128-channel
# 16x12 conv at batch 1 on 16 threads, a one-panel conv on 16 and on 8; the 64-channel 32x24 one on 16
# splits into more blocks of a shared U. Here the threads outnumber the cores: that costs time, not bits.
@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize(
    "shape,threads",
    [((1, 128, 128, 16, 12), 16), ((1, 64, 64, 32, 24), 16), ((2, 16, 16, 24, 20), 16), ((1, 32, 16, 13, 11), 8)],
    ids=str,
)
def test_dense_weight_split_by_tiles_to_fill_the_team(m, shape, threads):
    n, cin, cout, h, w = shape
    blocks, splits, _, per_panel, _ = plan((n, cin, h, w), cout, m, threads)
    one_block = plan((n, cin, h, w), cout, m, 1)
    assert blocks * splits > one_block[0] * one_block[1]  # split further than on one thread
    x, weight, b, r = make(shape, seed=5)
    x = x.contiguous(memory_format=CL)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = winograd.conv3x3_winograd(x, winograd.transform_weight(weight, m), cout, b, r, True)
        got = winograd.conv3x3_winograd(x, ihwo(weight), cout, b, r, True, tile=m)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    assert_close_to(got, reference(x, weight, b, r, True), m)


def test_wide_split_keeps_per_panel_transforms():
    """The cases above that reach the wide per-panel path (more than one block, each transforming
    its own panels): so a change to it is seen by the bit comparison."""
    assert plan((1, 128, 16, 12), 128, 4, 16)[::3] == (2, True)
    assert plan((2, 16, 24, 20), 16, 4, 16)[::3] == (10, True)
    assert plan((1, 32, 13, 11), 16, 2, 8)[::3] == (7, True)


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize(
    "shape", SHAPES + [(8, 64, 64, 16, 12), (4, 32, 32, 64, 48), (1, 64, 64, 32, 24), (1, 256, 256, 8, 6), (8, 256, 256, 8, 6), (1, 256, 256, 40, 44)], ids=str
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dense_weight_gives_the_transformed_weights_bits(m, shape, threads):
    """tile=m: the kernel transforms the dense weight itself, in transform_weight's arithmetic, so the
    output is bit for bit the one from the transformed weight, whether the weight is stored OIHW or
    IHWO (read in place), in other strides (copied) or given panel-major (every plan: per-panel, own and
    shared U, split by panels or tiles)."""
    x, weight, b, r = make(shape, seed=11)
    x = x.contiguous(memory_format=CL)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = winograd.conv3x3_winograd(x, winograd.transform_weight(weight, m), shape[2], b, r, True)
        for w in (weight, ihwo(weight), hwio(weight), winograd.panel_major(weight)):
            assert torch.equal(winograd.conv3x3_winograd(x, w, shape[2], b, r, True, tile=m), want)
    finally:
        torch.set_num_threads(before)
    assert_close_to(want, reference(x, weight, b, r, True), m)


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("cout,cin", [(32, 8), (18, 3), (5, 7), (256, 64), (40, 37)])
@pytest.mark.parametrize("layout", ["oihw", "ihwo", "hwio"])
def test_transform_weight_matches_float64(m, cout, cin, layout):
    """winograd_weight (float32, vectorised over output channels) against G w G^T in float64, rounded
    once: a few ulps apart at most, and the same bits from every layout of the weight (OIHW read in
    blocks transposed in registers, IHWO a line at a time, others copied to OIHW); the padded output
    channels are exactly zero."""
    w = torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(12))
    u = winograd.transform_weight({"oihw": w, "ihwo": ihwo(w), "hwio": hwio(w)}[layout], m)
    assert torch.equal(u, winograd.transform_weight(ihwo(w), m))
    want = winograd.transform_weight_reference(w.double(), m)
    assert u.shape == want.shape == ((m + 2) ** 2, -(-cout // 16), cin, 16)
    torch.testing.assert_close(u.double(), want, rtol=0, atol=1e-6 * want.abs().max().item())
    assert not u[:, -1, :, (cout - 1) % 16 + 1 :].any()


@pytest.mark.parametrize("cout,cin", [(32, 8), (18, 3), (5, 7)])
def test_panel_major_layout(cout, cin):
    """panel_major(w)[j, ci, kh, kw, lane] is w[16 j + lane, ci, kh, kw], zero past C_out, and
    from_panel_major takes it back."""
    w = torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(4))
    p = winograd.panel_major(w)
    assert p.shape == (-(-cout // 16), cin, 3, 3, 16) and p.is_contiguous()
    for o in range(p.shape[0] * 16):
        want = w[o] if o < cout else torch.zeros(cin, 3, 3)
        assert torch.equal(p[o // 16, :, :, :, o % 16], want)
    assert torch.equal(winograd.from_panel_major(p, cout), w)


def test_transform_weight_layout():
    """U[p, j, c, o'] = (G w[16 j + o', c] G^T)[p] for F(2x2,3x3), with G written out by hand."""
    w = torch.randn(32, 8, 3, 3, dtype=torch.float64)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    u = winograd.transform_weight(w.float(), 2)
    assert u.shape == (16, 2, 8, 16)
    o, c = 21, 5
    expected = (g @ w[o, c] @ g.T).reshape(16)
    torch.testing.assert_close(u[:, o // 16, c, o % 16].double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "x_shape,c_out,m",
    [
        ((1, 256, 8, 6), 256, 2),  # W32 batch 1, branch 4: 4 tiles, 9.4 MB of F(4x4) weight
        ((1, 128, 16, 12), 128, 4),  # branch 3: 12 tiles, 2.4 MB
        ((8, 256, 8, 6), 256, 4),  # batch 8: 32 tiles
        ((1, 32, 64, 48), 32, 4),
    ],
)
def test_choose_tile(x_shape, c_out, m):
    assert winograd.choose_tile(x_shape, c_out) == m


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("shape", [(2, 5, 18, 7, 9), (1, 8, 16, 1, 1), (1, 3, 20, 8, 8)], ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dense", [False, True, "panels"], ids=["transformed", "dense", "panel-major"])
def test_gradients_match_direct_convolution(m, shape, relu, dense):
    """x, bias and residual get direct convolution's gradients; the transformed weight's, taken back
    through the filter transform (weight_grad_to_dense), is direct convolution's weight gradient, and
    a dense weight (tile=m) gets that directly (panel-major: that gradient panel-major, its padded
    output channels zero)."""
    x, weight, b, r = make(shape, seed=8)
    w_in = weight if dense is True else winograd.panel_major(weight) if dense else winograd.transform_weight(weight, m)
    leaves = [t.clone().requires_grad_() for t in (x, w_in, b, r)]
    y = winograd.conv3x3_winograd(leaves[0], leaves[1], shape[2], leaves[2], leaves[3], relu, tile=m if dense else 0)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    y.backward(dy)
    exact = [t.double().requires_grad_() for t in (x, weight, b, r)]
    references.conv_bias_act(exact[0], exact[1], exact[2], 1, 1, exact[3], relu).backward(dy.double())
    if dense == "panels":
        assert not leaves[1].grad.permute(0, 4, 1, 2, 3).flatten(0, 1)[shape[2]:].any()
        w_grad = winograd.from_panel_major(leaves[1].grad, shape[2])
    else:
        w_grad = leaves[1].grad if dense else winograd.weight_grad_to_dense(leaves[1].grad, shape[2])
    got = [leaves[0].grad, w_grad, leaves[2].grad, leaves[3].grad]
    for g, e in zip(got, exact):
        assert g.shape == e.shape
        assert_close_to(g, e.grad, m)


@pytest.mark.parametrize("m", winograd.TILES)
def test_backward_is_the_kernels_adjoint(m):
    """Without bias, residual and ReLU the op is linear in x and in the transformed weight U apart, so
    <dy, op(p, U)> = <dx, p> and <dy, op(x, q)> = <dU, q> for any p and q: q need not be a
    transformed 3x3 weight, and its padded output channels (which the op ignores) get zero."""
    n, cin, cout, h, w = 2, 6, 20, 9, 7
    g = torch.Generator().manual_seed(10)
    x, p = torch.randn(n, cin, h, w, generator=g), torch.randn(n, cin, h, w, generator=g)
    u = winograd.transform_weight(torch.randn(cout, cin, 3, 3, generator=g), m)
    q = torch.randn(u.shape, generator=g)
    dy = torch.randn(n, cout, h, w, generator=g)
    xl, ul = x.clone().requires_grad_(), u.clone().requires_grad_()
    winograd.conv3x3_winograd(xl, ul, cout, None, None, False).backward(dy)
    dot = lambda a, b: (a.double() * b.double()).sum().item()  # noqa: E731
    for lhs, rhs in [(dot(dy, winograd.conv3x3_winograd(p, u, cout, None, None, False)), dot(xl.grad, p)),
                     (dot(dy, winograd.conv3x3_winograd(x, q, cout, None, None, False)), dot(ul.grad, q))]:
        assert abs(lhs - rhs) <= 1e-5 * abs(rhs), (lhs, rhs)
    assert not ul.grad[:, -1, :, cout % winograd.PANEL :].any()


def test_opcheck():
    x, weight, b, r = make((2, 8, 16, 5, 4))
    u = winograd.transform_weight(weight, 4)
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (x.contiguous(memory_format=CL), u, 16, b, r, True))
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (x, u, 16, None, None, False))
    x, weight, b, r = make((1, 18, 36, 5, 4))
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (x, winograd.transform_weight(weight, 4), 36, b, r, True))
    x, weight, b, r = make((2, 5, 18, 6, 7))  # with gradients: autograd registration and AOT autograd
    args = [t.requires_grad_() for t in (x, winograd.transform_weight(weight, 2), b, r)]
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (args[0], args[1], 18, args[2], args[3], True))
    # a dense weight, transformed by the kernel (tile=m), with and without gradients
    x, weight, b, r = make((2, 5, 18, 6, 7), seed=1)
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (x, ihwo(weight), 18, b, r, True, 4))
    args = [t.requires_grad_() for t in (x, weight, b, r)]
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (args[0], args[1], 18, args[2], args[3], True, 2))
    args = [t.detach().requires_grad_() for t in (x, winograd.panel_major(weight), b, r)]  # panel-major
    torch.library.opcheck(torch.ops.hrnet_fast.conv3x3_winograd.default, (args[0], args[1], 18, args[2], args[3], True, 4))
    torch.library.opcheck(torch.ops.hrnet_fast.winograd_weight.default, (weight.detach(), 4))


def test_torch_compile_fullgraph():
    x, weight, b, r = make((1, 8, 16, 6, 6))
    u = winograd.transform_weight(weight, 4)
    fn = torch.compile(lambda x, r: torch.ops.hrnet_fast.conv3x3_winograd(x, u, 16, b, r, True), fullgraph=True)
    assert_close_to(fn(x, r), reference(x, weight, b, r, True), 4)
    w = ihwo(weight)
    fn = torch.compile(lambda x, r: torch.ops.hrnet_fast.conv3x3_winograd(x, w, 16, b, r, True, 2), fullgraph=True)
    assert_close_to(fn(x, r), reference(x, weight, b, r, True), 2)


def _bad_calls():
    x, weight, b, r = make((1, 8, 16, 4, 4))
    u = winograd.transform_weight(weight, 4)
    ops = torch.ops.hrnet_fast
    return [
        (lambda: winograd.conv3x3_winograd(x, weight, 16, b, r), ValueError, "transformed weight"),
        (lambda: winograd.conv3x3_winograd(x[:, :7], u, 16, b, r), ValueError, "transformed for 8 input channels, x has 7"),
        (lambda: winograd.conv3x3_winograd(x, u, 17, b, r), ValueError, "out_channels=17 does not fit"),
        (lambda: winograd.conv3x3_winograd(x, u, 16, b[:3], r), ValueError, r"bias must have shape \(16,\)"),
        (lambda: winograd.conv3x3_winograd(x, u, 16, b, r[:, :3]), ValueError, "residual must have the output's shape"),
        (lambda: winograd.conv3x3_winograd(x.double(), u.double(), 16, b.double(), r.double()), ValueError, "float32 CPU only"),
        (lambda: winograd.conv3x3_winograd(x, u, 16, b.double(), r), RuntimeError, "bias has dtype torch.float64"),
        (lambda: winograd.transform_weight(weight, 3), ValueError, "m .* must be one of"),
        (lambda: winograd.transform_weight(torch.randn(16, 8, 5, 5)), ValueError, "needs a 3x3 kernel"),
        (lambda: winograd.transform_weight(weight.double()), ValueError, "float32 CPU only"),
        # the op itself checks as well, for callers that skip the Python wrapper
        (lambda: ops.conv3x3_winograd(x, weight, 16, b, r, True), RuntimeError, "transformed weight"),
        (lambda: ops.conv3x3_winograd(x[:, :7], u, 16, b, r, True), RuntimeError, "for 8 input channels, x has 7"),
        (lambda: ops.conv3x3_winograd(x, u, 0, None, None, True), RuntimeError, "out_channels=0 does not fit"),
        (lambda: ops.conv3x3_winograd(x, u, 16, b, r[:, :3], True), RuntimeError, "output's shape"),
        (lambda: ops.conv3x3_winograd(x, u, 16, b[:3], r, True), RuntimeError, "bias must be"),
        # a dense weight (tile=m)
        (lambda: winograd.conv3x3_winograd(x, weight, 16, b, r, tile=3), ValueError, r"tile must be one of \(2, 4\)"),
        (lambda: winograd.conv3x3_winograd(x, weight[:8], 16, b, r, tile=2), ValueError,
         r"dense 3x3 weight \[16, 8, 3, 3\] or its panel_major \[1, 8, 3, 3, 16\]"),
        (lambda: winograd.conv3x3_winograd(x, u, 16, b, r, tile=4), ValueError, r"dense 3x3 weight \[16, 8, 3, 3\]"),
        (lambda: winograd.conv3x3_winograd(x[:, :7], weight, 16, b, r, tile=2), ValueError,
         r"\[16, 7, 3, 3\] .*\(x has 7 channels\), got shape \(16, 8, 3, 3\)"),
        (lambda: winograd.conv3x3_winograd(x, winograd.panel_major(weight)[..., :8], 16, b, r, tile=2), ValueError,
         r"panel_major \[1, 8, 3, 3, 16\] \(x has 8 channels\), got shape \(1, 8, 3, 3, 8\)"),
        (lambda: ops.conv3x3_winograd(x, weight, 16, b, r, True, 3), RuntimeError, "tile must be 2 or 4"),
        (lambda: ops.conv3x3_winograd(x, u, 16, b, r, True, 2), RuntimeError,
         r"dense 3x3 weight \[16, 8, 3, 3\] \(or panel-major \[1, 8, 3, 3, 16\]\)"),
        (lambda: ops.conv3x3_winograd(x[:, :7], weight, 16, b, r, True, 4), RuntimeError, r"dense 3x3 weight \[16, 7, 3, 3\]"),
        (lambda: ops.conv3x3_winograd(x, winograd.panel_major(weight).transpose(1, 2), 16, b, r, True, 4), RuntimeError,
         r"panel-major 3x3 weight \[1, 8, 3, 3, 16\] .*got \[1, 3, 8, 3, 16\]"),
        (lambda: ops.conv3x3_winograd(x, winograd.panel_major(weight).transpose(2, 3), 16, b, r, True, 4), RuntimeError,
         r"\(not contiguous\)"),
        (lambda: ops.winograd_weight(weight, 3), RuntimeError, r"m \(the output tile size\) must be 2 or 4, got 3"),
        (lambda: ops.winograd_weight(torch.randn(16, 8, 5, 5), 2), RuntimeError, r"3x3 conv weight \[C_out, C_in, 3, 3\]"),
        (lambda: ops.winograd_weight(weight.double(), 2), RuntimeError, "dense float32 CPU tensor"),
    ]


@pytest.mark.parametrize("call,exc,msg", _bad_calls())
def test_bad_input_raises(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def _tiles_reading(p: int, m: int, size: int) -> range:
    """Output rows (or columns) of every m-tile whose (m+2)-wide input window holds input index p."""
    first = max(0, (p - 2) // m) if p >= 2 else 0
    last = min((size - 1) // m, (p + 1) // m)
    return range(first * m, min(size, (last + 1) * m))


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [(0, 0), (3, 4), (4, 3), (5, 8), (9, 9)], ids=str)
def test_non_finite_inputs_reach_a_superset_of_eagers_outputs(m, value, pos):
    """Where eager's output is NaN or +-Inf, ours is NaN or +-Inf too; ours may be NaN further out,
    but only within the output tiles whose input window holds the bad pixel (documented in the README)."""
    x, weight, b, r = make((1, 8, 16, 10, 10), seed=7)
    x[0, 2, pos[0], pos[1]] = value
    u = winograd.transform_weight(weight, m)
    out = winograd.conv3x3_winograd(x.contiguous(memory_format=CL), u, 16, b, r.contiguous(memory_format=CL), True)
    eager = conv_bias_act_reference(x, weight, b, [1, 1], [1, 1], r, True)
    bad_eager, bad_ours = ~torch.isfinite(eager), ~torch.isfinite(out)
    assert bad_eager.any()
    assert not (bad_eager & ~bad_ours).any(), "a non-finite eager output came out finite"
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    rows, cols = _tiles_reading(pos[0], m, 10), _tiles_reading(pos[1], m, 10)
    allowed[rows.start : rows.stop, cols.start : cols.stop] = True
    assert not (bad_ours[0] & ~allowed).any(), "non-finite outside the tiles that read the pixel"
    torch.testing.assert_close(out[:, :, ~allowed], eager[:, :, ~allowed], rtol=1e-4, atol=1e-4)


fill_team_restored = restoring("conv3x3_winograd_fill_team")


def test_fill_team_switch(fill_team_restored):
    """conv3x3_winograd_fill_team(False) gives back the split without filling the team (8 tasks for W32's
    128-channel 16x12 conv at batch 1 on 16 threads): another split, the same bits."""
    switch = fill_team_restored
    x, weight, b, r = make((1, 128, 128, 16, 12), seed=3)
    x = x.contiguous(memory_format=CL)
    before = torch.get_num_threads()
    torch.set_num_threads(16)
    try:
        outs = {}
        for on in (True, False):
            assert switch(on) is on
            outs[on] = (plan((1, 128, 16, 12), 128, 4, 16), winograd.conv3x3_winograd(x, ihwo(weight), 128, b, r, True, tile=4))
    finally:
        torch.set_num_threads(before)
    assert outs[True][0][:2] == (2, 8) and outs[False][0][:2] == (1, 8)
    assert torch.equal(outs[True][1], outs[False][1])


@pytest.mark.parametrize("batch", [1, 8])
def test_fill_team_leaves_w32s_two_thread_splits(batch, fill_team_restored):
    """On 2 threads (what the splits were tuned on) no W32 branch conv's split depends on the switch."""
    switch = fill_team_restored
    for c, h, w in ((32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6), (64, 64, 48)):
        x_size = (batch, c, h, w)
        m = winograd.choose_tile(x_size, c)
        splits = set()
        for on in (True, False):
            switch(on)
            splits.add(plan(x_size, c, m, 2))
        assert len(splits) == 1, (x_size, splits)


own_panels_restored = restoring("conv3x3_winograd_own_panels")


@pytest.mark.parametrize(
    "x_size,threads,on,off",
    [((8, 128, 16, 12), 2, (2, 1, 48, True, False), (2, 1, 48, False, False)),  # else U shared
     ((1, 64, 32, 24), 2, (2, 1, 24, True, False), (1, 2, 48, True, False)),  # else split by channels
     ((8, 128, 16, 12), 8, (4, 2, 24, True, False), (8, 1, 12, False, False)),  # panel groups, else U shared
     ((1, 32, 64, 48), 8, (8, 1, 24, False, False), (8, 1, 24, False, False))],  # small U: shared either way
    ids=str,
)
def test_own_panels_switch(x_size, threads, on, off, own_panels_restored):
    """conv3x3_winograd_own_panels(False) gives back the split without a block of tiles a thread (or a
    group of panels of a block: panel groups), each transforming its panels: W32's 128-channel conv at
    batch 8 then transforms U once into shared scratch, its 64-channel one at batch 1 is split by
    channels. On more than 2 threads a U of at most 640 KB (its 32-channel conv at batch 1) is shared
    either way. Another split, the same bits."""
    switch = own_panels_restored
    c = x_size[1]
    x, weight, b, r = make((x_size[0], c, c, *x_size[2:]), seed=7)
    x = x.contiguous(memory_format=CL)
    outs = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for state in (True, False):
            assert switch(state) is state
            outs[state] = (plan(x_size, c, 4, threads), winograd.conv3x3_winograd(x, ihwo(weight), c, b, r, True, tile=4))
    finally:
        torch.set_num_threads(before)
    assert outs[True][0] == on and outs[False][0] == off
    assert torch.equal(outs[True][1], outs[False][1])


four_panels_restored = restoring("conv3x3_winograd_four_panels")


# Four weight panels a GEMM call (where the GEMM is 16 lanes) where U is whole before the tasks: a
# given U, and a dense weight's U transformed up front (shared on 1 thread, each thread's own on 2);
# output channels making three, four, five (four and one) and six (four and two) panels. The same bits
# as two panels a call, and the reference's answer.
@pytest.mark.parametrize("cout", [48, 64, 80, 96])
@pytest.mark.parametrize("given_u", [True, False], ids=["given U", "dense"])
@pytest.mark.parametrize("threads", [1, 2])
def test_four_panels_a_call(cout, given_u, threads, four_panels_restored):
    switch = four_panels_restored
    x, weight, b, r = make((4, 24, cout, 32, 24), seed=11)
    x = x.contiguous(memory_format=CL)
    w = winograd.transform_weight(weight, 4) if given_u else ihwo(weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not given_u:  # U transformed before the tasks (shared, or each thread's own), not per panel
            assert plan((4, 24, 32, 24), cout, 4, threads)[3:] == (False, threads == 2)
        outs = {}
        for state in (True, False):
            assert switch(state) is state
            outs[state] = winograd.conv3x3_winograd(x, w, cout, b, r, True, **({} if given_u else {"tile": 4}))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[True], outs[False])
    assert_close_to(outs[True], reference(x, weight, b, r, True), 4)
