"""Task parallelism of the cpu backend (hrnet_fast/fused/cpu_tasks.py, csrc/cpu/cpu_thread_team.cpp):
chains run side by side with the caller's threads shared out, results and order as run one after
another, errors and thread-local modes carried over, nothing leaving the caller where it must not,
and whole models bit-identical with the tasks on and off."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hrnet_fast
from hrnet_fast import _extension
from hrnet_fast.fused import cpu_tasks
from hrnet_fast.fused.blocks import ChunkedStage
from hrnet_fast.fused.hr_module import FusedHRModule
from hrnet_fast.fused.hr_stage import FusedHRStage
from hrnet_fast.reference import tiny_pose_hrnet
from hrnet_fast.reference.config import preset
from hrnet_fast.reference.hrnet import PoseHighResolutionNet

from conftest import randomize_bn

pytestmark = pytest.mark.skipif(not _extension.is_built(), reason="needs the compiled extension")

needs_openmp = pytest.mark.skipif(
    _extension.is_built() and torch.ops.hrnet_fast.cpu_thread_team(0) < 0, reason="torch is built without OpenMP"
)


@pytest.fixture
def threads() -> Iterator[callable]:
    """Set torch's thread count for a test (run_chains shares out the caller's), restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _recording_chains(lengths: list[int], log: list, lock: threading.Lock) -> list:
    def step(c: int, k: int):
        def run(v: list) -> list:
            with lock:
                log.append((c, k, threading.get_ident(), torch.get_num_threads()))
            return v + [k]

        return run

    return [([step(c, k) for k in range(n)], [c]) for c, n in enumerate(lengths)]


@needs_openmp
@pytest.mark.parametrize("n_threads", [1, 2, 3, 4])
@pytest.mark.parametrize("lengths", [[3], [4, 1, 2], [2, 2, 2, 2, 2], [0, 3]])
def test_chains_results_and_order(threads, n_threads, lengths):
    threads(n_threads)
    log, lock = [], threading.Lock()
    out = cpu_tasks.run_chains(_recording_chains(lengths, log, lock))
    assert out == [[c] + list(range(n)) for c, n in enumerate(lengths)]
    for c, n in enumerate(lengths):  # each chain's steps ran in order
        assert [k for cc, k, _, _ in log if cc == c] == list(range(n))
    workers = min(n_threads, len(lengths))
    least = n_threads // workers
    # a worker's share, or more for a chain's tail that no idle worker could take part of
    assert all(least <= t <= n_threads for *_, t in log)
    assert len({ident for _, _, ident, _ in log}) <= workers
    assert torch.get_num_threads() == n_threads, "the caller's thread count is restored"


@needs_openmp
def test_chains_run_side_by_side(threads):
    """Two chains whose steps wait for each other finish only if they run at the same time."""
    threads(2)
    barrier = threading.Barrier(2, timeout=10)
    idents = []

    def meet(v):
        idents.append(threading.get_ident())
        barrier.wait()
        return v

    assert cpu_tasks.run_chains([([meet, meet], 0), ([meet, meet], 1)]) == [0, 1]
    assert len(set(idents)) == 2


@needs_openmp
@pytest.mark.parametrize("n_threads", [2, 3])
def test_last_chain_takes_the_idle_threads(threads, n_threads):
    """A chain left alone (the others empty or done) runs with every thread."""
    threads(n_threads)
    seen = []

    def record(v):
        seen.append(torch.get_num_threads())
        return v

    assert cpu_tasks.run_chains([([record] * 3, 0), ([], 1)]) == [0, 1]
    assert seen == [n_threads] * 3


@needs_openmp
def test_nested_chains_share_again(threads):
    threads(4)
    seen = []

    def inner(v):
        return v[0] * 2, torch.get_num_threads()

    def outer(v):
        team = torch.get_num_threads()
        out = cpu_tasks.run_chains([([inner], (v,)), ([inner], (v + 1,))])
        seen.extend(t for _, t in out)
        assert all(t <= team for _, t in out), "inner chains share the outer step's threads"
        return sum(r for r, _ in out)

    assert cpu_tasks.run_chains([([outer], 1), ([outer], 10)]) == [6, 42]
    assert len(seen) == 4 and all(1 <= t <= 4 for t in seen)


