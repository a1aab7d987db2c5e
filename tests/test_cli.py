"""`hrnet-fast bench` end to end on a tiny HRNet, the op counter, and clean failures on bad arguments."""
from __future__ import annotations

import json
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hrnet_fast import cli
from hrnet_fast.bench import contenders as C
from hrnet_fast.bench import runner
from hrnet_fast.profile import count_ops
from hrnet_fast.bench.model import BenchError, parse_input_size, resolve_model

TINY_YAML = """\
MODEL:
  NAME: pose_hrnet
  NUM_JOINTS: 5
  IMAGE_SIZE: [32, 64]
  EXTRA:
    PRETRAINED_LAYERS: ['*']
    FINAL_CONV_KERNEL: 1
    STAGE2: {NUM_MODULES: 1, NUM_BRANCHES: 2, BLOCK: BASIC, NUM_BLOCKS: [1, 1], NUM_CHANNELS: [8, 16], FUSE_METHOD: SUM}
    STAGE3: {NUM_MODULES: 1, NUM_BRANCHES: 3, BLOCK: BASIC, NUM_BLOCKS: [1, 1, 1], NUM_CHANNELS: [8, 16, 32], FUSE_METHOD: SUM}
    STAGE4: {NUM_MODULES: 1, NUM_BRANCHES: 4, BLOCK: BASIC, NUM_BLOCKS: [1, 1, 1, 1], NUM_CHANNELS: [8, 16, 32, 64], FUSE_METHOD: SUM}
"""
TIMED_FIELDS = {"median_ms", "iqr_ms", "runs", "speedup_vs_eager", "imgs_per_s", "max_abs_err", "rel_err", "check"}
FAST = ["--min-run-time", "0.06", "--rounds", "2", "--no-progress", "--threads", "2"]


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_hrnet.yaml"
    path.write_text(TINY_YAML)
    return path


def _load(out_dir: Path) -> dict:
    (json_path,) = out_dir.glob("*.json")
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(json_path.read_text())


