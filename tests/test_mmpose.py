"""optimize() on MMPose's own HRNet backbone, not a look-alike: same outputs, structure and layout.

The versions are the ones requirements-openmmlab.txt pins and the Makefile installs (mmpose 1.3.2 with
--no-deps, mmengine 0.10.7, mmcv-lite 2.1.0: the mmcv that mmsegmentation 1.2.2 accepts too). mmpose is
imported unconditionally: a missing install fails this file loudly rather than skipping it.

How it is imported: `from mmpose.models.backbones import HRNet`, the real package and module, but with
`mmpose/models/__init__.py` itself not run. That file imports every head, loss, distiller and
dataset of MMPose, and in 1.3.2 those need the compiled mmcv (`mmcv.ops`, for the EDPose head; no
wheel for this torch), mmdet (for the RTMO head; not installed) and xtcocotools (whose
wheel is built against numpy 1). None of that is the backbone's: `mmpose/__init__.py`,
`mmpose.registry`, `mmpose/models/backbones/__init__.py` (every backbone) and `hrnet.py`, with
mmcv.cnn and mmengine.model under them, all run as MMPose ships them.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hrnet_fast
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.hr_module import FusedHRModule

from conftest import assert_openmmlab_pins, randomize_openmmlab

import mmpose  # noqa: E402  (a missing install must fail here, not skip)


def _import_mmpose_backbones():
    """mmpose.models.backbones as shipped, without running mmpose/models/__init__.py (see the docstring)."""
    if "mmpose.models" not in sys.modules:
        models_dir = Path(mmpose.__file__).parent / "models"
        spec = importlib.util.spec_from_file_location(
            "mmpose.models", models_dir / "__init__.py", submodule_search_locations=[str(models_dir)]
        )
        package = importlib.util.module_from_spec(spec)  # not executed: only its subpackages are imported
        sys.modules["mmpose.models"] = package
        mmpose.models = package
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops; mmcv.cnn's transformer bricks (not HRNet's) say so on import
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
        return importlib.import_module("mmpose.models.backbones")


backbones = _import_mmpose_backbones()
from mmpose.registry import MODELS  # noqa: E402

# the backbone of mmpose's configs/body_2d_keypoint/topdown_heatmap/coco/td-hm_hrnet-w32_8xb64-210e_coco-256x192.py
W32_BACKBONE = dict(
    type="HRNet",
    in_channels=3,
    extra=dict(
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(4,), num_channels=(64,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(4, 4), num_channels=(32, 64)),
        stage3=dict(num_modules=4, num_branches=3, block="BASIC", num_blocks=(4, 4, 4), num_channels=(32, 64, 128)),
        stage4=dict(
            num_modules=3, num_branches=4, block="BASIC", num_blocks=(4, 4, 4, 4), num_channels=(32, 64, 128, 256)
        ),
    ),
    # the config's init_cfg (Pretrained, a download) is left out: weights are set by _init below
)

# W18-small-like, every branch returned (multiscale_output=True, as bottom-up configs use)
W18_SMALL_BACKBONE = dict(
    type="HRNet",
    in_channels=3,
    extra=dict(
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(1,), num_channels=(32,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(2, 2), num_channels=(18, 36)),
        stage3=dict(num_modules=2, num_branches=3, block="BASIC", num_blocks=(2, 2, 2), num_channels=(18, 36, 72)),
        stage4=dict(
            num_modules=2,
            num_branches=4,
            block="BASIC",
            num_blocks=(2, 2, 2, 2),
            num_channels=(18, 36, 72, 144),
            multiscale_output=True,
        ),
    ),
)

# one block per branch, 4-wide: for the Triton interpreter
TINY_BACKBONE = dict(
    type="HRNet",
    in_channels=3,
    extra=dict(
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(1,), num_channels=(8,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(1, 1), num_channels=(4, 8)),
        stage3=dict(num_modules=1, num_branches=3, block="BASIC", num_blocks=(1, 1, 1), num_channels=(4, 8, 16)),
        stage4=dict(
            num_modules=1,
            num_branches=4,
            block="BASIC",
            num_blocks=(1, 1, 1, 1),
            num_channels=(4, 8, 16, 32),
            multiscale_output=True,
        ),
    ),
)

# largest |fast - eager| over largest |eager|, per output. Measured: ~1e-6 on both backends (W32, 256x192).
TOL = {"torch": 1e-5, "cpu": 5e-5, "triton": 1e-4}


def _build(cfg: dict, seed: int = 0, **overrides) -> nn.Module:
    """MMPose's HRNet from a config dict through MMPose's registry, as a config file builds it, in eval mode.

    Convs get Kaiming-normal weights (x0.5) rather than MMPose's init_weights (Normal, std 0.001), under which
    the output is nearly all BN bias and would hide a wrong conv; BN gets non-trivial statistics and affine
    terms, so folding is exercised.
    """
    torch.manual_seed(seed)
    model = MODELS.build({**copy.deepcopy(cfg), **overrides})
    return randomize_openmmlab(model, seed)


_CONFIGS = {cfg["extra"]["stage4"]["num_channels"]: cfg for cfg in (W32_BACKBONE, W18_SMALL_BACKBONE, TINY_BACKBONE)}


@functools.lru_cache(maxsize=None)
def _eager_case(stage4_channels: tuple[int, ...], shape: tuple[int, ...]):
    """(model, input, eager output), built once per config and shape: both backends compare with one eager run."""
    model = _build(_CONFIGS[stage4_channels])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x)


def _rel_errors(out, ref) -> list[float]:
    return [(o - r).abs().max().item() / r.abs().max().item() for o, r in zip(out, ref)]


def _assert_same(out, ref, backend: str) -> None:
    """Same container type and length, same shapes, dtypes and strides (layout), values within TOL[backend]."""
    assert type(out) is type(ref), (type(out), type(ref))
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert o.stride() == r.stride(), f"layout differs from eager: strides {o.stride()} vs {r.stride()}"
    errors = _rel_errors(out, ref)
    assert max(errors) <= TOL[backend], errors


def _count_hr_modules(model: nn.Module) -> int:
    return sum(isinstance(m, backbones.hrnet.HRModule) for m in model.modules())


def test_it_is_mmpose_s_own_backbone_at_the_pinned_versions():
    assert backbones.HRNet.__module__ == "mmpose.models.backbones.hrnet"
    assert MODELS.get("HRNet") is backbones.HRNet
    pins = assert_openmmlab_pins("mmpose", "mmengine", "mmcv-lite")
    assert mmpose.__version__ == pins["mmpose"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "cfg,shape,n_out",
    [
        pytest.param(W32_BACKBONE, (1, 3, 256, 192), 1, id="w32-256x192"),
        pytest.param(W18_SMALL_BACKBONE, (2, 3, 128, 96), 4, id="w18small-multiscale-2x128x96"),
    ],
)
def test_optimize_matches_the_eager_mmpose_backbone(cfg, shape, n_out, backend):
    model, x, ref = _eager_case(cfg["extra"]["stage4"]["num_channels"], shape)
    assert len(ref) == n_out
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left unfused
        fast = hrnet_fast.optimize(model, backend=backend, strict=True)
    with torch.no_grad():
        _assert_same(fast(x), ref, backend)
        # a second call (the cpu backend's per-shape caches are built on the first)
        _assert_same(fast(x), ref, backend)
        if x.shape[0] > 1:  # and another batch size
            _assert_same(fast(x[:1]), model(x[:1]), backend)
        if backend == "cpu":  # from the fourth call on, a CPU-graph replay: the same answer
            _assert_same(fast(x), ref, backend)
            assert any(state.startswith("replaying") for state in fast.forward.status().values())
            _assert_same(fast(x), ref, backend)

    assert fast.hrnet_fast_backend == backend and fast.hrnet_fast_skipped == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, FusedHRModule) for m in fast.modules()) == _count_hr_modules(model)
    assert _count_hr_modules(fast) == 0
    assert any(isinstance(m, FusedConv) for m in fast.modules())
    # the MMPose model itself is left as it was
    assert _count_hr_modules(model) > 0 and not any(isinstance(m, FusedConv) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_training_mode_mmpose_model_is_refused_until_eval():
    """optimize() documents: an eval-mode model, else ValueError. MMPose's train() returns None, so
    neither `model.train()` nor `model.eval()` can be chained (optimize itself must not chain them)."""
    model = _build(W18_SMALL_BACKBONE)
    assert model.train() is None
    with pytest.raises(ValueError, match=r"<root> is in training mode: call model\.eval\(\)"):
        hrnet_fast.optimize(model, backend="cpu")

    # norm_eval / frozen_stages: MMPose's train() puts some modules back in eval mode; still a training model
    frozen = _build(W18_SMALL_BACKBONE, norm_eval=True, frozen_stages=4)
    frozen.train()
    assert not any(m.training for m in frozen.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
        hrnet_fast.optimize(frozen, backend="cpu")

    # one stage in training mode, the root in eval mode (its BNs would use batch statistics)
    model.eval()
    model.stage3.train()
    with pytest.raises(ValueError, match=r"stage3 is in training mode"):
        hrnet_fast.optimize(model, backend="cpu")

    assert model.eval() is None
    fast = hrnet_fast.optimize(model, backend="cpu")
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_same(fast(x), model(x), "cpu")


def test_loaded_state_dict_flows_through():
    """Weights loaded into the MMPose model (as an mmengine checkpoint holds them) are the ones the copy runs,
    and loading another optimized copy's state dict into an optimized copy takes effect."""
    a, b = _build(W18_SMALL_BACKBONE, seed=0), _build(W18_SMALL_BACKBONE, seed=1)
    x = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_a = a(x)
        # the two models really differ, so matching the one loaded is evidence
        assert min(_rel_errors(b(x), ref_a)) > 100 * TOL["cpu"]

        fast_b = hrnet_fast.optimize(b, backend="cpu")
        fast_b(x)  # builds the per-shape and Winograd caches from b's weights
        fast_b.load_state_dict(hrnet_fast.optimize(a, backend="cpu").state_dict())
        _assert_same(fast_b(x), ref_a, "cpu")

        checkpoint = {"meta": {"mmpose_version": mmpose.__version__, "epoch": 210}, "state_dict": a.state_dict()}
        report = hrnet_fast.load_checkpoint(b, checkpoint)
        assert report.ok and len(report.loaded) == len(a.state_dict())
        _assert_same(b(x), ref_a, "torch")
        for backend in ("torch", "cpu"):
            _assert_same(hrnet_fast.optimize(b, backend=backend)(x), ref_a, backend)


@pytest.mark.triton
def test_optimize_mmpose_backbone_triton():
    from hrnet_fast.ops._backend import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before pytest starts")
    model = _build(TINY_BACKBONE)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = hrnet_fast.optimize(model, backend="triton", strict=True)
        _assert_same(fast(x), model(x), "triton")
