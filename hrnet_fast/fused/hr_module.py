"""FusedHRModule: an HRNet module's branches as fused blocks, and each fused output in as few passes as possible.

Output i = ReLU(sum_j F_ij(x_j)). The j < i terms (chains of stride-2 conv+BN) are conv_bias_act calls
whose last conv adds into the running sum through `residual` (starting from x_i); the j > i terms
(1x1 conv+BN, upsampled to x_i's size) and the ReLU are one fuse_multi_res over that sum. On the cpu
backend the chains' first convs from one branch j (towards every output i > j) run as one
conv_bias_act_split (`_split_weights`), with the same bits.

How the j > i terms are upsampled (`fusion_mode`):
- Sequential(conv1x1, BN, Upsample(mode=...)) (the pose HRNet, timm, MMPose with or without
  extra['upsample'], mmsegmentation 1.x, whose Upsample is its own: `_is_upsample`): read off the
  Upsample, nearest or bilinear with its align_corners. A bilinear
  Upsample(scale_factor=s) equals the kernel's interpolation to x_i's exact size when x_i's size is
  x_j's times s (F.interpolate then uses 1/s, which is in/out, as its coordinate scale); at other
  sizes the term runs as the module would (1x1 conv, the Upsample, then a bilinear resize to x_i's size
  with align_corners=False, as mmsegmentation's forward does; MMPose's own forward stops there with a
  size mismatch).
- Sequential(conv1x1, BN) with the interpolation in the module's forward (the segmentation HRNet):
  our reference modules say which (`upsample_mode`, `align_corners`); for any other module the mode
  is found out by running the module and its fused candidates (nearest, bilinear with align_corners
  False and True) on a probe input, and taken only when exactly one candidate reproduces it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hrnet_fast.fused import cpu_tasks
from hrnet_fast.fused.blocks import WinogradBlocks, conv_bn_pair, fused_conv
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.folding import fold_conv_bn
from hrnet_fast.fused.streams import run_concurrently
from hrnet_fast.ops import _backend
from hrnet_fast.ops.basic_blocks import call_branches

# The most taps x input channels (K) of the first strided convs that _split_weights runs as one conv.
# Each op timed in W32's forward (2 threads of an Intel Xeon), split against conv by conv: from the
# 32-channel branch (K = 288) 1.68 against 1.96 ms a forward at batch 1, 11.2 against 12.4 at batch 8;
# W48's 48-channel one (432) 3.78 against 3.93 at batch 1; from W32's 64-channel branch (576) 1.13
# against 1.16 at batch 1 but 6.8 against 6.6 at batch 8: the windows gathered once weigh less there.
_SPLIT_MAX_K = 512


def is_hr_module(m: nn.Module) -> bool:
    """HighResolutionModule-shaped: branches, fuse_layers and num_branches (official, timm, MMPose)."""
    return all(hasattr(m, a) for a in ("branches", "fuse_layers", "num_branches"))


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


# Upsample classes other than nn.Upsample that do what nn.Upsample(scale_factor=s, mode, align_corners) does
# wherever fusion uses them (exact multiples; elsewhere the module itself is run), named by (module,
# qualname) so that the package need not be imported. mmsegmentation 1.x's HRNet fuse layers use
# mmseg.models.utils.wrappers.Upsample: F.interpolate to size int(in * s), which is in * s for HRNet's s = 2**k,
# with the same mode and align_corners (None: False), and the same attributes (size, scale_factor, mode,
# align_corners). Only the class itself: a subclass may do anything in its forward.
UPSAMPLE_LOOKALIKES = frozenset({("mmseg.models.utils.wrappers", "Upsample")})


def _is_upsample(up: nn.Module) -> bool:
    return isinstance(up, nn.Upsample) or (type(up).__module__, type(up).__qualname__) in UPSAMPLE_LOOKALIKES


def _upsample_parts(m: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Upsample | None] | None:
    """(conv1x1, bn, upsample) when `m` is Sequential(Conv2d 1x1, BatchNorm2d[, Upsample nearest/bilinear]);
    upsample is None where the module's forward interpolates (the segmentation HRNet)."""
    if not isinstance(m, nn.Sequential) or len(m) not in (2, 3):
        return None
    up = m[2] if len(m) == 3 else None
    if up is not None and (not _is_upsample(up) or up.mode not in ("nearest", "bilinear") or up.size is not None):
        return None
    pair = conv_bn_pair(m[:2])
    if pair is None or pair[2] or pair[0].kernel_size != (1, 1) or pair[0].stride != (1, 1):
        return None
    return pair[0], pair[1], up