def test_bench_end_to_end_tiny(tiny_yaml: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "res"
    argv = ["bench", "--model", str(tiny_yaml), "--batch", "1", "2", "--out", str(out), *FAST,
            "--contenders", "eager,eager_cl,hrnet_fast_cpu,hrnet_fast_triton"]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    doc = _load(out)
    assert doc["name"] == "model_tiny_hrnet_64x32_cpu_b1-2" and (out / f"{doc['name']}.json").exists()
    assert doc["config"]["input_size"] == [64, 32]  # from the YAML's IMAGE_SIZE [W, H]
    assert doc["config"]["batches"] == [1, 2] and doc["config"]["threads"] == 2
    assert doc["machine"]["versions"]["torch"] == torch.__version__
    rows = {(r["contender"], r["batch"]): r for r in doc["rows"]}
    assert len(rows) == len(doc["rows"]) == 8
    for batch in (1, 2):
        eager, cl = rows["eager", batch], rows["eager_cl", batch]
        for r in (eager, cl):
            assert TIMED_FIELDS <= r.keys() and r["check"] == "ok" and r["runs"] >= 2  # >= 1 per round
            assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["est_bytes"] > 0
            assert r["imgs_per_s"] == pytest.approx(batch * 1e3 / r["median_ms"])
            assert r["ops_per_forward"] > 50  # ~200 convs, BNs, ReLUs, adds, upsamples
        assert eager["max_abs_err"] == 0 and eager["speedup_vs_eager"] == 1.0 and eager["paired_vs_eager"] == 1.0
        assert cl["paired_vs_eager"] > 0 and "paired_vs_ort" not in cl  # no onnxruntime row to pair with
        assert cl["rel_err"] < 1e-4 and cl["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / cl["median_ms"])
        assert cl["ops_per_forward"] == eager["ops_per_forward"]
        assert "TRITON_INTERPRET=1" in rows["hrnet_fast_triton", batch]["skipped"]
        fast = rows["hrnet_fast_cpu", batch]
        assert fast["check"] == "ok" and fast["rel_err"] < 1e-4 and fast["median_ms"] > 0, fast
        assert fast["ops_per_forward"] < eager["ops_per_forward"]  # BN folded, epilogues fused
        # peak above the input: at least the heatmaps it returns (batch x 5 joints x 16 x 8 floats)
        for r in (eager, cl, fast):
            assert r["peak_mib"] * 2**20 >= batch * 5 * 16 * 8 * 4, r
    lines = stdout.splitlines()
    assert lines[1].startswith("| contender ") and sum(line.startswith("| eager ") for line in lines) == 2


def test_bench_memory_is_each_contenders_own(tiny_yaml: Path, tmp_path: Path) -> None:
    """A cpu-backend contender's peak and held memory are its own: the caching allocator is the process's,
    and its free blocks are released before each contender is measured, where a block another model's
    forward left would have been counted as held (and could serve, by best fit, this one's requests)."""
    def row(out: Path) -> dict:
        argv = ["bench", "--model", str(tiny_yaml), "--batch", "2", "--out", str(out), *FAST,
                "--contenders", "hrnet_fast_cpu_no_graph"]
        assert cli.main(argv) == 0
        (r,) = _load(out)["rows"]
        assert r["check"] == "ok"
        return r

    alone = row(tmp_path / "alone")
    torch.ops.hrnet_fast.cpu_arena_scope(True)  # a 64 MiB block freed while the allocator is installed
    try:
        del_me = torch.empty(16 << 20)
        del del_me
    finally:
        torch.ops.hrnet_fast.cpu_arena_scope(False)
    assert torch.ops.hrnet_fast.cpu_arena_stats()[0] >= 64 << 20  # kept as a free block
    after = row(tmp_path / "after")
    # within a MiB: which of the forwards' own blocks stay cached varies a little with what ran before
    assert abs(after["held_mib"] - alone["held_mib"]) < 1 and abs(after["peak_mib"] - alone["peak_mib"]) < 1, (
        after["held_mib"], alone["held_mib"], after["peak_mib"], alone["peak_mib"])


def test_bench_onnxruntime_and_input_size(tiny_yaml: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    argv = ["bench", "--model", str(tiny_yaml), "--input-size", "32x32", "--out", str(tmp_path), *FAST,
            "--contenders", "eager,onnxruntime"]
    assert cli.main(argv) == 0
    doc = _load(tmp_path)
    assert doc["config"]["input_size"] == [32, 32] and doc["name"] == "model_tiny_hrnet_32x32_cpu"
    ort_row = next(r for r in doc["rows"] if r["contender"] == "onnxruntime")
    assert ort_row["check"] == "ok" and ort_row["rel_err"] < 1e-4 and ort_row["setup_s"] > 0
    assert "ops_per_forward" not in ort_row  # not a PyTorch path: nothing to count


def test_onnx_cache_exports_once_per_weights_and_shape(tiny_yaml: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    exports: list[str] = []
    real_export = torch.onnx.export

    def counting_export(*args, **kwargs):
        exports.append(str(args[2]))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting_export)
    cache = tmp_path / "cache"

    def bench(out: str, *extra: str) -> dict:
        argv = ["bench", "--model", str(tiny_yaml), "--input-size", "32x32", "--out", str(tmp_path / out), *FAST,
                "--contenders", "eager,onnxruntime", "--onnx-cache", str(cache), *extra]
        assert cli.main(argv) == 0
        return next(r for r in _load(tmp_path / out)["rows"] if r["contender"] == "onnxruntime")

    first = bench("a")
    assert len(exports) == 1 and first["check"] == "ok"
    again = bench("b")  # same weights (seed) and input shape: the kept export, checked against eager again
    assert len(exports) == 1 and again["check"] == "ok" and again["rel_err"] < 1e-4
    other = bench("c", "--seed", "1")  # other weights: a new export, not the kept one
    assert len(exports) == 2 and other["check"] == "ok"
    assert sorted(p.name for p in cache.iterdir() if (p / "model.onnx").exists()) == sorted(
        {Path(e).parent.name.split(".")[0] for e in exports}
    )
    assert not [p for p in cache.iterdir() if "." in p.name]  # no half-written export left behind


def test_onnx_key_follows_weights_and_input_shape() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.zeros(1, 3, 8, 8)
    key = C.onnx_key(model, x)
    assert key == C.onnx_key(model, x.clone()) and len(key) == 32
    assert key != C.onnx_key(model, torch.zeros(2, 3, 8, 8))
    with torch.no_grad():
        model[1].running_var[0] += 1e-6  # one buffer value: another model
    assert key != C.onnx_key(model, x)


def test_bench_model_is_the_same_bits_at_any_thread_count() -> None:
    from hrnet_fast.bench.model import build_model, randomize

    threads = torch.get_num_threads()
    try:
        states = []
        for t in (1, 2):
            torch.set_num_threads(t)
            # W32 at its own size: BN's reductions there are large enough to be split between threads
            states.append(randomize(build_model("w32"), (256, 192), seed=3).state_dict())
            assert torch.get_num_threads() == t  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    one, two = states
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert any(k.endswith("running_var") and not torch.all(v == 1) for k, v in one.items())  # measured, not reset


def test_wrong_output_is_flagged_and_missing_package_skipped(tiny_yaml: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def broken(ctx: C.Context) -> C.Prepared:
        return C.Prepared(lambda x: ctx.model(x) * 1.01, (ctx.x,), torch_path=True)

    monkeypatch.setitem(C.CONTENDERS, "broken", broken)
    monkeypatch.setattr(cli, "CONTENDER_NAMES", (*cli.CONTENDER_NAMES, "broken"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    argv = ["bench", "--model", str(tiny_yaml), "--out", str(tmp_path), *FAST, "--contenders", "eager,broken,onnxruntime"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hrnet-fast bench: error:") and "broken (batch 1)" in err
    rows = {r["contender"]: r for r in _load(tmp_path)["rows"]}
    assert rows["broken"]["check"] == "FAIL"
    assert rows["broken"]["rel_err"] == pytest.approx(0.01, rel=1e-3)  # hand-computed: 1% off everywhere
    assert "not installed" in rows["onnxruntime"]["skipped"] and "median_ms" not in rows["onnxruntime"]


def test_ops_and_bytes_hand_counted() -> None:
    # the counter behind the ops_per_forward / est_bytes columns, on a net small enough to count by hand
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():  # as the bench counts
        res = count_ops(model, x)
    assert res["ops"] == 3, res["by_op"]  # conv, batch norm, relu; no views, no allocations
    act, w, bn = 4 * 8 * 8 * 4, 4 * 3 * 3 * 3 * 4, 4 * 4  # bytes of one 4x8x8 map, the weight, one BN vector
    x_bytes = 3 * 8 * 8 * 4
    # conv: x + w -> act; bn: act + 4 vectors -> act (+ 2 empty save tensors); relu: act -> act
    assert res["bytes"] == (x_bytes + w + act) + (act + 4 * bn + act) + (act + act)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--model", "w99"], "unknown --model 'w99'"),
        (["bench", "--model", "/nonexistent/cfg.yaml"], "no such file"),
        (["bench", "--input-size", "256by192"], "HEIGHTxWIDTH"),
        (["bench", "--input-size", "0x192"], "positive integers"),
        (["bench", "--contenders", "eager,tensorrt"], "unknown contender(s) tensorrt"),
        (["bench", "--batch", "0"], "positive integer"),
        (["bench", "--rounds", "0"], "positive integer"),
        (["bench", "--min-run-time", "-1"], "positive, finite number"),
        (["bench", "--min-run-time", "inf"], "positive, finite number"),
        (["bench", "--min-run-time", "nan"], "positive, finite number"),
        (["bench", "--device", "tpu"], "invalid choice"),
        (["bench", "--threads", "100000"], "more than this machine's"),
        (["bench", "--out", __file__], "is a file, not a folder"),
        (["bench", "--input-size", "100000x100000"], "GiB for activations"),
        (["bench", "--input-size", "250x190", "--contenders", "eager"], "cannot run on input 250x190"),
        (["bench", "--device", "cuda"], "no CUDA device"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_in_one_line(argv: list[str], message: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hrnet-fast") and message in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_parsers() -> None:
    assert parse_input_size("256x192") == (256, 192) and parse_input_size(" 64 X 48 ") == (64, 48)
    with pytest.raises(BenchError):
        parse_input_size("256")
    assert resolve_model("w48").default_size == (256, 192)


def test_segmentation_models() -> None:
    """seg_w48 and the official Cityscapes YAML: HRNetV2-W48 at the config's crop (official order [W, H])."""
    from hrnet_fast.bench.model import build_model

    spec = resolve_model("seg_w48")
    assert spec.default_size == (512, 1024) and spec.source == "hrnet_fast.seg_hrnet_w48(align_corners=False)"
    yaml_path = Path(__file__).parent / "fixtures" / "seg_hrnet_w48_cityscapes_512x1024.yaml"
    spec = resolve_model(str(yaml_path))
    assert spec.default_size == (512, 1024) and spec.source.startswith("hrnet_fast.get_seg_model(")
    model = build_model(str(yaml_path))
    assert type(model).__name__ == "SegHighResolutionNet" and not model.training
    assert model.last_layer[-1].out_channels == 19
    with pytest.raises(BenchError, match="unknown contender"):
        runner.run(runner.BenchConfig(contenders=["nope"]))


def test_console_script_subprocess(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("hrnet-fast")
    assert script.exists(), f"console script missing: {script} (pip install -e .)"
    bad = subprocess.run([str(script), "bench", "--model", "w99"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "hrnet-fast bench: error: unknown --model 'w99': expected one of w32, w48, seg_w48 or a path to an official-format .yaml"
    ]
    assert "Traceback" not in bad.stderr


def test_help_exits_zero(capsys) -> None:
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--model", "--input-size", "--batch", "--contenders", "--min-run-time", "--cuda-graph"))


def test_timing_summary_and_cpu_timer() -> None:
    from hrnet_fast.bench import timing

    # statistics.quantiles' default (exclusive) method on 1..5: quartiles 1.5 and 4.5
    assert timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median_ms": 3.0, "iqr_ms": 3.0, "runs": 5}
    calls = []
    times = timing.sample_cpu(lambda: (calls.append(1), time.sleep(0.004)), min_run_time=0.05, threads=1)
    assert times and all(4.0 <= t < 40.0 for t in times)
    assert len(calls) >= 1 + 10  # a warm-up call plus >= 50 ms of timed 4 ms calls


def test_paired_ratios_are_medians_of_per_round_ratios() -> None:
    """paired_vs_eager / paired_vs_ort: per round, the reference's median over the row's; then the median
    of those over rounds (a row that failed mid-run pairs only the rounds it has)."""
    def entry(name: str, rounds: list[float]) -> runner._Entry:
        return runner._Entry({"contender": name}, fn=lambda: None, rounds=rounds)

    eager = entry("eager", [100.0, 200.0, 150.0])
    ort = entry("onnxruntime", [50.0, 80.0, 60.0])
    ours = entry("hrnet_fast_cpu", [40.0, 50.0, 60.0])
    short = entry("compile", [25.0])
    skipped = runner._Entry({"contender": "hrnet_fast_cuda", "skipped": "no GPU"})
    runner._paired([eager, ort, ours, short, skipped])
    assert ours.row["paired_vs_eager"] == 2.5  # median of 100/40, 200/50, 150/60 = 2.5, 4.0, 2.5
    assert ours.row["paired_vs_ort"] == 1.25  # median of 1.25, 1.6, 1.0
    assert eager.row["paired_vs_eager"] == 1.0 and ort.row["paired_vs_ort"] == 1.0
    assert short.row["paired_vs_eager"] == 4.0 and short.row["paired_vs_ort"] == 2.0  # round 1 only
    assert "paired_vs_eager" not in skipped.row
