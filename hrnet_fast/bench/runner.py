"""The whole-model benchmark behind `hrnet-fast bench`: every contender, checked against eager, then timed."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hrnet_fast.bench import contenders as C
from hrnet_fast.bench import opcount, timing
from hrnet_fast.bench.model import BenchError, build_model, randomize, resolve_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |out - eager| / max |eager| above this marks the row FAIL (half types: eager itself rounds more)
REL_TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
TABLE_COLUMNS = [
    "contender", "batch", "median_ms", "iqr_ms", "runs", "speedup_vs_eager", "imgs_per_s",
    "max_abs_err", "rel_err", "check", "ops_per_forward", "est_mb", "setup_s", "skipped",
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
    min_run_time: float = 2.0
    cuda_graph: bool = False
    seed: int = 0

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


def _check(out: Any, ref: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    got = _as_tensor(out)
    if got.shape != ref.shape:
        return {"max_abs_err": None, "rel_err": None, "check": f"FAIL (shape {tuple(got.shape)} != {tuple(ref.shape)})"}
    err = (got - ref).abs().max().item()
    rel = err / max(ref.abs().max().item(), 1e-30)
    ok = rel <= REL_TOL[dtype] and np.isfinite(err)
    return {"max_abs_err": err, "rel_err": rel, "check": "ok" if ok else "FAIL"}


def _time(prep: C.Prepared, device: torch.device, cfg: BenchConfig) -> dict[str, Any]:
    if device.type == "cuda" and not prep.host_timed:
        return timing.time_cuda(prep, cfg.min_run_time)
    return timing.time_cpu(prep, cfg.min_run_time, cfg.threads)


def _measure(name: str, prep: C.Prepared, ref: torch.Tensor, cfg: BenchConfig, device: torch.device) -> list[dict[str, Any]]:
    """Check, count and time one prepared contender (and its CUDA-graph replay when asked)."""
    dtype = DTYPES[cfg.dtype]
    row: dict[str, Any] = {"contender": name, "setup_s": prep.setup_s}
    row.update(_check(prep(), ref, dtype))
    if prep.torch_path:
        ops, nbytes, source = opcount.count_ops(prep.call, *prep.args)
        row.update(ops_per_forward=ops, est_bytes=nbytes, est_mb=None if nbytes is None else nbytes / 1e6, ops_counter=source)
    row.update(_time(prep, device, cfg))
    rows = [row]
    if cfg.cuda_graph and device.type == "cuda" and prep.torch_path:
        g_row: dict[str, Any] = {"contender": f"{name}+graph", "ops_per_forward": row.get("ops_per_forward")}
        try:
            with torch.inference_mode():
                replay, static_out = timing.cuda_graph(lambda: prep.call(*prep.args))
                replay()
                torch.cuda.synchronize()
                g_row.update(_check(static_out, ref, dtype))
            g_row.update(timing.time_cuda(replay, cfg.min_run_time))
        except Exception as e:  # noqa: BLE001  (not every op is capturable: report, don't crash)
            g_row["skipped"] = f"CUDA graph capture failed: {C._first_line(e)}"
        rows.append(g_row)
    return rows


def run(cfg: BenchConfig, progress: bool = True) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Benchmark every contender in cfg at every batch: (result name, config for the JSON, rows)."""
    unknown = [c for c in cfg.contenders if c not in C.CONTENDERS]
    if unknown:
        raise BenchError(f"unknown contender(s) {', '.join(unknown)}: choose from {', '.join(C.CONTENDERS)}")
    if cfg.dtype not in DTYPES:
        raise BenchError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    spec = resolve_model(cfg.model)
    size = cfg.input_size or spec.default_size
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    torch.set_num_threads(cfg.threads)

    base = randomize(build_model(cfg.model), size, cfg.seed).to(device)
    model = copy.deepcopy(base).to(dtype) if dtype != torch.float32 else base
    rows: list[dict[str, Any]] = []
    todo = [(b, c) for b in cfg.batches for c in cfg.contenders]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(total=len(todo), desc="bench", unit="run", disable=not progress, leave=False)
    with C.make_workdir() as workdir:
        for batch in cfg.batches:
            x = torch.randn(batch, 3, *size, generator=gen).to(device=device, dtype=dtype)
            try:
                with torch.inference_mode():
                    ref = _as_tensor(model(x))
            except RuntimeError as e:
                raise BenchError(f"the eager model fails on input {tuple(x.shape)}: {C._first_line(e)}") from None
            ctx = C.Context(model, base, x, dtype, cfg.threads, Path(workdir))
            for name in cfg.contenders:
                bar.set_postfix_str(f"batch {batch}: {name}")
                base_row = {"contender": name, "batch": batch, "device": device.type, "dtype": cfg.dtype}
                try:
                    got = _measure(name, C.CONTENDERS[name](ctx), ref, cfg, device)
                except C.Skip as e:
                    got = [{"skipped": str(e)}]
                except Exception as e:  # noqa: BLE001  (one broken contender must not hide the others' results)
                    got = [{"skipped": f"error: {C._first_line(e)}"}]
                rows += [{**base_row, **r} for r in got]
                bar.update()
    bar.close()
    _speedups(rows)
    config = {**asdict(cfg), "input_size": list(size), "model_source": spec.source, "rel_tol": REL_TOL[dtype]}
    return cfg.result_name(spec.tag, size), config, rows


def _speedups(rows: list[dict[str, Any]]) -> None:
    eager = {r["batch"]: r["median_ms"] for r in rows if r["contender"] == "eager" and r.get("median_ms")}
    for r in rows:
        if r.get("median_ms"):
            r["imgs_per_s"] = r["batch"] * 1e3 / r["median_ms"]
            if r["batch"] in eager:
                r["speedup_vs_eager"] = eager[r["batch"]] / r["median_ms"]
