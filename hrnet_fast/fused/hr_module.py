"""FusedHRModule: an HRNet module's branches as fused blocks, and each fused output in as few passes as possible.

Output i = ReLU(sum_j F_ij(x_j)). The j < i terms (chains of stride-2 conv+BN) are conv_bias_act calls
whose last conv adds into the running sum through `residual` (starting from x_i); the j > i terms
(1x1 conv+BN+nearest upsample) and the ReLU are one fuse_multi_res over that sum.
"""
from __future__ import annotations

import torch
from torch import nn

from hrnet_fast.fused.blocks import conv_bn_pair, fused_conv
from hrnet_fast.fused.folding import fold_conv_bn
from hrnet_fast.fused.streams import run_concurrently
from hrnet_fast.ops import _backend


def is_hr_module(m: nn.Module) -> bool:
    """HighResolutionModule-shaped: branches, fuse_layers and num_branches (official, timm, MMPose)."""
    return all(hasattr(m, a) for a in ("branches", "fuse_layers", "num_branches"))


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _upsample_parts(m: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None] | None:
    """(conv1x1, bn) when `m` is Sequential(Conv2d 1x1, BatchNorm2d, Upsample(nearest))."""
    if not isinstance(m, nn.Sequential) or len(m) != 3 or not isinstance(m[2], nn.Upsample) or m[2].mode != "nearest":
        return None
    pair = conv_bn_pair(m[:2])
    if pair is None or pair[2] or pair[0].kernel_size != (1, 1) or pair[0].stride != (1, 1):
        return None
    return pair[0], pair[1]


def why_not_hr_module(m: nn.Module) -> str | None:
    """Why an HR-shaped module's fusion can't be converted exactly, or None when it can."""
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
                return f"fuse_layers[{i}][{j}] is not Sequential(Conv2d 1x1, BatchNorm2d, Upsample nearest)"
            if j < i and (not isinstance(f, nn.Sequential) or any(conv_bn_pair(s) is None for s in f)):
                return f"fuse_layers[{i}][{j}] is not a chain of Sequential(Conv2d, BatchNorm2d[, ReLU])"
    return None


class FusedHRModule(nn.Module):
    """Drop-in for an HR module in eval mode: list of branch inputs in, list of fused outputs out."""

    def __init__(self, m: nn.Module, branches: nn.ModuleList, backend: str):
        super().__init__()
        self.num_branches = int(m.num_branches)
        self.branches = branches
        self.backend = backend
        self._fuse = _backend.kernel("fuse_multi_res", backend)  # looked up once, not per call
        self.chains = nn.ModuleList()  # chains[i][j] for j < i: ModuleList of FusedConv
        self.lowres_index: list[list[int]] = []
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
            folded = [fold_conv_bn(conv, bn) for _, (conv, bn) in ups]
            for k, (w, _) in enumerate(folded):
                self.register_buffer(f"w_{i}_{k}", w.reshape(w.shape[0], w.shape[1]))
            self.register_buffer(f"b_{i}", torch.stack([b for _, b in folded]).sum(0) if folded else None)
        self.n_out = len(rows)
        # set by optimize(streams=True): branches, then outputs, on parallel CUDA streams
        self.streams = False

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # looked up again: in a fresh process this is what defines the Triton op for a triton model
        self._fuse = _backend.kernel("fuse_multi_res", self.backend)

    def _output(self, i: int, x: list[torch.Tensor]) -> torch.Tensor:
        s = x[i]
        for j, chain in enumerate(self.chains[i]):
            t = x[j]
            for conv in chain[:-1]:
                t = conv(t)
            s = chain[-1](t, s)
        idx = self.lowres_index[i]
        if idx:
            weights = [getattr(self, f"w_{i}_{k}") for k in range(len(idx))]
            s = self._fuse(s, [x[j] for j in idx], weights, getattr(self, f"b_{i}"), True)
        return s

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.streams and x[0].is_cuda and not torch.compiler.is_compiling():
            x = run_concurrently([lambda b=b, xi=xi: b(xi) for b, xi in zip(self.branches, x)], x[0].device)
            if self.n_out == 0:
                return x
            return run_concurrently([lambda i=i: self._output(i, x) for i in range(self.n_out)], x[0].device)
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        if self.n_out == 0:  # a single branch: the official module returns it without fusing
            return x
        return [self._output(i, x) for i in range(self.n_out)]