@needs_openmp
def test_error_is_raised_and_the_rest_stops(threads):
    threads(2)
    ran, failed = [], threading.Event()

    def bad(v):
        failed.set()
        raise ValueError("step failed")

    def slow(v):
        ran.append(v)
        failed.wait(timeout=10)  # the other chain's step fails while this one runs
        return v

    with pytest.raises(ValueError, match="step failed"):
        cpu_tasks.run_chains([([bad], 0), ([slow] * 50, 1)])
    assert len(ran) == 1, "no new step starts after an error"
    ran.clear()
    assert torch.get_num_threads() == 2
    assert cpu_tasks.run_chains([([slow], 5), ([slow], 6)]) == [5, 6], "the pool works after an error"


@needs_openmp
@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_grad_modes_carried_to_workers(threads, mode):
    threads(2)
    seen = []

    def record(v):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return v

    ctx = {"inference": torch.inference_mode(), "no_grad": torch.no_grad(), "grad": torch.enable_grad()}[mode]
    with ctx:
        expected = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        cpu_tasks.run_chains([([record], 0), ([record], 1)])
    assert seen == [expected, expected]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@needs_openmp
def test_modes_and_profiler_keep_work_on_the_caller(threads):
    """A dispatch mode or the profiler sees the calling thread only: there the chains run in it."""
    threads(2)
    me = threading.get_ident()

    def where(v):
        torch.ones(2).add_(1)
        return threading.get_ident()

    with _Count() as counter:
        assert cpu_tasks.run_chains([([where], 0), ([where], 1)]) == [me, me]
    assert counter.n >= 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert cpu_tasks.run_chains([([where], 0), ([where], 1)]) == [me, me]
    assert cpu_tasks.may_fan_out()


def test_thread_team_op():
    before = torch.ops.hrnet_fast.cpu_thread_team(0)
    if before < 0:
        pytest.skip("torch is built without OpenMP")
    try:
        assert torch.ops.hrnet_fast.cpu_thread_team(1) == before
        assert torch.get_num_threads() == 1, "the calling thread's team is what torch reports"
    finally:
        torch.ops.hrnet_fast.cpu_thread_team(before)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="threads must be >= 0"):
        torch.ops.hrnet_fast.cpu_thread_team(-1)


_NEW_THREAD = """
import threading, torch, hrnet_fast
torch.set_num_threads(2)
x = torch.randn(1, 32, 64, 48).contiguous(memory_format=torch.channels_last)
w = torch.randn(32, 32, 3, 3)
ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).relu()
def run():
    torch.ops.hrnet_fast.cpu_thread_team(TEAM)
    y = torch.ops.hrnet_fast.conv3x3_winograd(x, w, 32, None, None, True, 4)
    print(((y.double() - ref).abs().max() / ref.abs().max()).item(), torch.get_num_threads())
for _ in range(8):
    t = threading.Thread(target=run)
    t.start()
    t.join()
"""


@needs_openmp
@pytest.mark.parametrize("team", [1, 2])
def test_new_thread_keeps_its_team(team):
    """A new thread's team, set before its first op, is the one its first Winograd conv runs with (it
    once ran with torch's count and scratch sized for the team set: wrong outputs). In a fresh process,
    where torch's process-wide count (2) differs from the team."""
    code = _NEW_THREAD.replace("TEAM", str(team))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 8
    assert all(float(err) < 1e-5 for err, _ in rows)
    assert [int(t) for _, t in rows] == [team] * 8


@pytest.mark.parametrize("sizes", [(5, 2), (3, 3), (2, 1)])
def test_split_batch(sizes):
    n, parts = sizes
    x = torch.randn(n, 3, 4, 4)
    pieces = cpu_tasks.split_batch(x, parts)
    assert len(pieces) == parts and max(p.shape[0] for p in pieces) - min(p.shape[0] for p in pieces) <= 1
    assert torch.equal(torch.cat(pieces), x)


