"""Shared fixtures: the official key lists and configs (tests/fixtures), and seeded models with non-trivial BN statistics."""
from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

import hrnet_fast

REPO = Path(__file__).resolve().parents[1]

# The official pose nets at both input sizes of the official experiments: (builder, (H, W)).
POSE_CASES = [
    (hrnet_fast.pose_hrnet_w32, (256, 192)),
    (hrnet_fast.pose_hrnet_w32, (384, 288)),
    (hrnet_fast.pose_hrnet_w48, (256, 192)),
    (hrnet_fast.pose_hrnet_w48, (384, 288)),
]


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official state_dict key lists and experiment YAMLs, copied into the project as shipped."""
    return FIXTURES


def restoring(switch: str):
    """A fixture handing out the CPU switch op torch.ops.hrnet_fast.<switch> (an on/off setting of a
    kernel's choice: `op(bool)` sets it, `op()` reads it), its setting put back after the test."""

    @pytest.fixture
    def fixture():
        op = getattr(torch.ops.hrnet_fast, switch)
        before = op()
        yield op
        op(before)

    return fixture


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running stats and affine terms, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def assert_openmmlab_pins(*names: str) -> dict[str, str]:
    """Every named package is installed at the version requirements-openmmlab.txt pins; the pins."""
    pins = dict(
        re.match(r"([\w-]+)==(\S+)", line).groups()
        for line in (REPO / "requirements-openmmlab.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in names:
        assert importlib.metadata.version(name) == pins[name], f"{name}: run `make setup` to install the pinned version"
    return pins


def randomize_openmmlab(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """An OpenMMLab backbone made testable: Kaiming-normal conv weights (x0.5) rather than its own
    init_weights, non-trivial BN statistics and affine terms (randomize_bn), eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            m.weight.data.mul_(0.5)
    randomize_bn(model, seed=seed)
    model.eval()  # not chained: OpenMMLab's train() returns None, so eval() does too
    return model


def in_threads(work, n: int) -> None:
    """Run work(k) for k in range(n) on n threads at once; raise the first error any of them raised."""
    import threading

    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            work(k)
        except BaseException as e:  # noqa: BLE001  (re-raised by the calling thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


DELETE = object()  # set_field's value that removes the field


def set_field(cfg: dict, dotted: str, value) -> dict:
    """A deep copy of an official-format config with the field at `dotted` ("MODEL.EXTRA.STAGE1.BLOCK")
    set to `value`, or removed when `value` is DELETE."""
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


# The GPU tests that take a minute (mostly Triton compiles) rather than a second: the autotuned ones,
# then the whole models, the Triton backend's first (its compiles dominate).
def _gpu_slow_rank(item: pytest.Item) -> int | None:
    if item.get_closest_marker("cuda") is None:
        return None
    if item.get_closest_marker("autotune") is not None:
        return 0
    name = getattr(item, "originalname", "")
    if name == "test_optimize_whole_model":
        return 1 if "-triton-" in item.name else 3
    return 2 if name in _GPU_SLOW else None


_GPU_SLOW = {"test_optimize_tf32_default_matches_eager", "test_cudnn_fused_path_and_its_fallback_agree",
             "test_streams_give_the_same_outputs", "test_past_2_31_elements", "test_cuda_graph_with_load_state_dict"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow GPU tests first, each followed by a quick one. Under pytest-xdist with
    `--maxschedchunk 2` (as `make gpu-check` runs them) each worker's first chunk then holds one slow
    test, so they run side by side from the start instead of queueing at the end of the run."""
    ranked = [(rank, i) for i, item in enumerate(items) if (rank := _gpu_slow_rank(item)) is not None]
    if not ranked:
        return
    slow_at = {i for _, i in ranked}
    slow = [items[i] for _, i in sorted(ranked)]
    quick = [item for i, item in enumerate(items) if i not in slow_at]
    head = [item for pair in zip(slow, quick) for item in pair]
    items[:] = head + slow[len(quick):] + quick[len(slow):]
