"""The ways to run the model that `hrnet-fast bench` compares: each prepares a callable or says why it can't.

A contender gets the eval model (in the bench dtype, on the bench device), the fp32 model it was cast
from, and the input; it returns a Prepared (what to call, whether it runs through PyTorch's
dispatcher, set-up time such as compilation) or raises Skip with a one-line reason.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Skip(Exception):
    """This contender cannot run here; the message (one line) goes into the row's `skipped` column."""


@dataclass
class Context:
    model: nn.Module  # eval, bench dtype, bench device
    model_fp32: nn.Module  # the same weights in float32 (what optimize and the ONNX export start from)
    x: torch.Tensor
    dtype: torch.dtype
    threads: int
    workdir: Path  # for exported files; removed by the caller
    compile_mode: str = "default"  # torch.compile's mode
    onnx_cache: Path | None = None  # where exported ONNX models are kept for later runs (None: exported per run)

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclass
class Prepared:
    call: Callable[..., Any]
    args: tuple[Any, ...]
    torch_path: bool  # its ops go through the dispatcher: countable, CUDA-graph capturable
    setup_s: float | None = None
    host_timed: bool = False  # synchronous outside torch's CUDA streams (ONNX Runtime): wall clock, not CUDA events

    def __call__(self) -> Any:
        with torch.inference_mode():
            return self.call(*self.args)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def eager(ctx: Context) -> Prepared:
    return Prepared(ctx.model, (ctx.x,), torch_path=True)


def eager_channels_last(ctx: Context) -> Prepared:
    model = copy.deepcopy(ctx.model).to(memory_format=torch.channels_last)
    return Prepared(model, (ctx.x.contiguous(memory_format=torch.channels_last),), torch_path=True)


def _hrnet_fast(
    backend: str, streams: bool = False, tasks: bool | None = None, cpu_graph: bool | None = None
) -> Callable[[Context], Prepared]:
    def prepare(ctx: Context) -> Prepared:
        dev = ctx.device.type
        if backend in ("cpu", "cuda") and dev != backend:
            raise Skip(f"the {backend} backend runs on {backend} tensors; this run is on {dev}")
        if backend == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("Triton on CPU runs only in its interpreter (TRITON_INTERPRET=1), far too slow for a whole model")
        import hrnet_fast
        from hrnet_fast.fused.cpu_tasks import POOL_FREE_THREADS

        if tasks and ctx.threads > POOL_FREE_THREADS:
            raise Skip(f"tasks=True on {ctx.threads} threads gives task workers OpenMP pools of their own, which "
                       f"would slow every contender timed after it here: timed at up to {POOL_FREE_THREADS} threads only")

        t0 = time.perf_counter()
        try:
            fast = hrnet_fast.optimize(ctx.model_fp32, backend=backend, dtype=None if ctx.dtype == torch.float32 else ctx.dtype,
                            streams=streams, tasks=tasks, cpu_graph=cpu_graph)
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as e:
            raise Skip(f"optimize(backend={backend!r}) failed: {_first_line(e)}") from None
        return Prepared(fast, (ctx.x,), torch_path=True, setup_s=time.perf_counter() - t0)

    return prepare


def compiled(ctx: Context) -> Prepared:
    """torch.compile (--compile-mode; "reduce-overhead" replays CUDA graphs); compilation happens
    here, in the first calls, outside the timing."""
    torch._dynamo.reset()
    # static shapes: one compile per batch, no dynamic-shape kernels in the timed code
    model = torch.compile(ctx.model, dynamic=False, mode=None if ctx.compile_mode == "default" else ctx.compile_mode)
    prepared = Prepared(model, (ctx.x,), torch_path=False)
    t0 = time.perf_counter()
    try:
        for _ in range(3 if ctx.compile_mode == "reduce-overhead" else 1):  # cudagraph trees record on call 2-3
            prepared()
    except Exception as e:  # noqa: BLE001  (a compiler failure is a result to report, not a crash)
        raise Skip(f"torch.compile failed: {_first_line(e)}") from None
    prepared.setup_s = time.perf_counter() - t0
    return prepared


