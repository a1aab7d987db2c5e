"""The whole-model benchmark behind `hrnet-fast bench`: every contender, checked against eager, then timed."""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hrnet_fast.bench import contenders as C
from hrnet_fast.bench import timing
from hrnet_fast.profile import count_ops, held_bytes, peak_bytes, rss_bytes
from hrnet_fast.bench.model import BenchError, build_model, randomize, resolve_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |out - eager| / max |eager| above this marks the row FAIL (half types: eager itself rounds more)
REL_TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
# fp32 on a GPU whose convolutions run in TF32 (torch's default for cuDNN): a 10-bit mantissa, as fp16's
TF32_REL_TOL = 3e-2


def rel_tol(dtype: torch.dtype, device: torch.device) -> float:
    """The bench's check tolerance for this dtype on this device (knowing cuDNN's TF32 switch)."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return TF32_REL_TOL
    return REL_TOL[dtype]


# peak_mib: activations of one forward; held_mib: what the prepared model keeps (weights and caches);
# rss_mib: the whole process after preparing this contender (all contenders so far add up in it)
TABLE_COLUMNS = [
    "contender", "batch", "median_ms", "iqr_ms", "runs", "speedup_vs_eager", "paired_vs_eager", "paired_vs_ort",
    "imgs_per_s",
    "max_abs_err", "rel_err", "check", "ops_per_forward", "est_mb", "peak_mib", "held_mib", "rss_mib", "setup_s",
    "skipped",
]


@dataclass
class BenchConfig:
    """Everything `hrnet-fast bench` was asked to do (what the results JSON records as `config`)."""

    model: str = "w32"
    input_size: tuple[int, int] | None = None  # (H, W); None: the model's default
    batches: list[int] = field(default_factory=lambda: [1])
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    contenders: list[str] = field(default_factory=lambda: list(C.CONTENDERS))
    min_run_time: float = 2.0  # timed seconds per contender and batch, over all rounds
    rounds: int = 3
    cuda_graph: bool = False
    seed: int = 0
    compile_mode: str = "default"
    onnx_cache: str | None = None  # folder keeping ONNX Runtime's exported models between runs (None: per run)

    def result_name(self, tag: str, size: tuple[int, int]) -> str:
        """e.g. model_w32_256x192_cpu, model_w32_256x192_cuda_bfloat16_b1-8."""
        name = f"model_{tag}_{size[0]}x{size[1]}_{self.device}"
        if self.dtype != "float32":
            name += f"_{self.dtype}"
        if self.batches != [1]:
            name += "_b" + "-".join(map(str, self.batches))
        return name


def _as_tensor(out: Any) -> torch.Tensor:
    """One float32 CPU tensor from a model output (tensor, numpy array, or a list/tuple of them)."""
    if isinstance(out, (list, tuple)):
        return torch.cat([_as_tensor(o).flatten() for o in out])
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    return out.detach().float().cpu()


def _check(out: Any, ref: torch.Tensor, tol: float) -> dict[str, Any]:
    got = _as_tensor(out)
    if got.shape != ref.shape:
        return {"max_abs_err": None, "rel_err": None, "check": f"FAIL (shape {tuple(got.shape)} != {tuple(ref.shape)})"}
    err = (got - ref).abs().max().item()
    rel = err / max(ref.abs().max().item(), 1e-30)
    ok = rel <= tol and np.isfinite(err)
    return {"max_abs_err": err, "rel_err": rel, "check": "ok" if ok else "FAIL"}


@dataclass
class _Entry:
    """One row to time: the row so far and what to call (None: skipped)."""

    row: dict[str, Any]
    fn: Callable[[], Any] | None = None
    host_timed: bool = False
    times: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # the median of each round's calls (ms)


def _peak_mib(prep: C.Prepared, device: torch.device) -> float:
    """MiB the allocator holds above its level before one forward, at the forward's highest point."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            prep.call(*prep.args)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        return peak_bytes(lambda: prep.call(*prep.args)) / 2**20


def _release_cpu_arena() -> None:
    """Free the cpu backend's caching allocator's free blocks (csrc/cpu/cpu_arena.cpp), so that the next
    contender's peak and held memory are its own. The allocator is the process's: blocks an earlier
    contender's forwards left would serve this one's requests by best fit, counted at their own size,
    and count as held (W32 at batch 8, `cpu_graph=False` after the CPU-graph contender: peak 115 MiB and
    held 228, against 83 and 195 in a process of its own)."""
    if hasattr(torch.ops.hrnet_fast, "cpu_arena_release"):  # absent where the extension is not built
        torch.ops.hrnet_fast.cpu_arena_release()


