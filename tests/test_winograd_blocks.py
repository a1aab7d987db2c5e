"""winograd_blocks (csrc/cpu/winograd_blocks.cpp, hrnet_fast/ops/basic_blocks.py): a chain of BasicBlocks
in one op gives the bits of the conv3x3_winograd calls it replaces, on every thread count and split; its
checks, fake and autograd; and WinogradBlocks, the branch module optimize() makes of it."""
from __future__ import annotations

import itertools

import pickle

import pytest
import torch
from torch import nn

import hrnet_fast
import hrnet_fast.profile
from hrnet_fast import _extension
from hrnet_fast.fused.blocks import WinogradBlocks
from hrnet_fast.ops import winograd, winograd_blocks
from hrnet_fast.ops.basic_blocks import winograd_blocks_reference as reference
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import randomize_bn, restoring

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("winograd_blocks", "CPU"), reason="needs the compiled extension"
)
CL = torch.channels_last


def make(n, c, h, w, blocks, seed=0, ihwo=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    ws = [torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5) for _ in range(2 * blocks)]
    if ihwo:  # stored [C_in, 3, 3, C_out], as optimize() keeps them
        ws = [w.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2) for w in ws]
    bs = [torch.randn(c, generator=g) * 0.1 for _ in range(2 * blocks)]
    return x, ws, bs


def with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


# W32's four branches at batch 1 (four blocks each), its 128-channel one at batch 8 (on 2 threads a block of
# tiles a thread, each transforming every panel; on 16, 4 x 4 tasks of a block and 2 panels), W48's
# 96-channel one at batch 1 (a block a thread on 2) and 8 (on 2 threads its U transformed up front into
# shared scratch, a region a conv), odd sizes and channel counts, one block.
@pytest.mark.parametrize(
    "shape", [(1, 32, 64, 48, 4), (1, 64, 32, 24, 4), (1, 128, 16, 12, 4), (1, 256, 8, 6, 4), (8, 128, 16, 12, 1),
              (1, 96, 32, 24, 1), (8, 96, 32, 24, 1), (2, 24, 13, 11, 3), (1, 16, 5, 7, 1)], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_same_bits_as_the_conv_calls(shape, threads):
    n, c, h, w, blocks = shape
    x, ws, bs = make(n, c, h, w, blocks)
    m = winograd.choose_tile(x.shape, c)
    got, want = with_threads(threads, lambda: (winograd_blocks(x, ws, bs, m), reference(x, ws, bs, m)))
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, want)
    # the weights panel-major (as optimize() hands the kernels; every other one, to mix the layouts)
    mixed = [winograd.panel_major(w) if i % 2 == 0 or blocks == 1 else w for i, w in enumerate(ws)]
    assert torch.equal(with_threads(threads, lambda: winograd_blocks(x, mixed, bs, m)), want)


def test_a_split_with_shared_u_is_covered():
    """The (8, 96, 32, 24) case above on 2 threads takes the path whose U is transformed up front."""
    blocks, splits, _, per_panel, own_u = torch.ops.hrnet_fast.conv3x3_winograd_plan(
        [8, 96, 32, 24], 96, winograd.choose_tile((8, 96, 32, 24), 96), True, 2)[:5]
    assert not per_panel and not own_u and blocks * splits > 1


@pytest.mark.parametrize("tile", winograd.TILES)
def test_any_tile_nchw_and_oihw(tile):
    """Either tile, an NCHW input (NCHW output) and OIHW-stored weights give the calls' bits too."""
    x, ws, bs = make(2, 16, 9, 10, 2, seed=3, ihwo=False)
    x = x.contiguous()
    got = winograd_blocks(x, ws, bs, tile)
    assert got.is_contiguous() and torch.equal(got, reference(x, ws, bs, tile))


