"""FusedBlock: a ResNet BasicBlock or Bottleneck as 2 or 3 conv_bias_act calls, the last adding the shortcut.
ChunkedStage: a Sequential of them run a few images at a time on the CPU.
WinogradBlocks: a Sequential of BasicBlocks (an HRNet branch) as one winograd_blocks call on the CPU."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch._prims_common import suggest_memory_format

from hrnet_fast.fused import cpu_tasks
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.folding import FOLDABLE_BN, fold_conv_bn
from hrnet_fast.ops.winograd import choose_tile

# Attributes a block may carry that must be absent or identities for the plain conv-bn-relu semantics.
_OPTIONAL_EXTRAS = ("se", "aa", "drop_block", "drop_path", "attn")
_ACTS = ("relu", "act1", "act2", "act3")


def block_depth(m: nn.Module) -> int:
    """3 for a Bottleneck-like module, 2 for a BasicBlock-like one, 0 otherwise (by attributes, not class)."""
    def pair(k: int) -> bool:
        return isinstance(getattr(m, f"conv{k}", None), nn.Conv2d) and isinstance(getattr(m, f"bn{k}", None), FOLDABLE_BN)

    if not (pair(1) and pair(2)):
        return 0
    # a block holds nothing but its convs, BNs, activations, shortcut and optional extras (a stem does)
    allowed = {f"{p}{k}" for p in ("conv", "bn") for k in (1, 2, 3)} | set(_ACTS) | set(_OPTIONAL_EXTRAS) | {"downsample"}
    if any(n not in allowed for n, _ in m.named_children()):
        return 0
    return 3 if pair(3) else 2


def why_not_block(m: nn.Module) -> str | None:
    """Why a block-shaped module cannot be fused exactly, or None when it can."""
    for name in _OPTIONAL_EXTRAS:
        extra = getattr(m, name, None)
        if extra is not None and not isinstance(extra, nn.Identity):
            return f"has a {name} ({type(extra).__name__}) between its convs"
    for name in _ACTS:
        act = getattr(m, name, None)
        if act is not None and not isinstance(act, (nn.ReLU, nn.Identity)):
            return f"its activation {name} is {type(act).__name__}, not ReLU"
    down = getattr(m, "downsample", None)
    if down is not None and conv_bn_pair(down) is None:
        return f"its downsample is not Sequential(Conv2d, BatchNorm2d): {type(down).__name__}"
    return None


def conv_bn_pair(m: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, bool] | None:
    """(conv, bn, relu) when `m` is Sequential(Conv2d[, BatchNorm2d][, ReLU]), else None."""
    if not isinstance(m, nn.Sequential) or not 1 <= len(m) <= 3 or not isinstance(m[0], nn.Conv2d):
        return None
    rest = list(m)[1:]
    bn = rest.pop(0) if rest and isinstance(rest[0], FOLDABLE_BN) else None
    relu = bool(rest) and isinstance(rest[0], nn.ReLU)
    if rest[relu:]:
        return None
    return m[0], bn, relu


# mmcv's ConvModule (the OpenMMLab heads' conv, norm, activation), by module and class name: a subclass may
# do anything in its forward
CONV_MODULES = frozenset({("mmcv.cnn.bricks.conv_module", "ConvModule")})


def conv_module_parts(m: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, bool] | None:
    """(conv, bn, relu) when `m` is mmcv's ConvModule run in the order conv, norm, act with a plain Conv2d
    (no padding layer of its own, no spectral norm), a foldable BN or none, and a ReLU or no activation;
    else None."""
    if (type(m).__module__, type(m).__qualname__) not in CONV_MODULES:
        return None
    if tuple(m.order) != ("conv", "norm", "act") or m.with_explicit_padding or m.with_spectral_norm:
        return None
    bn = getattr(m, m.norm_name) if m.with_norm else None
    act = m.activate if m.with_activation else None
    if type(m.conv) is not nn.Conv2d or (m.with_norm and not isinstance(bn, FOLDABLE_BN)):
        return None
    if act is not None and not isinstance(act, nn.ReLU):
        return None
    return m.conv, bn, act is not None


def fused_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, backend: str) -> FusedConv:
    """`conv` with `bn` folded in (and ReLU when `relu`) as one FusedConv on `backend`."""
    w, b = fold_conv_bn(conv, bn)
    return FusedConv(w, b, conv.stride, conv.padding, relu, backend)


class FusedBlock(nn.Module):
    """out = relu(convN(...relu(conv1(x))...) + shortcut(x)), every conv with BN folded in."""

    def __init__(self, block: nn.Module, backend: str):
        super().__init__()
        depth = block_depth(block)
        # every conv applies ReLU: the inner ones after their BN, the last one after adding the shortcut
        convs = [fused_conv(getattr(block, f"conv{k}"), getattr(block, f"bn{k}"), True, backend) for k in range(1, depth + 1)]
        self.convs = nn.ModuleList(convs[:-1])
        self.last = convs[-1]
        down = getattr(block, "downsample", None)
        self.downsample = None if down is None else fused_conv(*conv_bn_pair(down)[:2], False, backend)

    def output_shape(self, shape: Sequence[int]) -> list[int]:
        """The output's shape for an input of `shape` [N, C, H, W]."""
        for conv in (*self.convs, self.last):
            shape = conv.output_shape(shape)
        return shape

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block on x; into `out` (the output's shape) where given, which is returned."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = x
        for conv in self.convs:
            y = conv(y)
        return self.last(y, shortcut, out)


class ChunkedStage(nn.Sequential):
    """A Sequential of FusedBlocks (HRNet's stage 1) that, on the cpu backend, runs a batch a few images
    at a time, so that each chunk's activations stay in the last-level cache.

    Stage 1 runs at full resolution with 256 channels: at W32 256x192 one image's activation is 3.1 MB,
    a batch of 8 is 25 MB, and every 64->256 1x1 conv then streams its input, its residual and its output
    through memory. Run two images at a time, W32's stage 1 at batch 8 took 54-56 ms instead of 74-78
    (README, "Whole model"), which more than pays for concatenating the outputs.
    Children keep their names, so state_dict is the Sequential's.
    """

    # The largest activation a chunk may hold: 2 images of W32 256x192, a quarter of a 32 MiB L3.
    CHUNK_BYTES = 8 << 20

    def __init__(self, stage: nn.Sequential) -> None:
        super().__init__()
        for name, block in stage.named_children():
            self.add_module(name, block)
        self.max_channels = max(c.weight.shape[0] for c in self.modules() if isinstance(c, FusedConv))
        # set by optimize(tasks=True): the chunks side by side on threads
        self.tasks = False

    def chunk(self, x: torch.Tensor, in_flight: int = 1) -> int:
        """Images per chunk for input `x` (at least 1), with `in_flight` chunks sharing the budget."""
        per_image = self.max_channels * x.shape[2] * x.shape[3] * x.element_size()
        return max(1, self.CHUNK_BYTES // max(per_image * in_flight, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = super().forward
        if x.dim() != 4 or torch.compiler.is_compiling():
            return run(x)
        n = x.shape[0]
        # Side by side on threads (hrnet_fast.fused.cpu_tasks), at least a part of the batch a thread, the
        # chunks in flight sharing the cache budget: W32's stage 1 at batch 8 on 2 threads took 65-71 ms
        # in 1-image chunks against 70-79 in 2-image ones (README, "Threads").
        # may_fan_out first: under torch.compile the thread count is not looked up
        fan_out = bool(self.tasks) and n > 1 and cpu_tasks.may_fan_out()
        workers = min(n, cpu_tasks.team()) if fan_out else 1
        chunks = max(-(-n // self.chunk(x, workers)), workers)
        if chunks == 1:
            return run(x)
        parts = cpu_tasks.split_batch(x, chunks)
        if workers > 1:
            return torch.cat(cpu_tasks.run_chains([([run], p) for p in parts]))
        # Each chunk's last block writes its slice of the stage's output (conv_bias_act_into), where a
        # concatenation of the chunks' outputs copied it all once more: 25 MB at W32's batch 8, 4 ms of
        # ~240 (W32 at batch 8 1.01-1.02x faster, 30 of 40 forwards, in turns in one process).
        *head, last = self
        shape = list(x.shape)
        for block in self:
            shape = block.output_shape(shape)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
        start = 0
        for p in parts:
            for block in head:
                p = block(p)
            last(p, out.narrow(0, start, p.shape[0]))
            start += p.shape[0]
        return out

    def __setstate__(self, state: dict) -> None:
        state.setdefault("tasks", False)  # absent from states saved before task parallelism
        super().__setstate__(state)


class WinogradBlocks(nn.Sequential):
    """A Sequential of FusedBlocks that are BasicBlocks with identity shortcuts (an HRNet branch), on the
    cpu backend: where all their convs run Winograd (FusedConv.pack) on a float32 CPU input, the whole
    chain is one winograd_blocks call, the same bits as block by block but planned, allocated and started
    on the threads once (csrc/cpu/winograd_blocks.cpp); else (torch.compile, another input, convs that run
    elsewhere) block by block. Children keep their names, so state_dict is the Sequential's."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        for name, block in seq.named_children():
            self.add_module(name, block)
        # False: always block by block (for comparing the two in one process)
        self.one_op = True

    @staticmethod
    def applies(seq: nn.Module) -> bool:
        """Whether `seq` is a non-empty Sequential of cpu-backend FusedBlocks with two convs and no downsample."""
        return (
            isinstance(seq, nn.Sequential)
            and len(seq) > 0
            and all(isinstance(b, FusedBlock) and len(b.convs) == 1 and b.downsample is None and b.last.backend == "cpu"
                    for b in seq)
        )

    def __setstate__(self, state: dict) -> None:
        state.setdefault("one_op", True)
        super().__setstate__(state)

    def op_args(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        """(weights, biases, tile) of the winograd_blocks call that runs this chain on `x`, or None where
        it runs block by block."""
        if (not self.one_op or x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad)):
            return None
        weights, biases = [], []
        c = x.shape[1]
        for block in self:
            for conv in (block.convs[0], block.last):
                conv._refresh()  # the derived weights up to date, as FusedConv.forward keeps them
                w = conv._buffers["weight"]
                if not conv._winograd or not conv.relu or w.shape[0] != c or w.shape[1] != c:
                    return None
                weights.append(conv._winograd_weight)
                biases.append(conv._buffers["bias"])
        return weights, biases, choose_tile(x.shape, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self.op_args(x)
        if args is None:
            return super().forward(x)
        return torch.ops.hrnet_fast.winograd_blocks(x, *args)