def _upsamplers(m: nn.Module) -> list[nn.Upsample | None]:
    """The Upsample modules of every j > i fuse layer (None where the forward interpolates)."""
    rows = [] if m.fuse_layers is None else list(m.fuse_layers)
    return [_upsample_parts(row[j])[2] for i, row in enumerate(rows) for j in range(i + 1, len(row))]


def why_not_hr_module(m: nn.Module) -> str | None:
    """Why an HR-shaped module's fusion can't be converted exactly, or None when it can (the
    upsampling mode of forward-interpolating modules is decided later: `fusion_mode`)."""
    if getattr(m, "fuse_method", "SUM") != "SUM":
        return f"fuse_method {m.fuse_method!r} is not SUM"
    act = getattr(m, "fuse_act", getattr(m, "relu", None))
    if act is not None and not isinstance(act, nn.ReLU):
        return f"its fuse activation is {type(act).__name__}, not ReLU"
    if m.fuse_layers is None:
        return None
    for i, row in enumerate(m.fuse_layers):
        for j, f in enumerate(row):
            if j == i and not _is_identity(f):
                return f"fuse_layers[{i}][{j}] on the diagonal is {type(f).__name__}, not None/Identity"
            if j > i and _upsample_parts(f) is None:
                return (
                    f"fuse_layers[{i}][{j}] is not Sequential(Conv2d 1x1, BatchNorm2d[, Upsample nearest/bilinear])"
                )
            if j < i and (not isinstance(f, nn.Sequential) or any(conv_bn_pair(s) is None for s in f)):
                return f"fuse_layers[{i}][{j}] is not a chain of Sequential(Conv2d, BatchNorm2d[, ReLU])"
    ups = _upsamplers(m)
    if any(u is None for u in ups) and any(u is not None for u in ups):
        return "some fuse layers upsample with an Upsample module and others without"
    kinds = {(u.mode, bool(u.align_corners) if u.mode == "bilinear" else False) for u in ups if u is not None}
    if len(kinds) > 1:
        return f"its fuse layers upsample in more than one way: {sorted(kinds)}"
    return None


# the modes a forward-interpolating module is probed for, and how close a candidate must come
PROBE_CANDIDATES = (("nearest", False), ("bilinear", False), ("bilinear", True))
PROBE_RTOL = 1e-5