def test_matches_direct_convolution():
    x, ws, bs = make(1, 16, 12, 12, 2, seed=4)
    want = x.double()
    for k in range(0, 4, 2):
        h = torch.relu(nn.functional.conv2d(want, ws[k].double(), bs[k].double(), padding=1))
        want = torch.relu(nn.functional.conv2d(h, ws[k + 1].double(), bs[k + 1].double(), padding=1) + want)
    got = winograd_blocks(x, ws, bs, 4)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_bad_input_says_what_was_expected():
    x, ws, bs = make(1, 16, 8, 8, 1)
    with pytest.raises(ValueError, match="two a block"):
        winograd_blocks(x, ws[:1], bs[:1], 4)
    with pytest.raises(ValueError, match=r"weights\[1\] must be the dense 3x3 weight \[16, 16, 3, 3\]"):
        winograd_blocks(x, [ws[0], torch.randn(8, 16, 3, 3)], bs, 4)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_blocks(x, ws, bs, 3)
    with pytest.raises(ValueError, match="float32 CPU only"):
        winograd_blocks(x.double(), [w.double() for w in ws], [b.double() for b in bs], 4)
    with pytest.raises(RuntimeError, match=r"biases\[0\] must be a float32 CPU tensor of shape \[16\]"):
        torch.ops.hrnet_fast.winograd_blocks(x, ws, [torch.randn(8), bs[1]], 4)
    with pytest.raises(RuntimeError, match="an even number"):
        torch.ops.hrnet_fast.winograd_blocks(x, ws[:1], bs[:1], 4)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
@pytest.mark.parametrize("panels", [False, True], ids=["oihw", "panel-major"])
def test_opcheck(grad, panels):
    x, ws, bs = make(1, 16, 8, 8, 2, seed=5)
    if panels:
        ws = [winograd.panel_major(w) for w in ws]
    args = (x, ws, bs, 4)
    if grad:
        leaves = [w.clone().requires_grad_() for w in ws], [b.clone().requires_grad_() for b in bs]
        args = (x.clone().requires_grad_(), *leaves, 4)
    torch.library.opcheck(torch.ops.hrnet_fast.winograd_blocks.default, args)


def test_gradients_are_the_calls_gradients():
    x, ws, bs = make(1, 16, 8, 8, 2, seed=6)
    dy = torch.randn(1, 16, 8, 8)
    grads = []
    for fn in (winograd_blocks, reference):
        leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for t in (*ws, *bs)]
        fn(leaves[0], leaves[1:5], leaves[5:], 2).backward(dy)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, WinogradBlocks)]