def _prepare(name: str, ctx: C.Context, ref: torch.Tensor, cfg: BenchConfig) -> list[_Entry]:
    """Prepare one contender, check it against eager, count its ops; add its CUDA-graph replay when asked."""
    tol = rel_tol(DTYPES[cfg.dtype], ctx.device)
    if ctx.device.type == "cpu":
        _release_cpu_arena()
    try:
        prep = C.CONTENDERS[name](ctx)
        row: dict[str, Any] = {"contender": name, "setup_s": prep.setup_s}
        row.update(_check(prep(), ref, tol))
        if prep.torch_path:
            with torch.inference_mode():
                # twice, the second counted: under a dispatch mode the cpu backend's task chains run one
                # after another (hrnet_fast/fused/cpu_tasks.py), at shapes whose packed weights the
                # first call makes
                count_ops(prep.call, *prep.args)
                counted = count_ops(prep.call, *prep.args)
            row.update(ops_per_forward=counted["ops"], est_bytes=counted["bytes"], est_mb=counted["bytes"] / 1e6)
            row["peak_mib"] = _peak_mib(prep, ctx.device)
        if isinstance(prep.call, torch.nn.Module):
            # after the check's forward, so caches made on first use (packed weights) are counted; and two
            # more, as a served model holds it: the cpu backend's CPU graph learns its memory plan on its
            # first replay (the forward above) and takes its slab on the next (csrc/cpu/cpu_arena.h)
            with torch.inference_mode():
                for _ in range(2):
                    prep.call(*prep.args)
            row["held_mib"] = held_bytes(prep.call) / 2**20
        rss = rss_bytes()
        row["rss_mib"] = None if rss is None else rss / 2**20  # the whole process, so far: contenders add up
    except C.Skip as e:
        return [_Entry({"contender": name, "skipped": str(e)})]
    except Exception as e:  # noqa: BLE001  (one broken contender must not hide the others' results)
        return [_Entry({"contender": name, "skipped": f"error: {C._first_line(e)}"})]
    entries = [_Entry(row, prep, prep.host_timed)]
    if cfg.cuda_graph and ctx.device.type == "cuda" and prep.torch_path:
        g_row: dict[str, Any] = {"contender": f"{name}+graph", "ops_per_forward": row.get("ops_per_forward")}
        try:
            with torch.inference_mode():
                replay, static_out = timing.cuda_graph(lambda: prep.call(*prep.args))
                replay()
                torch.cuda.synchronize()
                g_row.update(_check(static_out, ref, tol))
            entries.append(_Entry(g_row, replay))
        except Exception as e:  # noqa: BLE001  (not every op is capturable: report, don't crash)
            g_row["skipped"] = f"CUDA graph capture failed: {C._first_line(e)}"
            entries.append(_Entry(g_row))
    return entries


def _sample(entry: _Entry, device: torch.device, seconds: float, threads: int) -> list[float]:
    assert entry.fn is not None
    if device.type == "cuda" and not entry.host_timed:
        return timing.sample_cuda(entry.fn, seconds)
    return timing.sample_cpu(entry.fn, seconds, threads)


def _time_interleaved(entries: list[_Entry], cfg: BenchConfig, device: torch.device, bar: tqdm) -> None:
    """Time every runnable entry in cfg.rounds rounds, taking turns, so load from other work hits all alike."""
    timed = [e for e in entries if e.fn is not None]
    for e in timed:  # a longer first warm-up: one-off costs and a compiler's background work settle
        timing.warmup(e.fn, 2, min(1.0, 0.1 * cfg.min_run_time))
    for r in range(cfg.rounds):
        for e in timed:
            bar.set_postfix_str(f"round {r + 1}/{cfg.rounds}: {e.row['contender']}", refresh=False)
            if e.fn is not None:
                try:
                    sampled = _sample(e, device, cfg.min_run_time / cfg.rounds, cfg.threads)
                    e.times += sampled
                    e.rounds.append(statistics.median(sampled))
                except Exception as exc:  # noqa: BLE001
                    e.row["skipped"], e.fn = f"error while timing: {C._first_line(exc)}", None
            bar.update()
    for e in timed:
        if e.fn is not None and e.times:
            e.row.update(timing.summarize(e.times))
    _paired(timed)


# Contenders a row is compared with round by round, and the column each ratio goes to.
PAIRED_WITH = {"eager": "paired_vs_eager", "onnxruntime": "paired_vs_ort"}


def _paired(entries: list[_Entry]) -> None:
    """Each timed row's speedup over eager and ONNX Runtime as the median over rounds of the ratio of
    that round's medians. Both took their turns within seconds of each other, so a slow spell of the
    machine (this project's 2-core VM moves 10-40% between minutes) falls on both: a steadier estimate
    of the ratio than one of medians over the whole run (speedup_vs_eager)."""
    by_name = {e.row["contender"]: e for e in entries if e.fn is not None and e.rounds}
    for base, column in PAIRED_WITH.items():
        ref = by_name.get(base)
        if ref is None:
            continue
        for e in by_name.values():
            n = min(len(ref.rounds), len(e.rounds))  # a row that failed mid-run has fewer rounds
            if n:
                e.row[column] = statistics.median(ref.rounds[i] / e.rounds[i] for i in range(n))


