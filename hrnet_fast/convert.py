"""optimize(model): an eval-mode HRNet in, a fused inference copy out (BN folded, fused kernels, same outputs).

Recognises structure, not class names, so the official pose and segmentation HRNets, timm's hrnet_w*
and MMPose's backbone all convert: HR modules (branches, fuse_layers, num_branches; nearest or
bilinear fusion, the mode read off the modules or probed: fused/hr_module.py), the segmentation head
(fused/seg_head.py; mmsegmentation's FCNHead in HRNetV2's form: fused/mmseg_head.py), residual blocks
(conv1/bn1/conv2/bn2[/conv3/bn3][, downsample]), Sequential(Conv2d, BatchNorm2d[, ReLU]), conv{k}/bn{k}
attribute pairs (stems), and any other plain Conv2d (heads). A ReLU module the forward calls only
right after such folded pairs (the pose stems' `relu`, found by tracing the forward with torch.fx)
runs in the convs' epilogue.
"""
from __future__ import annotations

import copy
import threading
import warnings

import torch
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.utils._pytree import tree_map

from hrnet_fast.cpu_graphs import CPUGraphForward
from hrnet_fast.fused.blocks import (
    ChunkedStage, FusedBlock, block_depth, conv_bn_pair, conv_module_parts, fused_conv, why_not_block,
)
from hrnet_fast.fused.conv import FusedConv, planar_output
from hrnet_fast.fused.folding import FOLDABLE_BN
from hrnet_fast.fused.hr_module import FusedHRModule, fusion_mode, is_hr_module, why_not_hr_module
from hrnet_fast.fused.hr_stage import FusedHRStage
from hrnet_fast.fused.mmseg_head import convert_mmseg_heads, keep_eager_logits_layout
from hrnet_fast.fused.seg_head import FusedSegHead, SegForward, has_seg_structure, probe_seg_align_corners, why_not_seg_head
from hrnet_fast.graphs import CUDAGraphForward
from hrnet_fast.ops import _backend


class ConversionError(ValueError):
    """optimize(strict=True) met a module it cannot fuse exactly."""


def _why_not_fusable_conv(conv: nn.Conv2d) -> str | None:
    """Why `conv` cannot become a fused conv, or None when it can."""
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "grouped, dilated, string-padded or non-zero-padded conv"
    return None