@pytest.mark.parametrize("winograd_on", [True, False], ids=["winograd", "no_winograd"])
def test_optimize_runs_branches_as_one_op(winograd_on):
    """optimize() makes each BasicBlock branch a WinogradBlocks: one winograd_blocks call a branch where its
    convs run Winograd (block by block otherwise), the same state_dict keys, the same bits as block by block."""
    model = randomize_bn(tiny_pose_hrnet()).eval()
    one = hrnet_fast.optimize(model, backend="cpu", winograd=winograd_on)
    each = hrnet_fast.optimize(model, backend="cpu", winograd=winograd_on)
    for m in _blocks(each):
        m.one_op = False
    assert _blocks(one) and list(one.state_dict()) == list(each.state_dict())
    # the branches' keys are the Sequential's (WinogradBlocks keeps its children's names)
    assert any(k.startswith("stage2.0.branches.0.0.") for k in one.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out, out_each, ref = one(x), each(x), model(x)
    assert torch.equal(out, out_each)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    counts = hrnet_fast.profile.count_ops(one, x)["by_op"]
    ours = counts.get("hrnet_fast::winograd_blocks", 0) + counts.get("hrnet_fast::winograd_branches", 0)
    assert (ours > 0) == winograd_on


def test_branch_follows_reloaded_weights_and_pickles():
    """A branch run as one op reads the weights the model holds now (load_state_dict of another optimized
    model's), and a pickled copy (one_op kept) gives the same output."""
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fast = hrnet_fast.optimize(model, backend="cpu")
    other = randomize_bn(tiny_pose_hrnet(), seed=7).eval()
    x0 = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fast(x0)  # the CPU graph and the derived weights made for the old weights
    fast.load_state_dict(hrnet_fast.optimize(other, backend="cpu").state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref, out = other(x), fast(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    copy = pickle.loads(pickle.dumps(fast))
    assert _blocks(copy) and all(m.one_op for m in _blocks(copy))
    with torch.inference_mode():
        assert torch.equal(copy(x), out)


@pytest.mark.parametrize("shape", [(0, 16, 8, 8, 1), (1, 16, 1, 1, 2), (3, 16, 2, 9, 2)], ids=str)
@pytest.mark.parametrize("threads", [1, 5])
def test_edge_shapes(shape, threads):
    """An empty batch, a 1x1 image, images narrower than a tile: the calls' bits on any thread count."""
    n, c, h, w, blocks = shape
    x, ws, bs = make(n, c, h, w, blocks, seed=9)
    for tile in winograd.TILES:
        got, want = with_threads(threads, lambda: (winograd_blocks(x, ws, bs, tile), reference(x, ws, bs, tile)))
        assert got.shape == (n, c, h, w) and torch.equal(got, want)


def test_strided_view_and_nan():
    """A strided view of an input (copied to channels_last first) and a NaN pixel: as the calls."""
    _, ws, bs = make(1, 16, 10, 10, 1, seed=10)
    x = torch.randn(1, 32, 10, 10)[:, ::2]
    assert torch.equal(winograd_blocks(x, ws, bs, 4), reference(x, ws, bs, 4))
    x = x.contiguous()
    x[0, 3, 2, 2] = float("nan")
    got, want = winograd_blocks(x, ws, bs, 4), reference(x, ws, bs, 4)
    assert got.isnan().any() and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


# winograd_branches: an HR module's branches in one op, side by side on shares of the threads where each
# gets two or more (here threads outnumber the cores: that costs time, not bits).
def make_branches(n, shapes, blocks=2, seed=0):
    xs, ws, bs = [], [], []
    for k, (c, h, w) in enumerate(shapes):
        x, w_, b_ = make(n, c, h, w, blocks, seed=seed + k)
        xs.append(x)
        ws.append(w_)
        bs.append(b_)
    return xs, ws, bs, [winograd.choose_tile(x.shape, x.shape[1]) for x in xs]


W32_B1 = [(32, 64, 48), (64, 32, 24), (128, 16, 12), (256, 8, 6)]


side_by_side_restored = restoring("winograd_branches_side_by_side")
lanes_restored = restoring("winograd_branches_lanes")
split_restored = restoring("winograd_branches_split")
share_restored = restoring("winograd_branches_share_tail")
model_split_restored = restoring("winograd_branches_model_split")


@pytest.mark.parametrize(
    "n,shapes",
    [(1, W32_B1), (1, W32_B1[:3]), (2, [(16, 16, 12), (32, 8, 6)]), (8, [(16, 8, 8), (128, 1, 1)])],
    ids=str,
)
@pytest.mark.parametrize("threads", [1, 2, 4, 8, 12, 16])
def test_branches_same_bits_as_one_call_a_branch(n, shapes, threads, side_by_side_restored, lanes_restored):
    """On 2 threads in two lanes (the last branch on one thread, the others one after another on the
    other, the first's chain split between them where measured so; with lanes off, the first two side
    by side, the others after them on both); on 4 and more side by side (2 branches on 4 threads, 4 on 8,
    12 and 16, W32's at batch 1 as 3 + 2 + 3 + 4 and 3 + 4 + 3 + 6; 3 on 16 as 6 + 5 + 5), where a branch
    whose U is transformed up front (W32's 32-channel one at batch 1 on a sub-team of 2 to 8) has its
    sub-team transform it a share each. The bits of one winograd_blocks call a branch, with side by side
    and lanes switched on or off."""
    xs, ws, bs, tiles = make_branches(n, shapes)
    want = [winograd_blocks(x, w, b, t) for x, w, b, t in zip(xs, ws, bs, tiles)]
    for on, lanes in ((True, True), (True, False), (False, True)):
        side_by_side_restored(on)
        lanes_restored(lanes)
        got = with_threads(threads, lambda: hrnet_fast.ops.winograd_branches(xs, ws, bs, tiles))
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    panels = [[winograd.panel_major(w) for w in b] for b in ws]  # as optimize() hands the kernels
    got = with_threads(threads, lambda: hrnet_fast.ops.winograd_branches(xs, panels, bs, tiles))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def branch_teams(n, shapes, threads, tiles=None):
    """winograd_branches_plan for branches of 8 convs, each tile as optimize() chooses it unless given."""
    sizes = [[n, c, h, w] for c, h, w in shapes]
    tiles = tiles or [winograd.choose_tile(s, s[1]) for s in sizes]
    return torch.ops.hrnet_fast.winograd_branches_plan(sizes, [8] * len(shapes), threads, tiles)


def test_branch_teams(side_by_side_restored, lanes_restored, split_restored, model_split_restored):
    """Where the branches run side by side and on how many threads (0: after those, on all of them).
    On 2 threads every branch on a thread (in two lanes, the first branch's chain split between them),
    at any size; with that split off, the first two, a thread each, while each conv of theirs is at most
    60 M multiply-adds (W32 at batch 1: 28 M; batch 2: 57 M; batch 4: 113 M and W48 at batch 1: 64 M,
    left one after another), four such all (in two lanes: the last alone); on 3, one after another;
    from 2 a branch, shares of the threads by work."""
    assert branch_teams(1, W32_B1, 2) == [1, 1, 1, 1]
    assert branch_teams(1, W32_B1[:3], 2) == [1, 1, 1]
    assert branch_teams(4, W32_B1, 2) == [1, 1, 1, 1]
    assert branch_teams(1, [(48, 64, 48), (96, 32, 24)], 2) == [1, 1]  # W48
    split_restored(False)
    assert branch_teams(1, W32_B1, 2) == [1, 1, 1, 1]
    assert branch_teams(2, W32_B1, 2) == [1, 1, 1, 1]
    assert branch_teams(1, W32_B1[:3], 2) == [1, 1, 0]
    lanes_restored(False)
    assert branch_teams(1, W32_B1, 2) == [1, 1, 0, 0]
    lanes_restored(True)
    assert branch_teams(2, W32_B1[:2], 2) == [1, 1]
    assert branch_teams(4, W32_B1, 2) == [0, 0, 0, 0]
    assert branch_teams(1, [(48, 64, 48), (96, 32, 24)], 2) == [0, 0]  # W48
    split_restored(True)
    assert branch_teams(1, W32_B1[:3], 3) == [0, 0, 0]
    assert branch_teams(1, W32_B1, 4) == [0, 0, 0, 0]
    assert branch_teams(1, W32_B1[:2], 4) == [2, 2]
    assert branch_teams(1, W32_B1, 8) == [2, 2, 2, 2]
    assert branch_teams(1, W32_B1[:1], 2) == [0]
    # From 2 threads a branch, by the plans' modelled cost (model_split): W32's four branches at batch 1 on
    # 16 threads 3 + 3 + 4 + 6 (its 256-channel 8x6 branch's F(2x2) convs 1.78x the others' GEMM work;
    # the 64-channel 32x24 conv by tiles on 3 threads as well as 4: test_fitted_plans), its three 4 + 4 +
    # 8, on 12 3 + 2 + 3 + 4; at batch 8 on 24 6 + 5 + 5 + 8; where the multiply-add split is modelled
    # within 5% of the best it is kept (at batch 8 on 16).
    assert branch_teams(1, W32_B1[:3], 16) == [4, 4, 8]
    assert branch_teams(1, W32_B1, 16, [4, 4, 4, 2]) == [3, 3, 4, 6]
    assert branch_teams(1, W32_B1, 12, [4, 4, 4, 2]) == [3, 2, 3, 4]
    assert branch_teams(8, W32_B1, 16, [4, 4, 4, 4]) == [4, 4, 4, 4]
    assert branch_teams(8, W32_B1, 24, [4, 4, 4, 4]) == [6, 5, 5, 8]
    model_split_restored(False)  # by the direct convs' multiply-adds: equal for W32, whatever the tiles
    assert branch_teams(1, W32_B1, 16, [4, 4, 4, 2]) == [4, 4, 4, 4]
    assert branch_teams(8, W32_B1, 24, [4, 4, 4, 4]) == [6, 6, 6, 6]
    model_split_restored(True)
    side_by_side_restored(False)
    assert branch_teams(1, W32_B1, 2) == [0, 0, 0, 0] and branch_teams(1, W32_B1, 8) == [0, 0, 0, 0]
    with pytest.raises(RuntimeError, match=r"each x size must be \[N, C, H, W\]"):
        torch.ops.hrnet_fast.winograd_branches_plan([[1, 8, 4]], [2], 2)
    with pytest.raises(RuntimeError, match="one a branch"):
        torch.ops.hrnet_fast.winograd_branches_plan([[1, 8, 4, 4]], [2, 2], 2)
    with pytest.raises(RuntimeError, match="tiles must be one a branch"):
        torch.ops.hrnet_fast.winograd_branches_plan([[1, 8, 4, 4]], [2], 2, [4, 4])
    with pytest.raises(RuntimeError, match="tiles must be 2 or 4, got 3"):
        torch.ops.hrnet_fast.winograd_branches_plan([[1, 8, 4, 4]], [2], 2, [3])


def compositions(threads, parts):
    """Every split of `threads` into `parts` shares of at least one, in order."""
    for cuts in itertools.combinations(range(1, threads), parts - 1):
        yield [b - a for a, b in zip((0, *cuts), (*cuts, threads))]


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("branches,threads", [(2, 12), (3, 16), (4, 8), (4, 16), (4, 24), (3, 32)])
def test_model_split_is_the_modelled_best(n, branches, threads):
    """The split side by side against every split, each branch's 8 convs costed by the op's own model
    (conv3x3_winograd_cost): the least time of the slowest branch, or the multiply-add split where that
    is modelled within 5% of it."""
    shapes = W32_B1[:branches]
    sizes = [[n, c, h, w] for c, h, w in shapes]
    tiles = [winograd.choose_tile(s, s[1]) for s in sizes]

    def slowest(split):
        cost = torch.ops.hrnet_fast.conv3x3_winograd_cost
        return max(8 * cost(s, s[1], m, t) for s, m, t in zip(sizes, tiles, split))

    best = min(slowest(s) for s in compositions(threads, branches))
    by_macs = [threads // branches + (b < threads % branches) for b in range(branches)]  # W32's are equal
    got = branch_teams(n, shapes, threads, tiles)
    assert sum(got) == threads and min(got) >= 1
    if slowest(by_macs) <= 1.05 * best:
        assert got == by_macs
    else:
        assert slowest(got) == best


@pytest.fixture
def split_at():
    """torch.ops.hrnet_fast.winograd_branches_split_at, put back to measured (-1) after the test."""
    yield torch.ops.hrnet_fast.winograd_branches_split_at
    torch.ops.hrnet_fast.winograd_branches_split_at(-1)


@pytest.mark.parametrize(
    "n,shapes",
    [(1, W32_B1), (1, W32_B1[:3]), (2, [(16, 16, 12), (32, 8, 6)]),
     (1, [(16, 16, 12), (32, 8, 6), (16, 8, 8), (32, 4, 4), (16, 4, 6)])],
    ids=str,
)
@pytest.mark.parametrize("share", [True, False], ids=["shared tail", "tail on one lane"])
def test_branches_split_same_bits_at_every_conv(n, shapes, share, split_at, share_restored):
    """In two lanes on 2 threads the first branch's chain may be split at any of its convs (the first lane
    its convs before, the second lane the rest after its own branch, which the first joins at its end
    where the tail is shared, the two taking its convs' tasks one at a time; five branches: three in the
    first lane): each split gives the bits of one winograd_blocks call a branch. (W32's 32-channel chain
    at batch 1 has its U transformed up front: shared, by whichever lane comes first.)"""
    xs, ws, bs, tiles = make_branches(n, shapes)
    want = [winograd_blocks(x, w, b, t) for x, w, b, t in zip(xs, ws, bs, tiles)]
    share_restored(share)
    for k in range(len(ws[0]) + 1):
        split_at(k)
        for _ in range(3):  # which lane takes which task differs from call to call
            got = with_threads(2, lambda: hrnet_fast.ops.winograd_branches(xs, ws, bs, tiles))
            assert all(torch.equal(g, w) for g, w in zip(got, want)), f"split at conv {k}"


def test_split_search_balances_the_lanes(split_at):
    """The measured split moves a conv at a time toward equal lanes and stops within one conv of them
    (here against a model of the lanes' times): W32 at batch 1 on one thread of the Xeon, ms for 8 convs
    a branch: stage 4's lanes {32 (split), 64, 128} and {256}, 1.24 + 1.09 + 1.60 against 3.00, settle at
    conv 5 (3.47 ms each); stage 3's {32, 64} and {128} at 6; batch 8's stage 4 (10.2, 7.8, 9.2, 16.2) at
    4; the 32- and 64-channel pair of stage 2 not split (8); a first lane far heavier, at 0."""
    split_at(-1)
    search = torch.ops.hrnet_fast.winograd_branches_split_search
    assert search(1.09 + 1.60, 3.00, 0.155, 8) == 5
    assert search(1.09, 1.60, 0.155, 8) == 6
    assert search(7.8 + 9.2, 16.2, 10.2 / 8, 8) == 4
    assert search(0.0, 1.09, 0.155, 8) == 8
    assert search(5.0, 0.0, 0.1, 8) == 0
    assert search(1.09 + 1.60, 3.00, 0.155, 8, start=0) == 5  # from either end
    split_at(3)
    with pytest.raises(RuntimeError, match="forced"):
        search(1.0, 1.0, 0.1, 8)
    with pytest.raises(RuntimeError, match="forced"):
        search(1.0, 1.0, 0.1, 8, shared=True)
    with pytest.raises(RuntimeError, match="k must be -1"):
        split_at(-2)


def test_split_search_with_a_shared_tail(split_at):
    """With the tail shared, both lanes end together wherever both reach it before it is done, so the
    split moves down only while the second lane waits for the first's share or the first comes after the
    tail is done, and up while they run more than two convs of it together. Hand-worked against the
    model (whichever lane reaches the tail first runs it, the other joins it at half the time): stage 4 at
    batch 1 (2.69 ms of other branches against 3.00, 0.15 a conv) from no split: at 7 the first lane
    ends at 3.74 against 3.15, at 6 3.59 against 3.30, at 5 both at 3.445 (stays); from 0, where 0.445
    ms of the tail ran on both, up to 4 (0.155 ms together); stage 2 at batch 8 (its 64-channel branch
    7.3 ms against 1.22 a conv) at 6 (both at 8.54, the two convs after 7.32 ms on both lanes; at 7 the
    second lane waited 1.24 ms for the first's share); a first lane far heavier down to 0; a second lane
    heavier at 7 (both at 1.165 ms), where unshared it stayed at 8."""
    split_at(-1)
    search = torch.ops.hrnet_fast.winograd_branches_split_search
    assert search(2.69, 3.00, 0.15, 8, shared=True) == 5
    assert search(2.69, 3.00, 0.15, 8, start=0, shared=True) == 4
    assert search(0.0, 7.3, 1.22, 8, shared=True) == 6
    assert search(5.0, 0.0, 0.1, 8, shared=True) == 0
    assert search(0.0, 1.09, 0.155, 8, shared=True) == 7
    assert search(0.0, 1.09, 0.155, 8) == 8


def test_split_points_are_kept_per_module(split_at):
    """Measured splits are kept per set of branches and first weight (a model's modules of the same shapes
    settle apart), each within the first chain's convs, and forgotten on reset."""
    split_at(-1)
    torch.ops.hrnet_fast.winograd_branches_split_reset()
    assert torch.ops.hrnet_fast.winograd_branches_split_points() == ""
    a = make_branches(1, W32_B1[:3], seed=0)
    b = make_branches(1, W32_B1[:3], seed=5)
    for _ in range(3):
        for xs, ws, bs, tiles in (a, b):
            with_threads(2, lambda: hrnet_fast.ops.winograd_branches(xs, ws, bs, tiles))
    lines = torch.ops.hrnet_fast.winograd_branches_split_points().splitlines()
    assert len(lines) == 2
    for line in lines:
        key, k = line.split(": ")
        assert key.split(",")[1:] == ["1", "32", "64", "48", "4", "4", "1", "64", "32", "24", "4", "4", "1", "128", "16", "12", "4", "4"]
        assert 0 <= int(k) <= 4
    torch.ops.hrnet_fast.winograd_branches_split_reset()
    assert torch.ops.hrnet_fast.winograd_branches_split_points() == ""


def test_branches_bad_input():
    xs, ws, bs, tiles = make_branches(1, [(16, 8, 8), (32, 4, 4)])
    with pytest.raises(ValueError, match="one a branch"):
        hrnet_fast.ops.winograd_branches(xs, ws[:1], bs, tiles)
    with pytest.raises(ValueError, match=r"weights\[0\] must be the dense 3x3 weight \[32, 32, 3, 3\]"):
        hrnet_fast.ops.winograd_branches(xs, [ws[0], ws[0]], bs, tiles)
    flat_w, flat_b = [w for b in ws for w in b], [b for bb in bs for b in bb]
    with pytest.raises(RuntimeError, match="sum\\(convs\\)"):
        torch.ops.hrnet_fast.winograd_branches(xs, flat_w[:-1], flat_b, [4, 4], tiles)
    with pytest.raises(RuntimeError, match="two a block"):
        torch.ops.hrnet_fast.winograd_branches(xs, flat_w, flat_b, [3, 5], tiles)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_branches_opcheck(grad):
    xs, ws, bs, tiles = make_branches(1, [(16, 8, 8), (32, 4, 4)], blocks=1, seed=2)
    flat_w, flat_b = [w for b in ws for w in b], [b for bb in bs for b in bb]
    if grad:
        xs = [x.clone().requires_grad_() for x in xs]
        flat_w = [w.clone().requires_grad_() for w in flat_w]
        flat_b = [b.clone().requires_grad_() for b in flat_b]
    torch.library.opcheck(torch.ops.hrnet_fast.winograd_branches.default, (xs, flat_w, flat_b, [2, 2], tiles))


def test_optimize_runs_a_modules_branches_as_one_op():
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fast = hrnet_fast.optimize(model, backend="cpu")
    each = hrnet_fast.optimize(model, backend="cpu")
    for m in _blocks(each):
        m.one_op = False
    x = torch.randn(1, 3, 64, 64)
    for threads in (2, 8):
        with torch.inference_mode():
            out, want = with_threads(threads, lambda: (fast(x), each(x)))
        assert torch.equal(out, want)
    assert hrnet_fast.profile.count_ops(fast, x)["by_op"].get("hrnet_fast::winograd_branches", 0) > 0