def ort_session_options(threads: int) -> Any:
    """The ONNX Runtime contender's session options: all graph optimisations, `threads` intra-op threads,
    one node at a time (its parallel executor measured slower on W32: README, "Threads")."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def onnxruntime(ctx: Context) -> Prepared:
    """ONNX Runtime on the exported eager model: all graph optimisations, intra-op threads = --threads."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install onnxruntime)") from None
    if ctx.dtype != torch.float32:
        raise Skip(f"the ONNX Runtime contender runs float32 only, this run is {str(ctx.dtype).removeprefix('torch.')}")
    providers = ["CPUExecutionProvider"]
    if ctx.device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider"]
    x_cpu = ctx.x.detach().cpu()
    t0 = time.perf_counter()
    path = _onnx_export(ctx.model_fp32, x_cpu, ctx.workdir, ctx.onnx_cache)
    sess = ort.InferenceSession(str(path), ort_session_options(ctx.threads), providers=providers)
    name = sess.get_inputs()[0].name
    x_np = x_cpu.numpy()

    def run(x_np: Any) -> Any:
        return sess.run(None, {name: x_np})[0]

    return Prepared(run, (x_np,), torch_path=False, setup_s=time.perf_counter() - t0, host_timed=True)


CONTENDERS: dict[str, Callable[[Context], Prepared]] = {
    "eager": eager,
    "eager_cl": eager_channels_last,
    "hrnet_fast_cpu": _hrnet_fast("cpu"),
    "hrnet_fast_cpu_tasks": _hrnet_fast("cpu", tasks=True),  # branches side by side on threads (off by default)
    "hrnet_fast_cpu_no_graph": _hrnet_fast("cpu", cpu_graph=False),  # every forward through the Python modules
    "hrnet_fast_cuda": _hrnet_fast("cuda"),
    "hrnet_fast_cuda_streams": _hrnet_fast("cuda", streams=True),
    "hrnet_fast_triton": _hrnet_fast("triton"),
    "compile": compiled,
    "onnxruntime": onnxruntime,
}


def onnx_key(model: nn.Module, x: torch.Tensor) -> str:
    """What an exported model depends on: every weight's bytes, the input's shape and the exporter's torch."""
    h = hashlib.blake2b(f"{torch.__version__} {tuple(x.shape)} {type(model).__qualname__}".encode(), digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _onnx_export(model: nn.Module, x: torch.Tensor, workdir: Path, cache: Path | None) -> Path:
    """The ONNX file of `model` on input `x`: exported into `workdir`, or, with a `cache` folder, taken
    from there when an export of the same weights and input shape is there, else exported into it (the
    exporter takes ~15 s for W32, once per batch size and process, and `hrnet_fast.bench.cpu_threads`
    runs a process per thread count)."""
    if cache is None:
        return _export_into(model, x, workdir / f"model_b{x.shape[0]}")
    final = cache / onnx_key(model, x)
    if not (final / "model.onnx").exists():
        # exported beside and renamed into place whole, with any external-data files the exporter wrote,
        # so that a concurrent or interrupted run never sees half a model
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=cache))
        try:
            _export_into(model, x, tmp)
            tmp.rename(final)
        except OSError:  # another run put it there first
            if not (final / "model.onnx").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "model.onnx"


def _export_into(model: nn.Module, x: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    try:
        # the exporter reports progress on stdout, which belongs to the results table
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            torch.onnx.export(copy.deepcopy(model).cpu(), (x,), str(path), input_names=["x"], output_names=["y"], verbose=False)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"torch.onnx.export failed: {_first_line(e)}") from None
    return path


def make_workdir() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for exported models, removed when the run ends."""
    return tempfile.TemporaryDirectory(prefix="hrnet_fast_bench_")
