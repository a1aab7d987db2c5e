"""When a graphed model's tensors were replaced: the counter hrnet_fast.cpu_graphs checks before a replay.

It lives below both: torch's registration hooks (installed by cpu_graphs) bump it when a module of a
graphed model gets a parameter, buffer or submodule set, and modules that replace their own tensors
without those hooks (FusedConv._apply: `.to()`, `.float()`) bump it themselves.
"""
from __future__ import annotations

from typing import Any

from torch import nn

# Set on every module of a graphed model (in its __dict__, so copies and pickles keep it): only those
# make graphs stale, not other models built in the process (torch.compile's, the ONNX exporter's).
MARK = "_hrnet_fast_graphed"

generation = [0]


def tensors_replaced(module: nn.Module, *_: Any) -> None:
    """`module` got new tensors or submodules: graphs that may read its old ones go stale."""
    if module.__dict__.get(MARK, False):
        generation[0] += 1
