"""conv3x3_winograd: act(conv2d(x, w, stride=1, padding=1) + bias + residual) by Winograd F(m x m, 3 x 3).

HRNet spends most of its FLOPs in 3x3 stride-1 convolutions. Winograd's minimal filtering does each
m x m output tile with (m+2)^2 multiplies per channel pair instead of 9 m^2: 2.25x fewer for m = 2,
4x fewer for m = 4 (see csrc/kernels/winograd.h). oneDNN has Winograd only for AVX-512, so on AVX2
machines this kernel is ours (torch.ops.hrnet_fast.conv3x3_winograd, CPU, float32).

`transform_weight(w, m)` applies the filter transform G w G^T (the C++ op winograd_weight, float32, the
kernel's own arithmetic) and packs the result for the kernel; pass that to `conv3x3_winograd`. Or pass
the dense weight with `tile=m`: the kernel then transforms it on each call, panel by panel into cache
where it can, and nothing but the dense weight has to be kept (see hrnet_fast/fused/conv.py for when
that is as fast). Both ways give the same bits. The arithmetic differs from direct convolution only
by rounding, which grows with the transforms' constants (more for m = 4 than for m = 2): the README
gives its measured size, tests/test_conv3x3_winograd.py the bounds it is held to.

Fake and autograd are registered here. The backward is the adjoint of the Winograd algorithm itself
(in PyTorch ops), so it gives the gradient with respect to the weight the op was called with: for a
transformed one dU (`transform_weight` detaches, so a gradient for the dense 3x3 weight w is G^T dU G,
what `weight_grad_to_dense` computes), for a dense one (tile=m) that, G^T dU G. For x, bias and
residual it equals direct convolution's gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hrnet_fast import _extension
from hrnet_fast.ops._checks import check_4d, check_bias, check_same, same_device

OP = "conv3x3_winograd"
WEIGHT_OP = "winograd_weight"
TILES = (2, 4)
# F(4x4) does 44% fewer multiplies than F(2x2) but transforms 2.25x as many weight values (per call,
# for the dense weights optimize() keeps; per read, for a kept transformed weight), and pads small
# inputs more; where an input has few tiles that costs more than the multiplies save. The crossover,
# in bytes of F(4x4) weight per tile, was chosen with benchmarks/bench_conv3x3_winograd.py for kept
# weights and holds for dense ones (README, "Winograd on the CPU": the tile chosen per shape matches
# or beats either fixed tile at batch 1 and 8); tests/test_conv3x3_winograd.py::test_choose_tile pins
# W32's cases.
WEIGHT_BYTES_PER_TILE = 1 << 20
PANEL = 16  # output channels per packed panel (the kernel's micro-kernel width)

# G of F(m, 3): the filter transform (rows: interpolation points 0, +-1[, +-2], infinity).
_G = {
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
}
# B^T (input transform) and A^T (output transform) of F(m, 3), as csrc/kernels/winograd.h applies them.
_BT = {
    2: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    4: [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
}
_AT = {
    2: [[1, 1, 1, 0], [0, 1, -1, -1]],
    4: [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
}


def why_not_winograd(weight: torch.Tensor, stride: list[int], padding: list[int]) -> str | None:
    """Why the Winograd kernel cannot run this conv, or None when it can."""
    if tuple(weight.shape[2:]) != (3, 3) or list(stride) != [1, 1] or list(padding) != [1, 1]:
        return f"needs a 3x3 kernel with stride 1 and padding 1, got {tuple(weight.shape[2:])}, stride={list(stride)}, padding={list(padding)}"
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return f"is float32 CPU only, got {weight.dtype} on {weight.device}"
    return None


def transform_weight(weight: torch.Tensor, m: int = 4) -> torch.Tensor:
    """G w G^T for every filter of a [C_out, C_in, 3, 3] weight, packed as
    [(m+2)^2, ceil(C_out/16), C_in, 16] (zeros in the output channels past C_out)."""
    check_4d("weight", weight)
    if m not in TILES:
        raise ValueError(f"m (the output tile size) must be one of {TILES}, got {m}")
    why = why_not_winograd(weight, [1, 1], [1, 1])
    if why is not None:
        raise ValueError(f"conv3x3_winograd {why}")
    _extension.require(WEIGHT_OP, "CPU")
    with torch.no_grad():
        return torch.ops.hrnet_fast.winograd_weight(weight.detach(), m)


def transform_weight_reference(weight: torch.Tensor, m: int) -> torch.Tensor:
    """transform_weight in float64 einsums (rounded once to the weight's dtype): what the op is held to,
    and the backward's U for a dense weight (any dtype or device)."""
    g = torch.tensor(_G[m], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.double(), g)  # [K, K, C_in, C_out]
    k, cin, cout = m + 2, weight.shape[1], weight.shape[0]
    cout_p = -(-cout // PANEL) * PANEL
    u = torch.nn.functional.pad(u, (0, cout_p - cout))
    return u.reshape(k * k, cin, cout_p // PANEL, PANEL).permute(0, 2, 1, 3).to(weight.dtype).contiguous()


def choose_tile(x_shape: torch.Size | tuple[int, ...], c_out: int) -> int:
    """m (2 or 4) of the faster Winograd variant for an input of `x_shape` [N, C_in, H, W]."""
    n, c_in, h, w = x_shape
    tiles = n * (-(-h // 4)) * (-(-w // 4))
    return 4 if 36 * 4 * c_in * c_out <= WEIGHT_BYTES_PER_TILE * tiles else 2


def tile_size(transformed: torch.Tensor) -> int:
    """m of a transformed weight: 2 for [16, ...], 4 for [36, ...]."""
    return 2 if transformed.shape[0] == 16 else 4  # a comparison, not a dict lookup: works on symbolic shapes


def conv3x3_winograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_channels: int,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    tile: int = 0,
) -> torch.Tensor:
    """act(conv2d(x, w, stride=1, padding=1) + bias + residual) for a 3x3 w, given as `weight` =
    transform_weight(w, m) (tile=0) or as w itself with tile=m (2 or 4: transformed on each call), w
    either [C_out, C_in, 3, 3] (read in place when stored OIHW or [C_in, 3, 3, C_out], else copied on each
    call) or panel_major(w). `out_channels` = w.shape[0] (the transformed and the
    panel-major weight hold it rounded up to 16).

    The output's memory format follows x's (the kernel itself runs channels_last).
    """
    check_4d("x", x)
    cout = int(out_channels)
    if tile:
        if tile not in TILES:
            raise ValueError(f"tile must be one of {TILES} for a dense weight (0: weight is transformed), got {tile}")
        check_dense_weight("weight", weight, cout, x.shape[1], f"with tile={tile}, ")
    else:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[0] not in (16, 36) or weight.shape[3] != PANEL:
            raise ValueError(
                "weight must be a transformed weight [16 or 36, ceil(C_out/16), C_in, 16] from "
                f"transform_weight(w, m) (or the dense weight with tile=m), got shape {tuple(getattr(weight, 'shape', ()))}"
            )
        if weight.shape[2] != x.shape[1]:
            raise ValueError(f"weight was transformed for {weight.shape[2]} input channels, x has {x.shape[1]}")
        if not (weight.shape[1] - 1) * PANEL < cout <= weight.shape[1] * PANEL:
            raise ValueError(f"out_channels={cout} does not fit a weight transformed for {weight.shape[1] * PANEL} (padded) output channels")
    check_bias(bias, cout)
    shape = [x.shape[0], cout, x.shape[2], x.shape[3]]
    if residual is not None and list(residual.shape) != shape:
        raise ValueError(f"residual must have the output's shape {tuple(shape)}, got {tuple(residual.shape)}")
    check_same("x", x, [("weight", weight), ("bias", bias), ("residual", residual)])
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"conv3x3_winograd is float32 CPU only, got {x.dtype} on {x.device}")
    _extension.require(OP, "CPU")
    return torch.ops.hrnet_fast.conv3x3_winograd(x, weight, cout, bias, residual, relu, tile)


def fake(x, weight, out_channels, bias, residual=None, relu=True, tile=0):
    same_device("hrnet_fast::conv3x3_winograd", [("x", x), ("weight", weight), ("bias", bias), ("residual", residual)])
    out = x.new_empty([x.shape[0], out_channels, x.shape[2], x.shape[3]])
    return out.contiguous(memory_format=torch._prims_common.suggest_memory_format(x))


def fake_weight(weight, m):
    k, cout, cin = m + 2, weight.shape[0], weight.shape[1]
    return weight.new_empty([k * k, (cout + PANEL - 1) // PANEL, cin, PANEL])


def setup_context(ctx, inputs, output):
    x, weight, out_channels, bias, residual, relu = inputs[:6]
    ctx.tile = inputs[6] if len(inputs) > 6 else 0
    ctx.out_channels, ctx.relu = int(out_channels), relu
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(x, weight, output)


def backward(ctx, grad):
    """Adjoint of Y = A^T [sum_c U_c .* (B^T D_c B)] A over every m x m output tile (zero padding
    around the image, tiles past its edge cut off), for x and the packed transformed weight U
    (for a dense weight w, U = G w G^T, and its gradient G^T dU G)."""
    x, weight, out = ctx.saved_tensors
    dense, panels = bool(ctx.tile), weight.dim() == 5
    if dense:
        weight = transform_weight_reference(from_panel_major(weight, ctx.out_channels) if panels else weight, ctx.tile)
    if ctx.relu:
        grad = grad * (out > 0)
    m = tile_size(weight)
    k, (n, cin, h, w), cout = m + 2, x.shape, ctx.out_channels
    th, tw = -(-h // m), -(-w // m)
    bt = torch.tensor(_BT[m], dtype=grad.dtype, device=grad.device)
    at = torch.tensor(_AT[m], dtype=grad.dtype, device=grad.device)
    # dZ = A dY A^T of every output tile: [N, C_out, tiles_h, tiles_w, k, k]
    dy = F.pad(grad, (0, tw * m - w, 0, th * m - h)).unfold(2, m, m).unfold(3, m, m)
    dz = torch.einsum("ia,notsij,jb->notsab", at, dy, at)
    u = weight.permute(0, 2, 1, 3).reshape(k, k, cin, -1)[..., :cout]  # [k, k, C_in, C_out]
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        dv = torch.einsum("abco,notsab->nctsab", u, dz)
        dd = torch.einsum("ai,nctsab,bj->ncijts", bt, dv, bt)  # B dV B^T per input tile
        # input tiles overlap by 2: add them back into the padded image, then drop the padding
        dx = F.fold(dd.reshape(n, cin * k * k, th * tw), (th * m + 2, tw * m + 2), kernel_size=k, stride=m)
        grad_x = dx[:, :, 1 : h + 1, 1 : w + 1]
    if ctx.needs_input_grad[1]:
        d = F.pad(x, (1, tw * m - w + 1, 1, th * m - h + 1)).unfold(2, k, m).unfold(3, k, m)
        v = torch.einsum("ai,nctsij,bj->nctsab", bt, d, bt)  # B^T D B, as the forward's input transform
        du = torch.einsum("nctsab,notsab->abco", v, dz)
        du = F.pad(du, (0, weight.shape[1] * PANEL - cout))  # the padded output channels get no gradient
        grad_weight = du.reshape(k * k, cin, weight.shape[1], PANEL).permute(0, 2, 1, 3)
        if dense:
            grad_weight = weight_grad_to_dense(grad_weight, cout)
            if panels:  # the padded output channels get no gradient
                grad_weight = panel_major(grad_weight)
    grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
    grad_residual = grad if ctx.has_residual else None
    # One gradient per input the caller passed: torch 2.11's AOT autograd leaves trailing defaults
    # out of the call, fills them in for setup_context, but then wants them out of the result.
    return (grad_x, grad_weight, None, grad_bias, grad_residual, None, None)[: len(ctx.needs_input_grad)]


def panel_major(weight: torch.Tensor) -> torch.Tensor:
    """A [C_out, C_in, 3, 3] weight as [ceil(C_out/16), C_in, 3, 3, 16], output channels past C_out zero:
    a dense weight conv3x3_winograd and winograd_blocks also read in place, each 16-wide panel one
    sequential run of 64-byte lines (optimize() keeps OIHW, which read as fast on the AMD EPYC without
    a copy: README, "Memory")."""
    cout, cin = weight.shape[:2]
    panels = -(-cout // PANEL)
    padded = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, panels * PANEL - cout))
    return padded.reshape(panels, PANEL, cin, *weight.shape[2:]).permute(0, 2, 3, 4, 1).contiguous()


def from_panel_major(panels: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The [C_out, C_in, 3, 3] weight of panel_major(weight) (`out_channels` = C_out)."""
    p, cin, kh, kw, lanes = panels.shape
    return panels.permute(0, 4, 1, 2, 3).reshape(p * lanes, cin, kh, kw)[:out_channels]


def check_dense_weight(name: str, weight: object, cout: int, cin: int, context: str = "") -> None:
    """That `weight` is a dense 3x3 weight C_in -> C_out as the Winograd ops take it: [C_out, C_in, 3, 3]
    or panel_major's [ceil(C_out/16), C_in, 3, 3, 16]."""
    shape = tuple(getattr(weight, "shape", ()))
    panels = (-(-cout // PANEL), cin, 3, 3, PANEL)
    if not isinstance(weight, torch.Tensor) or shape not in ((cout, cin, 3, 3), panels):
        raise ValueError(f"{context}{name} must be the dense 3x3 weight [{cout}, {cin}, 3, 3] or its panel_major "
                         f"{list(panels)} (x has {cin} channels), got shape {shape}")


def weight_grad_to_dense(grad_transformed: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The gradient for the dense [C_out, C_in, 3, 3] weight w, given the gradient for
    transform_weight(w, m): U = G w G^T is linear in w, so dw = G^T dU G."""
    m = tile_size(grad_transformed)
    k, cin = m + 2, grad_transformed.shape[2]
    g = torch.tensor(_G[m], dtype=grad_transformed.dtype, device=grad_transformed.device)
    du = grad_transformed.permute(0, 2, 1, 3).reshape(k, k, cin, -1)[..., :out_channels]
    return torch.einsum("ak,abio,bl->oikl", g, du, g)


if _extension.is_built():
    torch.library.register_fake(f"hrnet_fast::{OP}")(fake)
    torch.library.register_fake(f"hrnet_fast::{WEIGHT_OP}")(fake_weight)
    torch.library.register_autograd(f"hrnet_fast::{OP}", backward, setup_context=setup_context)
