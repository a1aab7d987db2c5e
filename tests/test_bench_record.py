"""hrnet_fast.bench.record: the results format every benchmark writes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hrnet_fast.bench import record

ROWS = [
    {"contender": "eager", "batch": 1, "median_ms": 10.0, "iqr_ms": 0.5, "speedup_vs_eager": 1.0},
    {"contender": "fast", "batch": 1, "median_ms": 4.0, "iqr_ms": 0.25, "speedup_vs_eager": 2.5},
    {"contender": "eager", "batch": 8, "median_ms": 80.0, "iqr_ms": 2.0, "speedup_vs_eager": 1.0},
    {"contender": "onnx", "batch": 8, "median_ms": float("nan"), "skipped": "not installed"},
]


def test_machine_info_fields() -> None:
    info = record.machine_info()
    assert info["cpu_count"] >= 1 and info["cpu"]
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["versions"]["torch"] == torch.__version__
    assert info["date_utc"].endswith("+00:00")
    assert info["loadavg_1m"] >= 0
    assert (info["cuda_device"] is None) == (not torch.cuda.is_available())
    json.dumps(info)  # must be JSON-serialisable as is


def test_machine_info_records_openmp_env(monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert record.machine_info()["openmp_env"].items() >= {"OMP_WAIT_POLICY": "ACTIVE"}.items()
    assert "GOMP_SPINCOUNT" not in record.machine_info()["openmp_env"]


def test_write_results_json_and_png(tmp_path) -> None:
    cfg = {"threads": 2, "dtype": torch.float32, "sizes": (256, 192)}
    jp, pp = record.write_results("unit_test", cfg, ROWS, out_dir=tmp_path / "res")
    assert jp == tmp_path / "res" / "unit_test.json" and pp == tmp_path / "res" / "unit_test.png"
    doc = record.read_results(jp)
    assert doc["name"] == "unit_test" and doc["schema"] == record.SCHEMA_VERSION
    assert doc["config"] == {"threads": 2, "dtype": "torch.float32", "sizes": [256, 192]}
    assert len(doc["rows"]) == len(ROWS)
    assert doc["rows"][1] == ROWS[1]
    assert doc["rows"][3]["median_ms"] is None  # NaN -> null: strict JSON
    assert doc["machine"]["versions"]["torch"] == torch.__version__
    assert pp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pp.stat().st_size > 2000
    assert not list((tmp_path / "res").glob("*.tmp"))


def test_write_results_all_skipped_still_plots(tmp_path) -> None:
    _, pp = record.write_results("empty", {}, [{"contender": "x", "skipped": "why"}], out_dir=tmp_path)
    assert pp.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "has space"])
def test_write_results_rejects_bad_names(tmp_path, bad: str) -> None:
    with pytest.raises(ValueError, match="plain file stem"):
        record.write_results(bad, {}, ROWS, out_dir=tmp_path)


def test_format_table_layout() -> None:
    text = record.format_table(ROWS, ["contender", "batch", "median_ms", "skipped"])
    lines = text.splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert lines[0].split("|")[1].strip() == "contender"
    assert lines[2].split("|")[3].strip() == "10.00"
    assert lines[4].split("|")[3].strip() == "80.00"
    assert lines[5].split("|")[4].strip() == "not installed"
    assert lines[1].split("|")[2].endswith(":")  # numeric column right-aligned in Markdown


def test_format_table_default_columns_and_numbers() -> None:
    text = record.format_table([{"a": 1234567.0, "b": 0.0001234, "c": True}, {"a": 150.25, "d": "x"}])
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert header == ["a", "b", "c", "d"]
    assert "1.23e+06" in text and "0.000123" in text and "150.2" in text and "yes" in text
    with pytest.raises(ValueError):
        record.format_table(ROWS, [])


def test_import_is_cheap() -> None:
    # matplotlib is only imported when a chart is drawn
    code = "import sys, hrnet_fast.bench.record; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_held_bytes_counts_weights_buffers_and_caches_once() -> None:
    """held_bytes, checked by hand: parameters, buffers and tensors cached in attributes or attribute dicts,
    each storage once."""
    import torch

    from hrnet_fast.profile import held_bytes, rss_bytes

    lin = torch.nn.Linear(4, 3)  # 12 + 3 float32
    lin.register_buffer("scale", torch.ones(5))  # 5 float32
    lin._cache = {"a": torch.zeros(10), "b": lin.weight.detach()}  # 10 more; b shares the weight's storage
    lin._copy = torch.zeros(7)  # 7 more
    lin._view = lin._cache["a"][:2]  # a view of a counted storage: nothing more
    outer = torch.nn.Sequential(lin, lin)  # the same module twice: counted once
    assert held_bytes(outer) == 4 * (12 + 3 + 5 + 10 + 7)
    rss = rss_bytes()
    assert rss is None or rss > 10 * 2**20
