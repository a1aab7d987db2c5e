"""`make gpu-check` (hrnet_fast.bench.gpu_check) on a machine without a GPU: arguments, skip reasons,
the summary files and table, and how a step's output, failure and time limit are recorded."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from hrnet_fast import _extension
from hrnet_fast.bench import cpu_threads, gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_every_step_is_skipped_with_the_reason(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 3
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    assert all(s["status"] == "skipped" and "no CUDA device" in s["detail"] for s in report["steps"])
    assert (tmp_path / "r" / "gpu_check.log").exists()
    assert "| build " in out and "no CUDA device" in out.splitlines()[-1]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--out", "x", "--skip", "bild"], "unknown step(s) bild in --skip"),
        (["--out", "x", "--only", "tests,nope"], "unknown step(s) nope in --only"),
        (["--out", "x", "--budget-s", "0"], "--budget-s must be positive"),
        (["--out", "x", "--cpu-threads", "1,x"], "--cpu-threads must be comma-separated integers"),
        (["--out", "x", "--cpu-threads", "0"], "--cpu-threads must name at least one count of 1 or more"),
        ([], "--out"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_only_picks_steps_in_the_order_given():
    args = gpu_check.parse_args(["--out", "x", "--only", "bench_fp16,tests,bench_fp16"])
    assert args.order == ["bench_fp16", "tests"]
    assert args.cpu_threads == [1, 4, 8, 16]
    assert gpu_check.parse_args(["--out", "x", "--cpu-threads", "1,16"]).cpu_threads == [1, 16]


def test_a_step_records_status_counts_and_output():
    log = io.StringIO()
    step = gpu_check.Step("tests")
    script = "print('2 failed, 40 passed, 3 skipped in 1.0s'); raise SystemExit(1)"
    gpu_check.run_step(step, [sys.executable, "-c", script], {}, 60, log)
    assert (step.status, step.detail) == ("failed", "exit code 1")
    assert step.counts == {"failed": 2, "passed": 40, "skipped": 3}
    assert "40 passed" in log.getvalue()


def test_a_step_over_its_limit_is_stopped_with_its_children():
    log = io.StringIO()
    step = gpu_check.Step("profile")
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    gpu_check.run_step(step, [sys.executable, "-c", script], {}, 2, log)
    assert step.status == "timeout" and step.seconds < 30
    assert "started" in log.getvalue()


def test_the_commands_run_the_cuda_tests_and_both_benchmarks(tmp_path):
    cmds = gpu_check.commands(tmp_path, sys.executable, workers=1)
    assert set(cmds) == set(gpu_check.STEPS)
    tests, _ = cmds["tests"]
    assert "-m" in tests and "cuda" in tests
    cpu_tests, env = cmds["cpu_tests"]
    assert cpu_tests[cpu_tests.index("-m", 3) + 1] == "not cuda and not triton" and "tests/test_cpu_isa.py" in cpu_tests
    assert env == {"OMP_NUM_THREADS": "2"}
    for step, dtype in (("bench_fp16", "float16"), ("bench_fp32", "float32")):
        argv, _ = cmds[step]
        assert argv[argv.index("--dtype") + 1] == dtype and "--cuda-graph" in argv
        assert argv[argv.index("--batch") + 1 : argv.index("--batch") + 3] == ["1", "64"]
    assert "--tool" in cmds["memcheck"][0] and cmds["memcheck"][1]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    seg, _ = cmds["bench_seg"]
    assert seg[seg.index("--model") + 1] == "seg_w48" and seg[seg.index("--batch") + 1 : seg.index("--batch") + 3] == ["1", "--cuda-graph"]
    threads, _ = cmds["cpu_threads"]
    assert threads[threads.index("-m") + 1] == "hrnet_fast.bench.cpu_threads"
    assert threads[threads.index("--threads") + 1 : threads.index("--threads") + 5] == ["1", "4", "8", "16"]
    parts, _ = cmds["cpu_parts"]
    assert parts[parts.index("-m") + 1] == "hrnet_fast.bench.cpu_parts"
    two = gpu_check.commands(tmp_path, sys.executable, workers=1, cpu_threads=[4, 8])
    for step in ("cpu_threads", "cpu_parts"):
        argv = two[step][0]
        assert argv[argv.index("--threads") + 1 : argv.index("--threads") + 3] == ["4", "8"]
    direct, env = cmds["bench_direct"]
    assert env == {"HRNET_FAST_TRITON_DIRECT_LAUNCH": "1"}
    assert direct[direct.index("--out") + 1] == str(tmp_path / "direct")
    assert direct[direct.index("--contenders") + 1] == "eager,hrnet_fast_triton"
    host, _ = cmds["host_cost"]
    assert host[host.index("-m") + 1] == "hrnet_fast.bench.triton_host_cost"


def test_bench_table_tells_the_direct_launch_rows_apart(tmp_path):
    row = {"contender": "hrnet_fast_triton", "batch": 1, "median_ms": 2.5}
    (tmp_path / "direct").mkdir()
    for path, ms in ((tmp_path / "model_w32_256x192_cuda_float16_b1-64.json", 2.5),
                     (tmp_path / "direct" / "model_w32_256x192_cuda_float16_b1-64.json", 1.5)):
        path.write_text(json.dumps({"config": {"dtype": "float16"}, "rows": [{**row, "median_ms": ms}]}))
    lines = [ln for ln in gpu_check.bench_table(tmp_path).splitlines() if "hrnet_fast_triton" in ln]
    assert len(lines) == 2
    assert "direct launch" not in lines[0] and "2.5" in lines[0]
    assert "float16 direct launch" in lines[1] and "1.5" in lines[1]


def test_cpu_threads_table_efficiency_and_lead():
    """Parallel efficiency t(1) * 1 / (T t(T)) and ONNX Runtime / ours, from hand-made rows."""
    rows = {
        1: [dict(batch=8, contender="hrnet_fast_cpu", median_ms=800.0), dict(batch=8, contender="onnxruntime", median_ms=1000.0)],
        4: [dict(batch=8, contender="hrnet_fast_cpu", median_ms=250.0, paired_vs_ort=1.55),
            dict(batch=8, contender="onnxruntime", median_ms=400.0)],
    }
    text = cpu_threads.table(rows)
    assert "| 8 | 1 | 800.0 (100%) | 1000.0 (100%) | 1.25x |" in text  # no paired ratio recorded
    assert "| 8 | 4 | 250.0 (80%) | 400.0 (62%) | 1.60x (paired 1.55x) |" in text


@pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")
def test_tasks_contender_skipped_where_its_workers_would_make_pools(tmp_path):
    """`hrnet-fast bench` times optimize(tasks=True) only where no task worker starts an OpenMP pool,
    which would slow every contender timed after it in the process."""
    from hrnet_fast.bench.contenders import CONTENDERS, Context, Skip
    from hrnet_fast.reference import tiny_pose_hrnet

    model = tiny_pose_hrnet().eval()
    ctx = Context(model, model, torch.randn(1, 3, 64, 64), torch.float32, threads=4, workdir=tmp_path)
    with pytest.raises(Skip, match="up to 2 threads only"):
        CONTENDERS["hrnet_fast_cpu_tasks"](ctx)
    ctx.threads = 2
    out, ref = CONTENDERS["hrnet_fast_cpu_tasks"](ctx)(), model(ctx.x)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_cpu_threads_times_tasks_only_where_they_make_no_pools():
    assert "hrnet_fast_cpu_tasks" in cpu_threads.contenders_at(2).split(",")
    assert cpu_threads.contenders_at(16).split(",") == ["hrnet_fast_cpu", "hrnet_fast_cpu_no_graph", "onnxruntime", "compile", "eager"]


def test_cpu_threads_times_and_prewarms_compile_only_where_asked(monkeypatch, tmp_path):
    """--compile-threads: torch.compile's cold compiles (one per thread count and batch) only at those counts."""
    assert "compile" not in cpu_threads.contenders_at(4, compile_threads=[1, 16]).split(",")
    assert "compile" in cpu_threads.contenders_at(16, compile_threads=[1, 16]).split(",")
    assert "compile" in cpu_threads.contenders_at(4).split(",")
    ran: list[list[str]] = []

    def fake_run(cmd, **kw):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cpu_threads.subprocess, "run", fake_run)
    cpu_threads.prewarm([1, 4, 16], [1, 8], str(tmp_path), sys.executable, tmp_path, compile_threads=[1, 16])
    jobs = sorted((c[c.index("--contenders") + 1], int(c[c.index("--threads") + 1]), int(c[c.index("--batch") + 1]))
                  for c in ran)
    assert jobs == [("compile", 1, 1), ("compile", 1, 8), ("compile", 16, 1), ("compile", 16, 8),
                    ("onnxruntime", 16, 1), ("onnxruntime", 16, 8)]
    cmd = gpu_check.commands(tmp_path, sys.executable, workers=1, cpu_threads=[1, 4, 16], compile_threads=[1, 16])
    argv = cmd["cpu_threads"][0]
    assert argv[argv.index("--compile-threads") + 1 :] == ["1", "16"]
    assert "--compile-threads" not in gpu_check.commands(tmp_path, sys.executable, workers=1)["cpu_threads"][0]
    args = gpu_check.parse_args(["--out", "x", "--cpu-threads", "1,4,16", "--cpu-compile-threads", "1,16"])
    assert args.cpu_compile_threads == [1, 16] and gpu_check.parse_args(["--out", "x"]).cpu_compile_threads is None


def test_cpu_threads_leaves_out_more_threads_than_cores(tmp_path, capsys):
    too_many = (os.cpu_count() or 1) + 1
    assert cpu_threads.run(tmp_path, [too_many], [1], 0.1, sys.executable) == {}
    assert f"{too_many} threads left out" in capsys.readouterr().out