def _fx_graph(model: nn.Module) -> torch.fx.Graph | None:
    """A torch.fx trace of `model`'s forward, or None where it does not trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any forward FX cannot trace is left as it is
        return None


def io_convs(model: nn.Module, graph: torch.fx.Graph | None) -> tuple[str | None, str | None]:
    """(the conv that alone reads the forward's one input, the conv whose output the forward returns),
    by module name, off `graph` (a trace of `model`'s forward; (None, None) without one): the pose nets'
    stem conv1 and head final_layer. On the cpu backend those read the caller's NCHW image and write
    the NCHW heatmaps themselves (FusedConv.reads_planar, writes_planar), instead of two layout copies."""
    if graph is None:
        return None, None
    modules = dict(model.named_modules())

    def conv(node: object) -> str | None:
        ok = isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d)
        return node.target if ok and len(node.args) == 1 and not node.kwargs else None

    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    stem = conv(next(iter(inputs[0].users))) if len(inputs) == 1 and len(inputs[0].users) == 1 else None
    out = next((n for n in graph.nodes if n.op == "output"), None)
    head = conv(out.args[0]) if out is not None and len(out.args) == 1 else None
    if head is not None and len(out.args[0].users) != 1:
        head = None
    return stem, head


def relus_after_convs(model: nn.Module, graph: torch.fx.Graph | None = None) -> dict[str, list[tuple[str, str]]]:
    """{ReLU module name: the (conv, BN) pairs it follows} for each ReLU module that `model`'s forward calls only on
    the output of a conv -> BatchNorm pair that nothing else reads (the pose nets' stem `relu`, after
    bn1 and after bn2), read off `graph`, a torch.fx trace of the forward (traced here when None); {}
    where the forward does not trace. Such a ReLU can run in the convs' epilogue instead, the module
    left an Identity."""
    graph = graph if graph is not None else _fx_graph(model)
    if graph is None:
        return {}
    modules = dict(model.named_modules())

    def call_of(node: object, kind: type | tuple[type, ...]) -> torch.fx.Node | None:
        ok = (isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), kind)
              and len(node.args) == 1 and not node.kwargs and len(node.users) == 1)
        return node if ok else None

    found: dict[str, list[tuple[str, str]]] = {}
    refused: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.ReLU):
            continue
        bn = call_of(node.args[0] if len(node.args) == 1 and not node.kwargs else None, FOLDABLE_BN)
        conv = call_of(bn.args[0], nn.Conv2d) if bn is not None else None
        if conv is None:
            refused.add(node.target)
        else:
            found.setdefault(node.target, []).append((conv.target, bn.target))
    return {name: convs for name, convs in found.items() if name not in refused}


class _Converter:
    def __init__(self, backend: str):
        self.backend = backend
        self.skipped: list[tuple[str, str]] = []

    def convert(self, m: nn.Module, name: str) -> nn.Module:
        """The fused replacement of `m` (children converted in place when `m` itself is kept)."""
        if is_hr_module(m):
            why = why_not_hr_module(m)
            mode = fusion_mode(m) if why is None else why  # probed on m before its branches are converted
            if isinstance(mode, tuple):
                branches = nn.ModuleList([self.convert(b, f"{name}.branches.{k}") for k, b in enumerate(m.branches)])
                return FusedHRModule(m, branches, self.backend, *mode)
            self.skipped.append((name, mode))
        elif block_depth(m):
            convs = (c for c in m.modules() if isinstance(c, nn.Conv2d))
            why = why_not_block(m) or next((r for r in map(_why_not_fusable_conv, convs) if r is not None), None)
            if why is None:
                return FusedBlock(m, self.backend)
            self.skipped.append((name, why))
        pair = conv_bn_pair(m) or conv_module_parts(m)
        if pair is not None and _why_not_fusable_conv(pair[0]) is None:
            return fused_conv(*pair, self.backend)
        if isinstance(m, nn.Conv2d):
            if _why_not_fusable_conv(m) is None:
                return fused_conv(m, None, False, self.backend)
            self.skipped.append((name, _why_not_fusable_conv(m)))
            return m
        self._fold_attribute_pairs(m)
        if isinstance(m, nn.Sequential):
            self._fold_sequential_runs(m)
        for child_name, child in list(m.named_children()):
            new = self.convert(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(m, child_name, new)
        return m

    def convert_seg_head(self, model: nn.Module) -> None:
        """The segmentation HRNet's head (upsample + concat + last_layer) as one FusedSegHead
        (hrnet_fast/fused/seg_head.py), on the still unconverted `model`. Our reference's forward hands
        its branches to such a head; another model with the official structure gets a forward that does
        (SegForward), only where a probe input shows it reproduces the model's own."""
        from hrnet_fast.reference.seg_hrnet import SegHighResolutionNet  # the reference imports nothing of ours

        if not has_seg_structure(model) or why_not_seg_head(model.last_layer) is not None:
            return
        if isinstance(model, SegHighResolutionNet):
            channels = list(model.stage4[-1].get_num_inchannels())
            model.last_layer = FusedSegHead(model.last_layer, channels, model.align_corners, self.backend)
            return
        found = probe_seg_align_corners(model)
        if isinstance(found, str):
            self.skipped.append(("last_layer", f"head left as upsample + concat + last_layer: {found}"))
            return
        align_corners, channels = found
        model.last_layer = FusedSegHead(model.last_layer, channels, align_corners, self.backend)
        model._hrnet_fast_forward = SegForward(model)  # CUDAGraphForward replays this one too
        model.forward = model._hrnet_fast_forward

    def chunk_stages(self, m: nn.Module) -> None:
        """cpu: every Sequential of FusedBlocks outside the HR modules (stage 1) becomes a ChunkedStage,
        every Sequential of several FusedHRModules (stages 2-4) a FusedHRStage."""
        for child_name, child in list(m.named_children()):
            if isinstance(child, FusedHRModule):
                continue  # branches: a few channels each, already small per image
            if isinstance(child, nn.Sequential) and len(child) and all(isinstance(b, FusedBlock) for b in child):
                setattr(m, child_name, ChunkedStage(child))
            elif isinstance(child, nn.Sequential) and len(child) > 1 and all(isinstance(b, FusedHRModule) for b in child):
                setattr(m, child_name, FusedHRStage(child))
            else:
                self.chunk_stages(child)

    def _fold_sequential_runs(self, m: nn.Sequential) -> None:
        """Conv2d, BatchNorm2d[, ReLU] runs inside a longer Sequential: the conv absorbs the rest."""
        children = list(m.named_children())
        for k, (name, conv) in enumerate(children[:-1]):
            bn = children[k + 1][1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FOLDABLE_BN) and _why_not_fusable_conv(conv) is None:
                relu = k + 2 < len(children) and isinstance(children[k + 2][1], nn.ReLU)
                setattr(m, name, fused_conv(conv, bn, relu, self.backend))
                for absorbed_name, _ in children[k + 1 : k + 2 + relu]:
                    setattr(m, absorbed_name, nn.Identity())

    def _fold_attribute_pairs(self, m: nn.Module) -> None:
        """conv{k} followed by bn{k} in the parent's own forward (stems): the conv absorbs the BN."""
        for k in range(1, 10):
            conv, bn = getattr(m, f"conv{k}", None), getattr(m, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FOLDABLE_BN) and _why_not_fusable_conv(conv) is None:
                setattr(m, f"conv{k}", fused_conv(conv, bn, False, self.backend))
                setattr(m, f"bn{k}", nn.Identity())


def _fold_relus(fused: nn.Module, relus: dict[str, list[tuple[str, str]]]) -> None:
    """Each ReLU module of `relus` (relus_after_convs, found before conversion) that is still there,
    where every conv it follows became a FusedConv without ReLU and its BN was folded into it (an
    Identity now): the convs apply the ReLU and the module becomes an Identity (the pose stems: two
    fewer passes over the stem's output)."""
    modules = dict(fused.named_modules())
    for name, pairs in relus.items():
        targets = [modules.get(conv) for conv, _ in pairs]
        folded = all(isinstance(t, FusedConv) and not t.relu for t in targets) and all(
            isinstance(modules.get(bn), nn.Identity) for _, bn in pairs)
        if not isinstance(modules.get(name), nn.ReLU) or not folded:
            continue
        for t in targets:
            t.relu = True
        parent, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent) if parent else fused, attr, nn.Identity())


