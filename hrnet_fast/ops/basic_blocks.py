"""winograd_blocks: n ResNet BasicBlocks with identity shortcuts (an HRNet branch) by Winograd, in one op;
winograd_branches: an HR module's such branches in one op, side by side on shares of the threads.

    x <- relu(conv3x3(relu(conv3x3(x, w[2k]) + b[2k]), w[2k+1]) + b[2k+1] + x)   for k = 0 .. n-1

every conv 3x3, stride 1, padding 1, C -> C, its weight dense ([C, C, 3, 3], any strides; fastest stored
[C_in, 3, 3, C_out] as optimize() keeps it). The same bits as the 2n conv3x3_winograd(..., tile=tile)
calls it replaces; the C++ op (torch.ops.hrnet_fast.winograd_blocks, CPU, float32) checks and plans the
shape once, allocates once and runs all the convs in one parallel region (csrc/cpu/winograd_blocks.cpp
says what that saves). Fake and autograd (through conv3x3_winograd's, by recomputing the blocks) are
registered here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hrnet_fast import _extension
from hrnet_fast.ops._checks import check_4d, same_device
from hrnet_fast.ops.winograd import TILES, check_dense_weight, conv3x3_winograd

OP = "winograd_blocks"
BRANCHES_OP = "winograd_branches"


def winograd_blocks(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], tile: int
) -> torch.Tensor:
    """len(weights) // 2 BasicBlocks on x (see the module docstring); the output's memory format follows x's."""
    _check_blocks(x, weights, biases, tile)
    _extension.require(OP, "CPU")
    return torch.ops.hrnet_fast.winograd_blocks(x, list(weights), list(biases), tile)


def _check_blocks(x, weights, biases, tile) -> None:
    """What winograd_blocks takes, said in Python's terms before the op would refuse it."""
    check_4d("x", x)
    c = x.shape[1]
    if tile not in TILES:
        raise ValueError(f"tile must be one of {TILES}, got {tile}")
    if len(weights) < 2 or len(weights) % 2 or len(biases) != len(weights):
        raise ValueError(f"weights and biases must be two a block (an even number, at least 2) and as many of each, "
                         f"got {len(weights)} weights and {len(biases)} biases")
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_dense_weight(f"weights[{i}]", w, c, c)
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (c,):
            raise ValueError(f"biases[{i}] must have shape ({c},), got {tuple(getattr(b, 'shape', ()))}")
    same_device(f"hrnet_fast::{OP}", [("x", x)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                + [(f"biases[{i}]", b) for i, b in enumerate(biases)])
    if x.device.type != "cpu" or any(t.dtype != torch.float32 for t in (x, *weights, *biases)):
        raise ValueError(f"winograd_blocks is float32 CPU only, got x {x.dtype} on {x.device}")


def winograd_blocks_reference(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], tile: int
) -> torch.Tensor:
    """The blocks as conv3x3_winograd calls (the same bits as the op; differentiable through its autograd)."""
    c = x.shape[1]
    for k in range(0, len(weights), 2):
        h = conv3x3_winograd(x, weights[k], c, biases[k], None, True, tile=tile)
        x = conv3x3_winograd(h, weights[k + 1], c, biases[k + 1], x, True, tile=tile)
    return x


def winograd_branches(
    xs: Sequence[torch.Tensor],
    weights: Sequence[Sequence[torch.Tensor]],
    biases: Sequence[Sequence[torch.Tensor]],
    tiles: Sequence[int],
) -> list[torch.Tensor]:
    """An HR module's branches: branch b is winograd_blocks(xs[b], weights[b], biases[b], tiles[b]), the
    branches side by side on shares of torch's threads where each gets at least 2
    (csrc/cpu/winograd_branches.cpp), else one after another; the same bits either way."""
    if not (len(xs) == len(weights) == len(biases) == len(tiles)) or not xs:
        raise ValueError(f"xs, weights, biases and tiles must be one a branch (at least one), got {len(xs)}, "
                         f"{len(weights)}, {len(biases)} and {len(tiles)}")
    for x, w, b, t in zip(xs, weights, biases, tiles):  # each branch as winograd_blocks checks it
        _check_blocks(x, w, b, t)
    _extension.require(BRANCHES_OP, "CPU")
    return call_branches(xs, weights, biases, tiles)