def _fused(tasks: bool | None = None):
    model = randomize_bn(tiny_pose_hrnet()).eval()
    return model, hrnet_fast.optimize(model, backend="cpu", tasks=tasks)


@needs_openmp
@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_model_same_bits_with_tasks(threads, n_threads, batch):
    threads(n_threads)
    model, fused = _fused(tasks=True)
    assert all(m.tasks for m in fused.modules() if isinstance(m, (FusedHRModule, ChunkedStage)))
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        on = fused(x)
        for m in fused.modules():
            if isinstance(m, (FusedHRModule, ChunkedStage)):
                m.tasks = False
        off = fused(x)
    assert torch.equal(on, off), "the chains run the same ops on the same inputs"
    assert (on - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert torch.get_num_threads() == n_threads


@needs_openmp
def test_model_tasks_run_on_several_threads(threads, monkeypatch):
    threads(2)
    _, fused = _fused(tasks=True)
    idents = set()
    real = FusedHRModule._output

    def spy(self, i, x):
        idents.add(threading.get_ident())
        time.sleep(0.02)  # the tiny model's steps are over before a worker wakes up, else
        return real(self, i, x)

    monkeypatch.setattr(FusedHRModule, "_output", spy)
    with torch.no_grad():
        for _ in range(5):
            fused(torch.randn(2, 3, 64, 64))
    assert len(idents) >= 2, "the caller and pool threads"


def test_tasks_option():
    model, off = _fused(tasks=False)
    assert not any(m.tasks for m in off.modules() if isinstance(m, (FusedHRModule, ChunkedStage)))
    with pytest.raises(ValueError, match="needs the cpu backend"):
        hrnet_fast.optimize(model, backend="torch", tasks=True)
    torch_model = hrnet_fast.optimize(model, backend="torch")
    assert not any(m.tasks for m in torch_model.modules() if isinstance(m, FusedHRModule))


def _chain_widths(monkeypatch) -> list[int]:
    """The number of chains of every run_chains call from now on (the list fills as the test runs)."""
    widths: list[int] = []
    real = cpu_tasks.run_chains

    def spy(chains):
        widths.append(len(chains))
        return real(chains)

    monkeypatch.setattr(cpu_tasks, "run_chains", spy)
    return widths


@needs_openmp
@pytest.mark.parametrize("n_threads", [1, 2, 4])
@pytest.mark.parametrize("tasks", [None, False])
def test_default_runs_no_chains(threads, monkeypatch, n_threads, tasks):
    """optimize's default (None or False) runs no chains side by side: each op splits its own work."""
    threads(n_threads)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", **({} if tasks is None else {"tasks": tasks}))
    assert not any(m.tasks for m in fused.modules() if isinstance(m, (FusedHRModule, ChunkedStage)))
    widths = _chain_widths(monkeypatch)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, ref = fused(x), model(x)
    assert widths == []
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_tasks_survive_pickling():
    _, fused = _fused(tasks=True)
    again = pickle.loads(pickle.dumps(fused))
    assert all(m.tasks for m in again.modules() if isinstance(m, (FusedHRModule, ChunkedStage)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))


@needs_openmp
@pytest.mark.parametrize("batch, expected", [(1, [1]), (2, [1, 1]), (3, [1, 2])])
def test_stage_one_chunks_side_by_side(threads, batch, expected):
    """Stage 1 (ChunkedStage) takes at least one chunk a thread where the batch allows."""
    threads(2)
    model, fused = _fused(tasks=True)
    calls: list[int] = []
    fused.layer1[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        out, ref = fused(x), model(x)
    assert sorted(calls) == expected
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


_FORKED = """
import os, threading, torch, hrnet_fast
from hrnet_fast.fused import cpu_tasks
torch.set_num_threads(2)
cpu_tasks.run_chains([([lambda v: v], 0), ([lambda v: v], 1)])  # the parent's pool exists
pid = os.fork()
if pid == 0:
    barrier = threading.Barrier(2, timeout=20)
    def meet(v):
        barrier.wait()
        return v
    ok = cpu_tasks.run_chains([([meet], 0), ([meet], 1)]) == [0, 1]
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@needs_openmp
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_forked_child_gets_a_pool_of_its_own():
    """A child forked after the parent used the pool still runs chains side by side (the parent's
    worker threads do not exist in it)."""
    out = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == "0", out.stderr


@needs_openmp
def test_stage_one_chunks_share_the_cache_budget(threads, monkeypatch):
    """Chunks side by side split ChunkedStage's cache budget: a budget of 2 images, 2 threads -> 1-image chunks."""
    threads(2)
    model, fused = _fused(tasks=True)
    per_image = 256 * 16 * 16 * 4  # the tiny net's stage-1 activation at a 64x64 input
    monkeypatch.setattr(ChunkedStage, "CHUNK_BYTES", 2 * per_image)
    calls: list[int] = []
    fused.layer1[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        out, ref = fused(x), model(x)
    assert calls == [1] * 5
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def _multi_module_model() -> torch.nn.Module:
    """Stages 3 and 4 of two HR modules each: what FusedHRStage chains across (tiny_pose_hrnet has one)."""
    return randomize_bn(PoseHighResolutionNet(preset(4, 3, num_blocks=1, modules=(1, 2, 2)))).eval()


@needs_openmp
@pytest.mark.parametrize("batch", [1, 2])
def test_stage_chains_cross_modules(threads, monkeypatch, batch):
    """A stage of K HR modules waits K + 1 times with tasks (each module's outputs chained with the next
    module's branches), not 2K, and gives the same bits as the modules run one after another."""
    threads(2)
    model = _multi_module_model()
    fused = hrnet_fast.optimize(model, backend="cpu", tasks=True)
    assert isinstance(fused.stage3, FusedHRStage) and isinstance(fused.stage4, FusedHRStage)
    assert not isinstance(fused.stage2, FusedHRStage)  # a single module: nothing to chain across
    assert not isinstance(hrnet_fast.optimize(model, backend="torch").stage3, FusedHRStage)
    assert fused.state_dict().keys() == hrnet_fast.optimize(model, backend="torch").state_dict().keys()
    widths = _chain_widths(monkeypatch)
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        on = fused(x)
        # stage 1: its chunks (batch 2); stage 2: branches, outputs (2, 2); stage 3: branches,
        # outputs + branches, outputs (3, 3, 3); stage 4: branches, outputs + branches, output 0 (4, 4, 1)
        assert widths == [2] * (batch == 2) + [2, 2, 3, 3, 3, 4, 4, 1]
        for m in fused.modules():
            if isinstance(m, (FusedHRModule, ChunkedStage)):
                m.tasks = False
        off, ref = fused(x), model(x)
    assert torch.equal(on, off)
    assert (on - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


_POOL_PROBE = """
import os, torch, hrnet_fast
from hrnet_fast.fused import cpu_tasks
torch.set_num_threads(2)
a, b = torch.randn(6144, 64), torch.randn(64, 32)
torch.mm(a, b)
torch.relu(torch.randn(1 << 20))  # the caller's OpenMP (and MKL) threads exist
before = len(os.listdir("/proc/self/task"))
with torch.inference_mode():
    cpu_tasks.run_chains([([lambda v: torch.mm(a, b)] * 3, 0), ([lambda v: torch.mm(a, b)] * 3, 1)])
print(len(os.listdir("/proc/self/task")) - before)
"""


@needs_openmp
@pytest.mark.skipif(not torch.backends.mkl.is_available() or not os.path.isdir("/proc/self/task"),
                    reason="needs torch with MKL, and Linux's /proc to count threads")
def test_task_worker_blas_starts_no_thread_pool():
    """An sgemm (MKL: the fusions' low-resolution 1x1 convs) on a task worker runs in the worker's team of
    one, so it starts no OpenMP thread pool for that worker: the chains add one thread, the pool's worker.
    (MKL keeps a per-thread count of its own; left at torch's, the worker's team was 2, and with more
    OpenMP threads than CPUs every idle OpenMP thread in the process slept after 100 spins from then on.)"""
    out = subprocess.run([sys.executable, "-c", _POOL_PROBE], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == "1", out.stdout + out.stderr