_UNSET = object()  # a scope that left planar_output as it was


class _ForwardScope:
    """The optimized model's forward pre/post hooks, one pair for everything done per call.

    - dtype: floating inputs are cast to the copy's dtype, so callers can keep passing float32.
    - channels_last: the compiled backends run NHWC end to end, so 4-D inputs are converted once on
      entry; 4-D outputs go back to NCHW when the caller passed NCHW, the layout eager returns.
    - inference mode: under no_grad every custom-op call still passes through its Python autograd
      wrapper, hundreds of calls a forward; inference mode skips it. Not while compiling (Dynamo
      traces no grad mode split across hooks) nor when grad is enabled (a training caller keeps autograd).
    - arena (cpu backend): the caching CPU allocator is installed for the call (csrc/cpu/cpu_arena.cpp),
      so each forward's large activations reuse the last one's memory instead of fresh pages.
    - planar_in (cpu backend, where the stem conv reads an NCHW image itself: io_convs): a contiguous
      NCHW input stays NCHW. planar_out (where the head conv writes NCHW itself, FusedConv.writes_planar):
      it does so when the caller passed NCHW (fused.conv.planar_output, set for the call), so the copy
      back to NCHW finds nothing to do.
    Per-call state lives on a per-thread stack, so threads may share one model; while Dynamo traces,
    on a plain list instead (see _stack).
    """

    def __init__(
        self, dtype: torch.dtype | None, channels_last: bool, arena: bool = False, planar_in: bool = False,
        planar_out: bool = False,
    ) -> None:
        self.dtype, self.channels_last, self.arena = dtype, channels_last, arena
        self.planar_in, self.planar_out = planar_in, planar_out
        self._local = threading.local()
        self._traced: list[tuple] = []

    def __reduce__(self):  # copies and pickles start with an empty per-thread stack
        return (_ForwardScope, (self.dtype, self.channels_last, self.arena, self.planar_in, self.planar_out))

    def _prepare(self, a: object, planar: bool = False) -> object:
        if not isinstance(a, torch.Tensor):
            return a
        if self.dtype is not None and a.is_floating_point() and a.dtype != self.dtype:
            a = a.to(self.dtype)
        if self.channels_last and a.dim() == 4 and not (planar and a.is_contiguous()):
            a = a.contiguous(memory_format=torch.channels_last)
        return a

    def _stack(self) -> list[tuple]:
        # Dynamo cannot trace a threading.local on torch 2.11 (setdefault of its __dict__ is unsupported).
        # A traced forward pushes and pops within one graph, so a plain list shared by threads is safe there.
        if torch.compiler.is_compiling():
            return self._traced
        return self._local.__dict__.setdefault("stack", [])

    def enter(self, module: nn.Module, args: tuple) -> tuple:
        stack = self._stack()
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4), None)
        restore = (
            self.channels_last and first is not None and suggest_memory_format(first) != torch.channels_last
        )
        mode = None
        compiling = torch.compiler.is_compiling()
        # is_compiling first: Dynamo cannot trace the other two queries
        if not compiling and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            mode = torch.inference_mode()
            mode.__enter__()
        arena = self.arena and not compiling
        if arena:
            torch.ops.hrnet_fast.cpu_arena_scope(True)
        outer = _UNSET
        # whether the caller passed NCHW, for the call: the head conv writes NCHW then (planar_out), and
        # an mmseg segmentor's logits are made NCHW where the caller's tree of outputs hides them
        if self.channels_last and not compiling:
            outer = getattr(planar_output, "on", None)
            planar_output.on = restore
        stack.append((mode, restore, arena, outer))
        planar = self.planar_in and not compiling
        return tuple(self._prepare(a, planar and k == 0) for k, a in enumerate(args))

    def exit(self, module: nn.Module, args: tuple, output: object) -> object:
        stack = self._stack()
        mode, restore, arena, outer = stack.pop() if stack else (None, False, False, _UNSET)
        try:
            if restore:  # a no-op where the head wrote NCHW already
                output = tree_map(lambda t: t.contiguous() if isinstance(t, torch.Tensor) and t.dim() == 4 else t, output)
        finally:
            if outer is not _UNSET:
                planar_output.on = outer
            if arena:
                torch.ops.hrnet_fast.cpu_arena_scope(False)
            if mode is not None:
                mode.__exit__(None, None, None)
        return output