def run(
    cfg: BenchConfig,
    progress: bool = True,
    on_batch: Callable[[str, dict[str, Any], list[dict[str, Any]]], None] | None = None,
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Benchmark every contender in cfg at every batch: (result name, config for the JSON, rows).

    Per batch, every contender is first prepared and checked against eager, then all are timed
    in interleaved rounds (min_run_time split over cfg.rounds) with warm-up excluded.
    """
    unknown = [c for c in cfg.contenders if c not in C.CONTENDERS]
    if unknown:
        raise BenchError(f"unknown contender(s) {', '.join(unknown)}: choose from {', '.join(C.CONTENDERS)}")
    if cfg.dtype not in DTYPES:
        raise BenchError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {cfg.rounds}")
    spec = resolve_model(cfg.model)
    size = cfg.input_size or spec.default_size
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    result_name = cfg.result_name(spec.tag, size)
    config = {**asdict(cfg), "input_size": list(size), "model_source": spec.source, "rel_tol": rel_tol(dtype, device),
              "ops_counter": "hrnet_fast.profile.count_ops"}
    torch.set_num_threads(cfg.threads)

    _check_size(size, max(cfg.batches), dtype)
    try:
        base = randomize(build_model(cfg.model), size, cfg.seed).to(device)
    except RuntimeError as e:  # e.g. a size HRNet's fusions cannot add up (eager itself fails)
        raise BenchError(f"the model cannot run on input {size[0]}x{size[1]}: {C._first_line(e)}") from None
    model = copy.deepcopy(base).to(dtype) if dtype != torch.float32 else base
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    # one step per contender prepared, one per contender timed in each round (CUDA-graph rows add steps)
    bar = tqdm(total=len(cfg.batches) * len(cfg.contenders) * (1 + cfg.rounds), desc="bench", unit="step",
               disable=not progress, leave=False)
    with C.make_workdir() as workdir:
        for batch in cfg.batches:
            x = torch.randn(batch, 3, *size, generator=gen).to(device=device, dtype=dtype)
            try:
                with torch.inference_mode():
                    ref = _as_tensor(model(x))
            except RuntimeError as e:
                raise BenchError(f"the eager model fails on input {tuple(x.shape)}: {C._first_line(e)}") from None
            if not torch.isfinite(ref).all():
                raise BenchError(f"the eager model's {cfg.dtype} output on input {tuple(x.shape)} is not finite: "
                                 "no contender can be checked against it")
            ctx = C.Context(model, base, x, dtype, cfg.threads, Path(workdir), cfg.compile_mode,
                            Path(cfg.onnx_cache) if cfg.onnx_cache else None)
            entries: list[_Entry] = []
            for name in cfg.contenders:
                bar.set_postfix_str(f"batch {batch}: prepare {name}")
                t0 = time.perf_counter()
                entries += _prepare(name, ctx, ref, cfg)
                if not progress:  # a log's progress: one line per prepared contender
                    print(f"bench: batch {batch}: prepared {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                bar.update()
            bar.total += cfg.rounds * (len(entries) - len(cfg.contenders))
            bar.update(cfg.rounds * sum(e.fn is None for e in entries))  # skipped rows: nothing to time
            _time_interleaved(entries, cfg, device, bar)
            rows += [{"contender": e.row["contender"], "batch": batch, "device": device.type, "dtype": cfg.dtype, **e.row}
                     for e in entries]
            _speedups(rows)
            if on_batch is not None:  # e.g. write what is measured so far: a run cut short keeps its batches
                on_batch(result_name, config, rows)
    bar.close()
    return result_name, config, rows


# Activations eager keeps alive per input pixel (W32, float32: ~650 MB moved for 256x192, the peak far
# lower; 2 KiB a pixel bounds the peak generously); a request past the machine's memory is refused.
_BYTES_PER_PIXEL = 2048


def _check_size(size: tuple[int, int], batch: int, dtype: torch.dtype) -> None:
    need = batch * size[0] * size[1] * _BYTES_PER_PIXEL * torch.finfo(dtype).bits // 32
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise BenchError(f"--input-size {size[0]}x{size[1]} at batch {batch} needs about {need / 2**30:.0f} GiB "
                         f"for activations, more than this machine's {have / 2**30:.0f} GiB")


def _speedups(rows: list[dict[str, Any]]) -> None:
    eager = {r["batch"]: r["median_ms"] for r in rows if r["contender"] == "eager" and r.get("median_ms")}
    for r in rows:
        if r.get("median_ms"):
            r["imgs_per_s"] = r["batch"] * 1e3 / r["median_ms"]
            if r["batch"] in eager:
                r["speedup_vs_eager"] = eager[r["batch"]] / r["median_ms"]
