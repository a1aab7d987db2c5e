"""FusedConv: one folded Conv(+BN)(+residual)(+ReLU) as a single conv_bias_act call on a fixed backend."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hrnet_fast.ops.conv_bias_act import conv_bias_act_reference, prepack

# The op each backend runs, resolved once at optimize() time: the hot path does no checks or lookups.


def _torch_op(x, w, b, stride, padding, residual, relu):
    return conv_bias_act_reference(x, w, b, stride, padding, residual, relu)


def _compiled_op(x, w, b, stride, padding, residual, relu):
    return torch.ops.hrnet_fast.conv_bias_act(x, w, b, stride, padding, residual, relu)


def _triton_op(x, w, b, stride, padding, residual, relu):
    return torch.ops.hrnet_fast.conv_bias_act_triton(x, w, b, stride, padding, residual, relu)


CONV_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "torch": _torch_op,
    "cpu": _compiled_op,
    "cuda": _compiled_op,
    "triton": _triton_op,
}


class FusedConv(nn.Module):
    """act(conv2d(x, weight) + bias + residual) with BN already folded into weight and bias."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        relu: bool,
        backend: str,
    ):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.stride, self.padding, self.relu = list(stride), list(padding), relu
        self.backend = backend
        self._op = CONV_OPS[backend]
        # oneDNN-layout weight for the cpu backend (not a buffer: it cannot be copied or saved)
        self._packed: torch.Tensor | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, relu: bool, backend: str) -> "FusedConv":
        return cls(weight, bias, conv.stride, conv.padding, relu, backend)

    def pack(self) -> None:
        """Reorder the weight once into oneDNN's blocked layout (cpu backend, float32)."""
        if self.backend == "cpu" and self.weight.dtype == torch.float32:
            self._packed = prepack(self.weight, [1, self.weight.shape[1], 32, 32], self.stride, self.padding)

    def __getstate__(self) -> dict:
        # a oneDNN tensor has no storage to copy or pickle: drop it, and pack again on the other side
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pack()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if self._packed is None or torch.compiler.is_compiling() else self._packed
        return self._op(x, w, self.bias, self.stride, self.padding, residual, self.relu)

    def extra_repr(self) -> str:
        k = tuple(self.weight.shape)
        return f"{k[1]}->{k[0]}, kernel={k[2:]}, stride={self.stride}, padding={self.padding}, relu={self.relu}, backend={self.backend}"
