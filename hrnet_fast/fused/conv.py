"""FusedConv: one folded Conv(+BN)(+residual)(+ReLU) as a single conv_bias_act call on a fixed backend."""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from hrnet_fast import _extension
from hrnet_fast.fused import staleness
from hrnet_fast.ops import _backend
from hrnet_fast.ops._meta import conv_output_size
from hrnet_fast.ops.conv import prepack
from hrnet_fast.ops.winograd import OP as WINOGRAD_OP
from hrnet_fast.ops.winograd import choose_tile, why_not_winograd

_MAX_PACKED_SHAPES = 4  # input shapes a FusedConv keeps oneDNN-packed weights for (oldest dropped first)
# Serialises every change to the derived-weight caches (lookups need no lock: one dict.get is atomic),
# so threads sharing a model can meet new input shapes or reloaded weights at the same time.
_CACHE_LOCK = threading.Lock()
# Input channels below which conv_bias_act's kernel reads an NCHW input itself (kConvGemmMinCin).
_FEW_CIN = 8
# Per thread, set for the forward of an optimize()d model that runs channels_last (convert._ForwardScope):
# `on` where the caller passed NCHW, so a head conv with writes_planar writes NCHW (False: channels_last;
# None or unset: no such forward is running).
planar_output = threading.local()


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
        # the op for the backend, looked up once: the hot path does no checks or lookups
        self._op = _backend.kernel("conv_bias_act", backend)
        # oneDNN-layout weights for the cpu backend by input shape (None: dense weight). Not buffers:
        # they cannot be copied or saved. Keyed by shape because oneDNN's preferred weight layout
        # depends on it (and on the CPU): a weight packed for another shape is reordered on every call.
        self._packed: dict[tuple[int, ...], torch.Tensor] | None = None
        # Whether this conv runs conv3x3_winograd (cpu backend, 3x3 stride 1). Its weight stays dense:
        # the kernel transforms it on every call, panel by panel in cache, which measured as fast as
        # reading a kept transformed copy (1.8x or 4x the bytes) from memory, so the model holds no such
        # copy (README, "Memory").
        self._winograd = False
        # What that kernel reads (None where this conv does not run it): the buffer itself, OIHW and
        # contiguous, which the kernel reads in place (README, "Memory": a panel-major copy beside it
        # measured no faster on the AMD EPYC and held 86 MiB more for W32).
        self._winograd_weight: torch.Tensor | None = None
        self.use_winograd = False
        # conv3x3_winograd's overload, looked up in pack() (a name lookup through torch.ops costs more
        # than a small conv's epilogue); None when this conv does not run it
        self._winograd_op = None
        # (version, address, dtype) of the weight the caches were derived from: load_state_dict and
        # in-place edits bump the version, a replaced or cast weight has another address.
        self._derived_from: tuple | None = None
        # cpu: the model's stem conv, given the caller's NCHW image as it is (its kernel reads the
        # planes), and head conv, writing NCHW where the caller passed NCHW: optimize() sets them (io_convs)
        self.reads_planar = False
        self.writes_planar = False

    def pack(self, use_winograd: bool | None = None) -> None:
        """Prepare the weight for the backend, once. cuda: channels_last (cuDNN would otherwise
        transform an NCHW weight for a channels_last input on every call). triton: stored
        [kH, kW, C_in, C_out] (seen through OIHW strides), so weight tiles load contiguously along
        C_out. cpu (float32): for a 3x3 stride-1 conv when `use_winograd` (and the kernel is built with
        a vector variant this CPU runs: its portable build is for correctness, and slower than oneDNN
        there), Winograd, the kernel's per-call transform reading the weight in place, OIHW
        (_winograd_weight); where conv_bias_act's own direct kernel takes the conv (see
        _runs_conv_gemm), stored [kH, kW, C_in, C_out], the rows it reads in place; else reordered
        into oneDNN's blocked layout (per input shape, on first use).
        The values, and so state_dict, never change."""
        if use_winograd is not None:
            self.use_winograd = use_winograd
        if self.backend == "cuda":
            self._buffers["weight"] = self.weight.contiguous(memory_format=torch.channels_last)
        elif self.backend == "triton":
            self._buffers["weight"] = self.weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
        packed: dict[tuple[int, ...], torch.Tensor] | None = None
        winograd = False
        kernel_weight = None
        if self.backend == "cpu" and self.weight.dtype == torch.float32:
            if (
                self.use_winograd
                and why_not_winograd(self.weight, self.stride, self.padding) is None
                and _extension.has_kernel(WINOGRAD_OP, "CPU")
                and torch.ops.hrnet_fast.cpu_isa() != "base"
            ):
                winograd = True
                if not self.weight.is_contiguous():
                    self._buffers["weight"] = self.weight.contiguous()
                kernel_weight = self._buffers["weight"]
            elif self._runs_conv_gemm():
                if not self.weight.permute(2, 3, 1, 0).is_contiguous():
                    self._buffers["weight"] = self.weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
            else:
                # oneDNN's packed weights, filled by forward once per input shape; or, for shapes whose
                # conv is weight-bound (few output pixels), the dense weight stored as conv_gemm reads it
                packed = {}
                if not self.weight.permute(2, 3, 1, 0).is_contiguous():
                    self._buffers["weight"] = self.weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
        op = torch.ops.hrnet_fast.conv3x3_winograd.default if winograd else None
        # swapped in together at the end: a thread running forward meanwhile sees old or new caches
        self._packed, self._winograd, self._winograd_op, self._winograd_weight = packed, winograd, op, kernel_weight
        self._derived_from = self._weight_state()

    def _runs_conv_gemm(self) -> bool:
        """Whether conv_bias_act's own direct kernel (csrc/cpu/conv_gemm.cpp) runs this conv on a
        channels_last input: the same stride and padding both ways, and C_in and the window within
        its bounds with the CPU kernels now in use (conv_gemm_takes, csrc/cpu/winograd_isa.h says
        why). It reads the dense weight, so no oneDNN-packed copy is made (oneDNN runs any other input)."""
        c_in, k_h, k_w = self.weight.shape[1:]
        return (
            self.stride[0] == self.stride[1]
            and self.padding[0] == self.padding[1]
            and _extension.has_kernel("conv_bias_act", "CPU")
            and torch.ops.hrnet_fast.conv_gemm_takes(c_in, k_h, k_w)
        )

    def _weight_state(self, w: torch.Tensor | None = None) -> tuple:
        w = self._buffers["weight"] if w is None else w
        return (w._version, w.data_ptr(), w.dtype)

    def _refresh(self, w: torch.Tensor | None = None) -> None:
        """Derive the cpu backend's weights again when the dense weight (`w`, the buffer when None)
        changed since they were made (load_state_dict, an in-place edit, a replaced weight): they must
        never go stale."""
        if self._derived_from == self._weight_state(w):
            return
        if self.weight.dtype != torch.float32:
            raise RuntimeError(
                f"this model was optimized for the cpu backend, which runs float32 only, but its weights are now "
                f"{self.weight.dtype}: optimize the {self.weight.dtype} model itself (it runs on the torch backend)"
            )
        with _CACHE_LOCK:
            if self._derived_from != self._weight_state():
                self.pack()

    def _packed_for(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        packed = self._packed
        w = packed.get(key)
        if w is None:
            with _CACHE_LOCK:
                w = packed.get(key)
                if w is None:
                    if len(packed) >= _MAX_PACKED_SHAPES:
                        packed.pop(next(iter(packed)))
                    if self._weight_bound(key):
                        w = packed[key] = self._buffers["weight"]
                    else:
                        w = packed[key] = prepack(self.weight, key, self.stride, self.padding)
        return w

    def can_read_planar(self) -> bool:
        """Whether this conv's cpu kernel reads an NCHW input itself (a few-channel image)."""
        return self._runs_planar() and self.weight.shape[1] < _FEW_CIN

    def can_write_planar(self) -> bool:
        """Whether this conv's cpu kernel writes an NCHW output itself."""
        return self._runs_planar()

    def _runs_planar(self) -> bool:
        return self.backend == "cpu" and self._packed is None and not self._winograd and self._runs_conv_gemm()

    def _weight_bound(self, shape: tuple[int, ...]) -> bool:
        """Whether conv_bias_act's own kernel runs this conv on inputs of `shape`, K past kConvGemmMaxK
        but few output pixels against a large weight, read once as two streams of its rows
        (csrc/cpu/conv_gemm_cols_core.h)."""
        n, _, h, w = self.output_shape(shape)
        c_out, c_in, k_h, k_w = self.weight.shape
        return (
            self.stride[0] == self.stride[1]
            and self.padding[0] == self.padding[1]
            and torch.ops.hrnet_fast.conv_gemm_weight_bound(n * h * w, c_in, k_h, k_w, c_out)
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001  (nn.Module's signature)
        # .to()/.float() replace the tensors without a registration hook: recorded CPU graphs would
        # otherwise keep reading the old ones
        out = super()._apply(fn, recurse)
        staleness.tensors_replaced(self)
        return out

    def __getstate__(self) -> dict:
        # a oneDNN tensor has no storage to copy or pickle: drop it, and pack again on the other side
        state = self.__dict__.copy()
        state["_packed"] = state["_derived_from"] = state["_winograd_op"] = state["_winograd_weight"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("use_winograd", False)  # absent from states saved by versions without Winograd
        state.setdefault("reads_planar", False)  # and these, by versions before them
        state.setdefault("writes_planar", False)
        self.__dict__.update(state)
        # looked up again: in a fresh process this is what defines the Triton op for a triton model
        self._op = _backend.kernel("conv_bias_act", self.backend)
        self.pack()

    def output_shape(self, shape: Sequence[int]) -> list[int]:
        """[N, C_out, H_out, W_out] of this conv on an input of `shape` [N, C_in, H, W]."""
        return conv_output_size(shape, self.weight.shape, self.stride, self.padding)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """act(conv(x) + bias + residual); into `out` (the output's shape) where given, which is returned."""
        # the buffers through their dict: the module's __getattr__ costs a microsecond a lookup, and a
        # batch-1 forward makes ~300 of these calls (README, "Where the time goes")
        w, bias = self._buffers["weight"], self._buffers["bias"]
        if self.backend == "cpu" and not torch.compiler.is_compiling():
            if x.dim() != 4:
                raise ValueError(f"expected a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
            if x.shape[1] != w.shape[1]:
                raise ValueError(
                    f"input must be [N, {w.shape[1]}, H, W] (this conv's input channels), got shape {tuple(x.shape)}"
                )
            if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
                raise RuntimeError(
                    "the cpu backend of an optimize()d model runs inference only (its weights are pre-packed), "
                    "but the input requires grad: call it under torch.no_grad() or torch.inference_mode(), "
                    "or use optimize(model, backend='torch') to differentiate through it"
                )
            self._refresh(w)
            w = self._buffers["weight"]  # pack() may have replaced it
            if x.shape[1] >= _FEW_CIN and not x.is_contiguous(memory_format=torch.channels_last):
                # NCHW from code between the fused modules (OCRNet's attention reshapes its context so):
                # channels_last first, as the backend runs end to end, so the output is too and the next
                # conv (after a torch.cat, say) reads it as it is. oneDNN given NCHW copied it in and out
                # of its layout: OCRNet-W48's 1024-channel 1x1 conv at 512x1024 spent 150 of its 250 ms so.
                x = x.contiguous(memory_format=torch.channels_last)
                if residual is not None:
                    residual = residual.contiguous(memory_format=torch.channels_last)
        if self._winograd:
            c_out = w.shape[0]
            tile = choose_tile(x.shape, c_out)
            y = self._winograd_op(x, self._winograd_weight, c_out, bias, residual, self.relu, tile)
            return y if out is None else out.copy_(y)
        if self._packed is not None and not torch.compiler.is_compiling():
            w = self._packed_for(x)
        if out is None and self.backend == "cpu" and not torch.compiler.is_compiling():
            # the stem given an NCHW image writes channels_last, the head writes NCHW where asked
            if self.reads_planar and not x.is_contiguous(memory_format=torch.channels_last) and x.is_contiguous():
                out = torch.empty(self.output_shape(x.shape), dtype=x.dtype, memory_format=torch.channels_last)
            elif self.writes_planar and getattr(planar_output, "on", False):
                out = torch.empty(self.output_shape(x.shape), dtype=x.dtype)
        if out is None:
            return self._op(x, w, bias, self.stride, self.padding, residual, self.relu)
        if self.backend == "cpu" and not torch.compiler.is_compiling():
            torch.ops.hrnet_fast.conv_bias_act_into(x, w, bias, self.stride, self.padding, residual, self.relu, out)
            return out
        return out.copy_(self._op(x, w, bias, self.stride, self.padding, residual, self.relu))

    def extra_repr(self) -> str:
        k = tuple(self.weight.shape)
        return f"{k[1]}->{k[0]}, kernel={k[2:]}, stride={self.stride}, padding={self.padding}, relu={self.relu}, backend={self.backend}" + (
            ", winograd" if self._winograd else ""
        )