def call_branches(xs, weights, biases, tiles) -> list[torch.Tensor]:
    """The winograd_branches op on per-branch lists, without the checks (the fused module's hot path)."""
    flat_w, flat_b = [w for ws in weights for w in ws], [b for bs in biases for b in bs]
    return list(torch.ops.hrnet_fast.winograd_branches(list(xs), flat_w, flat_b, [len(ws) for ws in weights], list(tiles)))


def winograd_branches_reference(xs, weights, biases, tiles) -> list[torch.Tensor]:
    """The branches as winograd_blocks_reference each (differentiable)."""
    return [winograd_blocks_reference(x, w, b, t) for x, w, b, t in zip(xs, weights, biases, tiles)]


def fake(x, weights, biases, tile):
    same_device(f"hrnet_fast::{OP}", [("x", x)] + [("weights", w) for w in weights] + [("biases", b) for b in biases])
    return x.new_empty(x.shape).contiguous(memory_format=torch._prims_common.suggest_memory_format(x))


def setup_context(ctx, inputs, output):
    x, weights, biases, tile = inputs
    ctx.tile, ctx.n = tile, len(weights)
    ctx.save_for_backward(x, *weights, *biases)


def backward(ctx, grad):
    """By recomputing the blocks as conv3x3_winograd calls and taking their gradients (an inference op:
    the backward need not be fast, only right)."""
    x, *rest = ctx.saved_tensors
    weights, biases = rest[: ctx.n], rest[ctx.n :]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x, *weights, *biases)]
        out = winograd_blocks_reference(leaves[0], leaves[1 : 1 + ctx.n], leaves[1 + ctx.n :], ctx.tile)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return grads[0], list(grads[1 : 1 + ctx.n]), list(grads[1 + ctx.n :]), None


def fake_branches(xs, weights, biases, convs, tiles):
    same_device(f"hrnet_fast::{BRANCHES_OP}", [("xs", x) for x in xs] + [("weights", w) for w in weights]
                + [("biases", b) for b in biases])
    return [x.new_empty(x.shape).contiguous(memory_format=torch._prims_common.suggest_memory_format(x)) for x in xs]


def setup_context_branches(ctx, inputs, output):
    xs, weights, biases, convs, tiles = inputs
    ctx.n_x, ctx.n_w, ctx.convs, ctx.tiles = len(xs), len(weights), list(convs), list(tiles)
    ctx.save_for_backward(*xs, *weights, *biases)


def backward_branches(ctx, grads):
    """As winograd_blocks' backward: by recomputing the branches as conv3x3_winograd calls."""
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in saved]
        xs, ws, bs = leaves[: ctx.n_x], leaves[ctx.n_x : ctx.n_x + ctx.n_w], leaves[ctx.n_x + ctx.n_w :]
        per_w, per_b, off = [], [], 0
        for c in ctx.convs:
            per_w.append(ws[off : off + c])
            per_b.append(bs[off : off + c])
            off += c
        outs = winograd_branches_reference(xs, per_w, per_b, ctx.tiles)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    return list(got[: ctx.n_x]), list(got[ctx.n_x : ctx.n_x + ctx.n_w]), list(got[ctx.n_x + ctx.n_w :]), None, None


if _extension.is_built():
    torch.library.register_fake(f"hrnet_fast::{OP}")(fake)
    torch.library.register_autograd(f"hrnet_fast::{OP}", backward, setup_context=setup_context)
    torch.library.register_fake(f"hrnet_fast::{BRANCHES_OP}")(fake_branches)
    torch.library.register_autograd(
        f"hrnet_fast::{BRANCHES_OP}", backward_branches, setup_context=setup_context_branches
    )
