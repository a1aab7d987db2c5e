"""The shared results format of every hrnet_fast benchmark: machine info, a stdout table, JSON + a bar chart.

A result is a list of flat row dicts (one per contender x case), e.g.
``{"contender": "eager", "batch": 1, "median_ms": 185.2, "iqr_ms": 1.3, "speedup_vs_eager": 1.0}``.
A row that could not run keeps its identifying keys and says why in ``skipped``.

    rows = [...]
    print(format_table(rows, ["contender", "batch", "median_ms", "iqr_ms"]))
    json_path, png_path = write_results("conv_bias_act_cpu", {"threads": 2}, rows)

Importing this module is cheap: matplotlib is imported inside the plot function only.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
# Plotted when present, in this order of preference; the bar's error bar is "<stem>_iqr..." when present.
METRICS = ("median_ms", "mean_ms", "time_ms", "gflops", "gbps")
# What names a bar, and what groups bars, when the caller does not say.
LABEL_KEYS = ("contender", "backend", "impl", "name", "op")
GROUP_KEYS = ("batch", "shape", "case", "size")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _version(dist: str) -> str | None:
    # Package metadata, not an import: asking for triton's version must not import triton.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in have]
    except OSError:
        pass
    return []


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _cpu_isa() -> str | None:
    """The instruction set hrnet_fast's CPU kernels run (torch.ops.hrnet_fast.cpu_isa), None without the extension."""
    import torch

    try:
        from hrnet_fast import _extension  # noqa: F401  (loads the library, registering the op)

        return str(torch.ops.hrnet_fast.cpu_isa())
    except (ImportError, AttributeError, RuntimeError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a benchmark ran: CPU, cores, threads, library versions, CUDA device, UTC date."""
    import torch  # the caller has torch loaded already; kept local so importing this module stays light

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        # OpenMP's idle threads sleep or spin by these; on this project's VM a sleeping thread's wake-up
        # made eager PyTorch 1.6x slower at batch 1 (README, "Threads")
        "openmp_env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ},
        # other work on a shared machine skews timings: record how busy it was
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": {
            "hrnet_fast": _version("hrnet_fast"),
            "hrnet_fast_git": _git_commit(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"),
        },
        "cuda_device": None,
        "hrnet_fast_cpu_isa": _cpu_isa(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda_device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "driver": _nvidia_driver(),
            "cudnn": torch.backends.cudnn.version(),
            # fp32 convolutions and matmuls in TF32 (torch's defaults: convs yes, matmuls no)
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _clean(v: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON), dtypes/devices/paths become strings."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:  # numpy / 0-d tensor scalars
        return _clean(v.item())
    return str(v)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3g}"
        if a >= 100:
            return f"{v:.1f}"
        return f"{v:.3f}" if a < 1 else f"{v:.2f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (one line each) with `columns` (default: every key, first-seen order).

    Missing values are blank; numbers are right-aligned and rounded for reading, not for storage.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    columns = list(columns)
    if not columns:
        raise ValueError("format_table needs at least one column")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    numeric = [
        all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), sep] + [line(row) for row in cells])


def _pick(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if any(k in r for r in rows)), None)


def plot_results(
    path: Path,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str | None = None,
    label: str | None = None,
    group: str | None = None,
) -> Path:
    """Grouped bar chart of `metric` per `label` (bars) and `group` (clusters); IQR as error bars.

    Rows without a numeric `metric` (skipped contenders) are left out of the chart.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on benchmark machines
    import matplotlib.pyplot as plt

    metric = metric or _pick(rows, METRICS) or "median_ms"
    label = label or _pick(rows, LABEL_KEYS)
    group = group or _pick(rows, GROUP_KEYS)
    err_key = metric.replace("median", "iqr") if "median" in metric else None
    good = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    labels = list(dict.fromkeys(str(r.get(label, "")) for r in good)) if label else [""]
    groups = list(dict.fromkeys(str(r.get(group, "")) for r in good)) if group else [""]

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.9 * len(labels) * len(groups)), 4.2), dpi=110)
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        xs, ys, es = [], [], []
        for g_i, g in enumerate(groups):
            match = [
                r for r in good
                if (not label or str(r.get(label, "")) == lab) and (not group or str(r.get(group, "")) == g)
            ]
            if match:
                xs.append(g_i + (i - (len(labels) - 1) / 2) * width)
                ys.append(float(match[0][metric]))
                e = match[0].get(err_key) if err_key else None
                es.append(float(e) / 2 if isinstance(e, (int, float)) and math.isfinite(e) else 0.0)
        bars = ax.bar(xs, ys, width, yerr=es if any(es) else None, capsize=3, label=lab or None)
        ax.bar_label(bars, fmt="%.4g", fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), [f"{group}={g}" if group else g for g in groups])
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    if not good:
        ax.text(0.5, 0.5, "no timed rows (all skipped)", ha="center", va="center", transform=ax.transAxes)
    elif label and len(labels) > 1:
        ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results(
    name: str,
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str] = "benchmarks/results",
    *,
    metric: str | None = None,
    label: str | None = None,
    group: str | None = None,
) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` (schema, name, machine, config, every row) and `<name>.png`.

    `metric`/`label`/`group` choose what the chart shows (default: median_ms per contender per batch).
    Returns (json_path, png_path).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be a plain file stem (letters, digits, _ . + -), got {name!r}")
    if not all(isinstance(r, Mapping) for r in rows):
        raise TypeError("rows must be a list of dicts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    doc = {
        "schema": SCHEMA_VERSION,
        "name": name,
        "machine": machine_info(),
        "config": _clean(dict(config)),
        "rows": [_clean(dict(r)) for r in rows],
    }
    tmp = json_path.with_suffix(".json.tmp")  # a reader never sees half a file
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    plot_results(png_path, name, rows, metric=metric, label=label, group=group)
    return json_path, png_path


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a results JSON written by write_results (checks the schema version)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: results schema {doc.get('schema')!r}, expected {SCHEMA_VERSION}")
    return doc
