"""FusedHRStage: a Sequential of FusedHRModules (an HRNet stage) whose task chains run across module
boundaries on the cpu backend, with optimize(tasks=True) (off by default: hrnet_fast/fused/cpu_tasks.py).

A module's forward with tasks (FusedHRModule._forward_tasks) runs its branches side by side, waits for
all of them, then its fused outputs side by side, and waits again. But output i of one module is all
that branch i of the next needs, so here output i and the next module's branch i are one chain: a
stage of K modules waits K + 1 times instead of 2K. Each wait leaves a worker idle while the last
steps finish, and the outputs' steps differ most in cost (output 0 adds upsampled 1x1 convs, the last
output runs chains of stride-2 3x3 convs). Outputs are bit-identical: every step is the same op calls
on the same inputs. Children keep their names, so state_dict is the Sequential's.

W32 on 2 threads here, in turns in one process against the modules' own tasks: 1.02-1.07x at batch 8
(the outputs' stride-2 convs take milliseconds there), 1.00-1.01x at batch 1 (2026-11-26, both sides
with the task workers' OpenMP pool that was fixed later that day).
"""
from __future__ import annotations

import torch
from torch import nn

from hrnet_fast.fused import cpu_tasks
from hrnet_fast.fused.hr_module import FusedHRModule, branch_steps


class FusedHRStage(nn.Sequential):
    """Drop-in for a Sequential of FusedHRModules: list of branch inputs in, list of outputs out."""

    def __init__(self, stage: nn.Sequential) -> None:
        super().__init__()
        for name, module in stage.named_children():
            self.add_module(name, module)

    def _pipelines(self, x: list[torch.Tensor]) -> bool:
        """Whether this forward runs the chains across modules (module docstring): on the cpu
        backend, with every module's tasks wanted, each module's outputs feeding the next's branches."""
        mods = list(self)  # tasks first: off by default, so most forwards stop at the first check
        if not mods or not all(isinstance(m, FusedHRModule) and m.tasks for m in mods) or x[0].device.type != "cpu":
            return False
        if not cpu_tasks.may_fan_out():
            return False
        return all(prev.n_out == nxt.num_branches for prev, nxt in zip(mods, mods[1:]))

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self._pipelines(x):
            return super().forward(x)
        mods = list(self)
        ys = cpu_tasks.run_chains([(branch_steps(b), xi) for b, xi in zip(mods[0].branches, x)])
        for prev, mod in zip(mods, mods[1:]):
            # chain i: output i of the previous module (its input value unused), then branch i's blocks
            ys = cpu_tasks.run_chains(
                [([lambda _, i=i, p=prev, ys=ys: p._output(i, ys)] + branch_steps(b), None) for i, b in enumerate(mod.branches)]
            )
        last = mods[-1]
        if last.n_out == 0:
            return ys
        return cpu_tasks.run_chains([([lambda _, i=i: last._output(i, ys)], None) for i in range(last.n_out)])