def optimize(
    model: nn.Module,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    strict: bool = False,
    winograd: bool = True,
    cuda_graph: bool = False,
    streams: bool | None = None,
    tasks: bool | None = None,
    cpu_graph: bool | None = None,
) -> nn.Module:
    """A fused inference copy of `model` (which is left untouched) with the same outputs.

    backend: "auto" (the compiled kernels for the model's device, else Triton on CUDA, else torch),
    "cpu", "cuda", "triton" or "torch". dtype: cast the copy (float16/bfloat16 for cuda/triton); inputs are cast to it on entry.
    What cannot be fused exactly is left as it was, listed in `.hrnet_fast_skipped` and warned about;
    strict=True raises ConversionError instead.
    winograd: on the cpu backend, run 3x3 stride-1 convs by Winograd F(4x4, 3x3) (a quarter of direct
    convolution's multiplies; outputs differ by rounding; the README has the measured speed and
    error); False keeps oneDNN's direct convolution.
    cuda_graph: (CUDA models) capture one CUDA graph per input shape on first use and replay it
    after: the whole forward becomes one launch (see hrnet_fast.graphs.CUDAGraphForward).
    streams: (CUDA models) run each HR module's branches, and then its fused outputs, on parallel
    CUDA streams (hrnet_fast.fused.streams): at small batches one branch leaves most of the GPU idle.
    None (default): on with cuda_graph, whose graph keeps the fork and join and so drops their host
    cost; off without it, where that host cost outweighs the overlap (README, GPU table).
    tasks: (cpu backend) run independent work side by side on threads, each with a share of
    torch.get_num_threads(): an HR module's branches, then its fused outputs, and stage 1's chunks of
    a batch (hrnet_fast.fused.cpu_tasks); outputs are bit-identical either way. None or False
    (default): off, each op splitting its own work, which measured faster on 2 threads (batch 1 and 8)
    and on 16 (README, "Threads").
    cpu_graph: (cpu backend) record the ops each input shape's forward dispatches and replay them from
    C++ once two calls in a row agree, without the Python between them (hrnet_fast.cpu_graphs; bit-identical
    outputs). None (default): on for the cpu backend without tasks, whose threads it cannot record.
    The compiled backends run channels_last inside; outputs come back in the layout eager would
    give (NCHW for an NCHW input). The cpu backend runs each forward with a caching CPU allocator: the
    blocks a forward frees (256 KiB or more) stay for the next one, up to the most ever in use at once;
    torch.ops.hrnet_fast.cpu_arena_release() gives them back (csrc/cpu/cpu_arena.cpp).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, "hrnet_fast_backend"):
        raise ValueError(
            f"this model is already an optimize()d copy (backend {model.hrnet_fast_backend!r}): "
            "call optimize on the original model to get another backend or dtype"
        )
    training = next((n or "<root>" for n, m in model.named_modules() if m.training), None)
    if training is not None:
        raise ValueError(
            f"optimize folds BatchNorm running statistics, so it needs an eval-mode model, but {training} is in "
            "training mode: call model.eval() first"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    chosen = _backend.resolve(backend, device, "conv_bias_act")
    run_dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.float32)
    if chosen == "cpu" and run_dtype != torch.float32:
        if backend == "cpu":
            raise ValueError(f"the cpu backend runs float32 only, got a {run_dtype} model: use backend='torch' for it")
        chosen = "torch"  # auto: the reference runs any dtype (BN still folded)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True replays CUDA graphs, so it needs a model on a CUDA device, got {device}")
    if streams is None:
        streams = cuda_graph
    if streams and device.type != "cuda":
        raise ValueError(f"streams=True runs branches on parallel CUDA streams, so it needs a model on a CUDA device, got {device}")
    tasks = bool(tasks)
    if tasks and chosen != "cpu":
        raise ValueError(f"tasks=True shares the CPU's threads between branches, so it needs the cpu backend, got {chosen!r}")
    if cpu_graph is None:
        cpu_graph = chosen == "cpu" and not tasks
    if cpu_graph and (chosen != "cpu" or tasks):
        raise ValueError(
            "cpu_graph=True replays the ops one thread dispatched, so it needs the cpu backend without tasks, "
            f"got backend {chosen!r}, tasks={tasks}"
        )

    fused = copy.deepcopy(model)
    converter = _Converter(chosen)
    graph = _fx_graph(fused)
    relus = relus_after_convs(fused, graph)
    stem, head = io_convs(fused, graph) if chosen == "cpu" else (None, None)
    with torch.no_grad():
        converter.convert_seg_head(fused)
        converter.skipped += convert_mmseg_heads(fused, chosen)  # mmsegmentation's FCNHead in HRNetV2's form
        if chosen != "torch":  # the backends that run channels_last (the scope below)
            keep_eager_logits_layout(fused)  # an mmseg segmentor's logits, in SegDataSamples too
        fused = converter.convert(fused, "")
        _fold_relus(fused, relus)
        if chosen == "cpu":
            converter.chunk_stages(fused)
    leftovers = [(n, f"{type(m).__name__} left unfolded") for n, m in fused.named_modules() if isinstance(m, FOLDABLE_BN)]
    skipped = converter.skipped + [s for s in leftovers if not any(s[0].startswith(p + ".") for p, _ in converter.skipped)]
    if skipped:
        listing = "; ".join(f"{n or '<root>'}: {why}" for n, why in skipped[:8])
        if strict:
            raise ConversionError(f"optimize(strict=True) cannot fuse {len(skipped)} module(s): {listing}")
        warnings.warn(f"optimize left {len(skipped)} module(s) unfused: {listing}", stacklevel=2)
    if dtype is not None:
        fused = fused.to(dtype)
    for m in fused.modules():
        if isinstance(m, FusedConv):
            m.pack(use_winograd=winograd)
        elif isinstance(m, FusedHRModule):
            m.streams, m.tasks = streams, tasks
        elif isinstance(m, ChunkedStage):
            m.tasks = tasks
    # the cpu backend's stem and head read and write NCHW themselves where their kernel can (io_convs)
    modules = dict(fused.named_modules())
    stem_conv = modules.get(stem) if stem is not None else None
    head_conv = modules.get(head) if head is not None else None
    planar_in = isinstance(stem_conv, FusedConv) and stem_conv.can_read_planar()
    planar_out = isinstance(head_conv, FusedConv) and head_conv.can_write_planar()
    if planar_in:
        stem_conv.reads_planar = True
    if planar_out:
        head_conv.writes_planar = True
    # the compiled backends run channels_last end to end (NHWC tiles for Triton, cuDNN's fast
    # layout for half types, oneDNN's and our Winograd kernel's layout on the CPU)
    scope = _ForwardScope(dtype, channels_last=chosen in ("cpu", "cuda", "triton"), arena=chosen == "cpu",
                          planar_in=planar_in, planar_out=planar_out)
    fused.register_forward_pre_hook(scope.enter)
    fused.register_forward_hook(scope.exit, always_call=True)
    fused.hrnet_fast_backend = chosen
    fused.hrnet_fast_skipped = skipped
    fused.eval()  # not chained: some models' train() returns None (MMPose's backbone)
    fused.requires_grad_(False)
    if cuda_graph:
        CUDAGraphForward.attach(fused)
    if cpu_graph:
        CPUGraphForward.attach(fused)
    return fused