def probe_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|: how far a fused candidate is from the module it would replace."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _branch_in_channels(m: nn.Module, k: int) -> int | None:
    conv = next((c for c in m.branches[k].modules() if isinstance(c, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def probe_inputs(m: nn.Module, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Small random inputs the module's branches take: branch k at 1/2**k of branch 0's size, the
    sizes no multiples of 2 (as stride-2 3x3 convs round: ceil), so exact-size interpolation is tested."""
    g = torch.Generator().manual_seed(0)
    h, w = 3 * 2 ** (m.num_branches - 1) + 1, 4 * 2 ** (m.num_branches - 1) + 3
    xs = []
    for k in range(m.num_branches):
        c = _branch_in_channels(m, k)
        if c is None:
            raise ValueError(f"branch {k} has no conv to read its input channels from")
        xs.append(torch.randn(2, c, h, w, generator=g).to(device=device, dtype=dtype))
        h, w = (h + 1) // 2, (w + 1) // 2
    return xs


def fusion_mode(m: nn.Module) -> tuple[str, bool] | str:
    """(mode, align_corners) of the module's j > i fusion terms, or why it can't be told (a string).

    Read off its Upsample modules or our reference's attributes; otherwise probed (module docstring)."""
    ups = [u for u in _upsamplers(m) if u is not None]
    if ups:
        return ups[0].mode, bool(ups[0].align_corners) if ups[0].mode == "bilinear" else False
    if not _upsamplers(m):  # nothing is upsampled (one output row of one branch, or no fuse layers)
        return "nearest", False
    mode = getattr(m, "upsample_mode", None)
    if mode in ("nearest", "bilinear"):
        return mode, bool(getattr(m, "align_corners", False)) if mode == "bilinear" else False
    return _probe_mode(m)


def _probe_mode(m: nn.Module) -> tuple[str, bool] | str:
    param = next(m.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    probe = m if param is None or param.dtype in (torch.float32, torch.float64) else copy.deepcopy(m).float()
    dtype = torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32
    try:
        xs = probe_inputs(m, dtype, device)
        with torch.no_grad():
            ref = probe([x.clone() for x in xs])
            errors = {}
            for mode, ac in PROBE_CANDIDATES:
                cand = FusedHRModule(probe, probe.branches, "torch", mode, ac)
                out = cand([x.clone() for x in xs])
                if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
                    return "its outputs' number or shapes differ from the fused module's on the probe input"
                errors[(mode, ac)] = max(probe_error(o, r) for o, r in zip(out, ref))
    except Exception as e:  # a module whose forward we cannot run on the probe: leave it as it is
        return f"probing its upsampling mode failed: {type(e).__name__}: {e}"
    matches = [k for k, err in errors.items() if err <= PROBE_RTOL]
    found = ", ".join(f"{mo}{'' if mo == 'nearest' else f' align_corners={ac}'}: {err:.1e}" for (mo, ac), err in errors.items())
    if len(matches) == 1:
        return matches[0]
    if not matches:
        return f"its forward's upsampling matches none of nearest and bilinear (relative errors on a probe input: {found})"
    return f"a probe input cannot tell its upsampling modes apart ({found})"


def branch_steps(branch: nn.Module) -> list[nn.Module]:
    """A branch as the steps of a task chain: a Sequential's children (blocks), else the branch."""
    return list(branch) if isinstance(branch, nn.Sequential) and len(branch) else [branch]


def _exact_multiple(up: nn.Upsample, low: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether Upsample(scale_factor) of `low` equals interpolating it to base's size."""
    sf = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor, up.scale_factor)
    return all(o == i * f for o, i, f in zip(base.shape[-2:], low.shape[-2:], sf))


class FusedHRModule(nn.Module):
    """Drop-in for an HR module in eval mode: list of branch inputs in, list of fused outputs out."""

    def __init__(
        self, m: nn.Module, branches: nn.ModuleList, backend: str, mode: str = "nearest", align_corners: bool = False
    ):
        super().__init__()
        self.num_branches = int(m.num_branches)
        self.mode, self.align_corners = mode, bool(align_corners)
        if backend == "cpu":  # a branch of BasicBlocks as one op (WinogradBlocks), where its convs run Winograd
            branches = nn.ModuleList([WinogradBlocks(b) if WinogradBlocks.applies(b) else b for b in branches])
        self.branches = branches
        self.backend = backend
        self._fuse = _backend.kernel("fuse_multi_res", backend)  # looked up once, not per call
        self.chains = nn.ModuleList()  # chains[i][j] for j < i: ModuleList of FusedConv
        self.lowres_index: list[list[int]] = []
        # lowres_scale[i][k]: a bilinear Upsample(scale_factor) the term comes from, whose result the
        # kernel reproduces only at exact multiples (module docstring); None: interpolate to the exact size
        self.lowres_scale: list[list[nn.Upsample | None]] = []
        rows = [] if m.fuse_layers is None else list(m.fuse_layers)
        for i, row in enumerate(rows):
            ups = [(j, _upsample_parts(row[j])) for j in range(i + 1, self.num_branches)]
            chains = nn.ModuleList()
            for j in range(i):
                steps = [conv_bn_pair(s) for s in row[j]]
                last_of_all = j == i - 1 and not ups  # no fuse_multi_res after: the last conv applies the ReLU
                chains.append(
                    nn.ModuleList(
                        [fused_conv(c, bn, relu, backend) for c, bn, relu in steps[:-1]]
                        + [fused_conv(steps[-1][0], steps[-1][1], last_of_all, backend)]
                    )
                )
            self.chains.append(chains)
            self.lowres_index.append([j for j, _ in ups])
            self.lowres_scale.append([up if up is not None and up.mode == "bilinear" else None for _, (_, _, up) in ups])
            folded = [fold_conv_bn(conv, bn) for _, (conv, bn, _) in ups]
            for k, (w, _) in enumerate(folded):
                w = w.reshape(w.shape[0], w.shape[1])
                if backend == "cpu":  # stored [C_k, C] (seen as [C, C_k]): the rows the CPU kernel's GEMM reads in place
                    w = w.t().contiguous().t()
                self.register_buffer(f"w_{i}_{k}", w)
            self.register_buffer(f"b_{i}", torch.stack([b for _, b in folded]).sum(0) if folded else None)
        self.n_out = len(rows)
        # per source branch j: (the first convs' weight states, the split's weight and bias, or None)
        self._split_cache: dict[int, tuple] = {}
        # set by optimize(streams=True): branches, then outputs, on parallel CUDA streams
        self.streams = False
        # set by optimize(tasks=True) (cpu backend): branches, then outputs, side by side on threads
        self.tasks = False

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_split_cache"] = {}  # derived weights (inference tensors, which cannot be pickled): made again
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("mode", "nearest")  # absent from states saved before bilinear fusion
        state.setdefault("align_corners", False)
        state.setdefault("lowres_scale", [[None] * len(r) for r in state["lowres_index"]])
        state.setdefault("tasks", False)
        state["_split_cache"] = {}  # absent from states saved before conv_bias_act_split
        super().__setstate__(state)
        # looked up again: in a fresh process this is what defines the Triton op for a triton model
        self._fuse = _backend.kernel("fuse_multi_res", self.backend)

    def _output(self, i: int, x: list[torch.Tensor], s: torch.Tensor | None = None) -> torch.Tensor:
        """Output i; `s`: its j < i terms already summed into x_i (_outputs)."""
        if s is None:
            s = x[i]
            for j in range(len(self.chains[i])):
                s = self._down(i, j, x[j], s)
        idx = self.lowres_index[i]
        if idx:
            weights = [getattr(self, f"w_{i}_{k}") for k in range(len(idx))]
            lows = [x[j] for j in idx]
            scales = self.lowres_scale[i]
            inexact = [k for k, up in enumerate(scales) if up is not None and not _exact_multiple(up, lows[k], s)]
            if inexact:  # the module's own two-step resize (module docstring): rare sizes, plain torch
                for k in inexact:
                    t = up_t = scales[k](F.conv2d(lows[k], weights[k][:, :, None, None]))
                    if up_t.shape[-2:] != s.shape[-2:]:
                        t = F.interpolate(up_t, size=s.shape[-2:], mode="bilinear", align_corners=False)
                    s = s + t
                keep = [k for k in range(len(idx)) if k not in inexact]
                lows, weights = [lows[k] for k in keep], [weights[k] for k in keep]
                if not lows:
                    return torch.relu(s + getattr(self, f"b_{i}").reshape(1, -1, 1, 1))
            s = self._fuse(s, lows, weights, getattr(self, f"b_{i}"), True, self.mode, self.align_corners)
        return s

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.streams and x[0].is_cuda and not torch.compiler.is_compiling():
            x = run_concurrently([lambda b=b, xi=xi: b(xi) for b, xi in zip(self.branches, x)], x[0].device)
            if self.n_out == 0:
                return x
            return run_concurrently([lambda i=i: self._output(i, x) for i in range(self.n_out)], x[0].device)
        if self.tasks and x[0].device.type == "cpu" and cpu_tasks.may_fan_out():
            return self._forward_tasks(x)
        x = self._branches(x)
        if self.n_out == 0:  # a single branch: the official module returns it without fusing
            return x
        return self._outputs(x)

    def _outputs(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every output. On the cpu backend, each branch j's chains towards the outputs i > j start with
        one conv_bias_act_split of x_j where _split_weights allows (else each with its own conv); the
        chains' other convs and each output's sum follow in the same order as _output's."""
        if self.backend != "cpu" or torch.compiler.is_compiling() or torch.is_grad_enabled():
            return [self._output(i, x) for i in range(self.n_out)]
        sums = list(x[: self.n_out])
        for j in range(self.n_out - 1):
            targets = range(j + 1, self.n_out)
            split = self._split_weights(j)
            if split is None:
                firsts = [None] * len(targets)
            else:
                w, b, first_convs = split
                residuals = [sums[i] if len(self.chains[i][j]) == 1 else None for i in targets]
                firsts = torch.ops.hrnet_fast.conv_bias_act_split(
                    x[j], w, b, first_convs[0].stride, first_convs[0].padding,
                    [c.weight.shape[0] for c in first_convs], residuals, [c.relu for c in first_convs])
            for i, first in zip(targets, firsts):
                if first is None:
                    sums[i] = self._down(i, j, x[j], sums[i])
                elif len(self.chains[i][j]) == 1:  # the chain was its first conv, which added into the sum
                    sums[i] = first
                else:
                    sums[i] = self._down(i, j, first, sums[i], first_done=True)
        return [self._output(i, x, sums[i]) for i in range(self.n_out)]

    def _down(self, i: int, j: int, t: torch.Tensor, s: torch.Tensor, first_done: bool = False) -> torch.Tensor:
        """Sum s plus chain i, j (stride-2 convs from branch j to output i's size) of t, its last conv
        adding into s; first_done: t is the chain's first conv's output already."""
        *convs, last = self.chains[i][j]  # iterated: a slice of a ModuleList builds a new ModuleList on every call
        for k, conv in enumerate(convs):
            if k or not first_done:
                t = conv(t)
        return last(t, s)

    def _split_weights(self, j: int) -> tuple[torch.Tensor, torch.Tensor, list[FusedConv]] | None:
        """The first convs of branch j's chains (towards outputs j+1, ...) as one conv: their weights
        stacked (stored HWIO, as conv_gemm reads them) and biases, and the convs; None where there is
        one, or they differ in window, stride or padding, or conv_gemm would not run each of them, or an
        output other than the last does not start at a whole panel of 16 channels, or their K is past
        _SPLIT_MAX_K. Made again when any of their weights or biases changed (version or storage)."""
        convs = [self.chains[i][j][0] for i in range(j + 1, self.n_out)]
        for c in convs:
            if isinstance(c, FusedConv):
                c._refresh()  # their own derived state, as their forward would
        key = tuple((c.weight._version, c.weight.data_ptr(), c.bias._version, c.bias.data_ptr())
                    if isinstance(c, FusedConv) and c.bias is not None else None for c in convs)
        cached = self._split_cache.get(j)
        if cached is not None and cached[0] == key:
            return cached[1]
        split = None
        first = convs[0]
        offsets = [sum(c.weight.shape[0] for c in convs[:k]) for k in range(len(convs))]
        if (
            len(convs) > 1
            and None not in key
            and first.weight[0].numel() <= _SPLIT_MAX_K
            and all(
                c.backend == "cpu" and not c._winograd and c._packed is None and c._runs_conv_gemm()
                and c.weight.shape[1:] == first.weight.shape[1:] and c.stride == first.stride and c.padding == first.padding
                for c in convs
            )
            and all(o % 16 == 0 for o in offsets)
        ):
            # stacked slice by slice (made once, not per call), the weight's rows HWIO
            total = offsets[-1] + convs[-1].weight.shape[0]
            w = first.weight.new_empty((total, *first.weight.shape[1:])).permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
            b = first.bias.new_empty(total)
            for c, o in zip(convs, offsets):
                w[o : o + c.weight.shape[0]].copy_(c.weight)
                b[o : o + c.weight.shape[0]].copy_(c.bias)
            split = (w, b, convs)
        self._split_cache[j] = (key, split)
        return split

    def _branches(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each branch on its input: on the cpu backend, where every branch is a WinogradBlocks that runs as
        one op, all of them as one winograd_branches call (side by side on shares of the threads where each
        gets two or more; csrc/cpu/winograd_branches.cpp), else branch by branch."""
        if self.backend == "cpu" and len(x) > 1 and all(isinstance(b, WinogradBlocks) for b in self.branches):
            args = [b.op_args(xi) for b, xi in zip(self.branches, x)]
            if all(a is not None for a in args):
                return call_branches(x, *zip(*args))
        return [branch(xi) for branch, xi in zip(self.branches, x)]

    def _forward_tasks(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """forward with the work side by side on threads (hrnet_fast.fused.cpu_tasks): the branches
        block by block, then the outputs. The whole batch goes through every op: splitting it into
        parts as well measured no faster at batch 8 on 2 threads (0.88-1.04x), and each part's ops would
        hold the GIL for their own Python calls."""
        x = cpu_tasks.run_chains([(branch_steps(branch), xi) for branch, xi in zip(self.branches, x)])
        if self.n_out == 0:
            return x
        return cpu_tasks.run_chains([([lambda _, i=i: self._output(i, x)], None) for i in range(self.n_out)])
