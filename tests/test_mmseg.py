"""optimize() on mmsegmentation's own HRNet backbone (issue 12), not a look-alike: same outputs, structure, layout.

The versions are the ones requirements-openmmlab.txt pins and the Makefile installs with --no-deps
(mmsegmentation 1.2.2, mmengine 0.10.7, mmcv-lite 2.1.0: mmseg's package __init__ asserts
2.0.0rc4 <= mmcv < 2.2.0, and MMPose 1.3.2 accepts 2.1.0 too). mmseg is imported unconditionally: a missing
install fails this file loudly rather than skipping it. The backbone configs are read from the config files
the mmsegmentation wheel ships (mmseg/.mim/configs): `_base_/models/fcn_hr18.py` (HRNetV2-W18, SyncBN) and
`hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py` (W48), plus a one-block-per-branch model for quick checks.

How it is imported: `mmseg/__init__.py` (its version asserts, which pass), `mmseg.registry`, and the real
files `mmseg/models/backbones/hrnet.py` and `resnet.py` (BasicBlock, Bottleneck) and
`mmseg/models/utils/wrappers.py` (Upsample, resize) and `res_layer.py` (ResLayer) run as shipped, with mmcv.cnn
and mmengine.model under them. Not run: three package `__init__` files, which import far more than HRNet.
`mmseg/models/__init__.py` imports every head, loss, assigner and segmentor (scipy, ftfy, the compiled
`mmcv.ops`, ...); `mmseg/models/backbones/__init__.py` every backbone (BEiT needs scipy, and the others names
from `..utils` beyond HRNet's); `mmseg/models/utils/__init__.py` imports `point_sample` from the compiled
`mmcv.ops` (mmcv-lite has none; no full mmcv wheel exists for this torch). So those three packages are
created without running their `__init__` (as tests/test_mmpose.py does for `mmpose.models`), and the three
names that hrnet.py and resnet.py take from `..utils` are bound on `mmseg.models.utils` from the real
modules that its `__init__` takes them from. The model is built through mmseg's registry (`MODELS.build`).
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import hrnet_fast
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.hr_module import FusedHRModule

from conftest import assert_openmmlab_pins, randomize_openmmlab

import mmseg  # noqa: E402  (a missing install must fail here, not skip; its __init__ checks mmcv's version)
from mmengine.config import Config  # noqa: E402

MMSEG_DIR = Path(mmseg.__file__).parent
CONFIGS = MMSEG_DIR / ".mim" / "configs"


def _package(name: str, directory: Path):
    """The package `name` (its directory on the search path) without running its __init__.py."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, directory / "__init__.py", submodule_search_locations=[str(directory)]
        )
        sys.modules[name] = importlib.util.module_from_spec(spec)  # not executed: see the docstring
    return sys.modules[name]


def _import_mmseg_hrnet():
    """mmseg.models.backbones.hrnet as shipped, without running three package __init__ files (docstring)."""
    models_dir = MMSEG_DIR / "models"
    models = mmseg.models = _package("mmseg.models", models_dir)
    utils = models.utils = _package("mmseg.models.utils", models_dir / "utils")
    models.backbones = _package("mmseg.models.backbones", models_dir / "backbones")
    wrappers = importlib.import_module("mmseg.models.utils.wrappers")
    res_layer = importlib.import_module("mmseg.models.utils.res_layer")
    # what `from ..utils import Upsample, resize` (hrnet.py) and `from ..utils import ResLayer` (resnet.py) read
    utils.Upsample, utils.resize, utils.ResLayer = wrappers.Upsample, wrappers.resize, res_layer.ResLayer
    return importlib.import_module("mmseg.models.backbones.hrnet")


hrnet = _import_mmseg_hrnet()
from mmseg.registry import MODELS  # noqa: E402

# the backbones of mmseg's own config files, as shipped
FCN_HR18 = "_base_/models/fcn_hr18.py"
FCN_HR48 = "hrnet/fcn_hr48_4xb2-80k_cityscapes-512x1024.py"
# one block per branch, narrow: for the quick checks (same HRNetV2 structure, bilinear fusion)
TINY = dict(
    type="HRNet",
    norm_cfg=dict(type="BN", requires_grad=True),
    extra=dict(
        stage1=dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(1,), num_channels=(8,)),
        stage2=dict(num_modules=1, num_branches=2, block="BASIC", num_blocks=(1, 1), num_channels=(4, 8)),
        stage3=dict(num_modules=1, num_branches=3, block="BASIC", num_blocks=(1, 1, 1), num_channels=(4, 8, 16)),
        stage4=dict(num_modules=1, num_branches=4, block="BASIC", num_blocks=(1,) * 4, num_channels=(4, 8, 16, 32)),
    ),
)

# largest |fast - eager| over largest |eager|, per output: the bound. Measured: ~1e-6 on both
# backends (fcn_hr18 and W48, 96x128 and 90x100).
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _backbone_cfg(config: str) -> dict:
    cfg = Config.fromfile(CONFIGS / config).model.backbone.to_dict()
    assert cfg["type"] == "HRNet"
    return cfg


def _build(cfg: dict | str, seed: int = 0) -> nn.Module:
    """mmseg's HRNet through mmseg's registry, in eval mode, from a config dict or a shipped config file.

    Convs get Kaiming-normal weights (x0.5) (mmseg's own init_weights would load a pretrained checkpoint,
    the config's `pretrained`, which is left out: no download); BN gets non-trivial statistics and affine
    terms, so folding is exercised.
    """
    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(_backbone_cfg(cfg) if isinstance(cfg, str) else cfg))
    return randomize_openmmlab(model, seed)


@functools.lru_cache(maxsize=None)
def _eager_case(config: str, shape: tuple[int, ...]):
    """(model, input, eager output), built once per config and shape: both backends compare with one eager run."""
    model = _build(config)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x)


def _rel_errors(out, ref) -> list[float]:
    return [(o - r).abs().max().item() / r.abs().max().item() for o, r in zip(out, ref)]


def _assert_same(out, ref) -> None:
    """Same container type and length, same shapes, dtypes and strides (layout), values within TOL."""
    assert type(out) is type(ref) and len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert o.stride() == r.stride(), f"layout differs from eager: strides {o.stride()} vs {r.stride()}"
    errors = _rel_errors(out, ref)
    assert max(errors) <= TOL, errors


def _hr_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, hrnet.HRModule)]


def _optimize(model: nn.Module, backend: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left unfused
        return hrnet_fast.optimize(model, backend=backend, strict=True)


def test_it_is_mmseg_s_own_backbone_at_the_pinned_versions():
    assert hrnet.__file__ == str(MMSEG_DIR / "models" / "backbones" / "hrnet.py")
    assert hrnet.HRNet.__module__ == "mmseg.models.backbones.hrnet"
    assert MODELS.get("HRNet") is hrnet.HRNet
    pins = assert_openmmlab_pins("mmsegmentation", "mmengine", "mmcv-lite")
    assert mmseg.__version__ == pins["mmsegmentation"]

    # fcn_hr18 as the config file has it: SyncBN, and mmseg's own Upsample (not nn.Upsample) in the fuse layers
    model = _build(FCN_HR18)
    assert model.extra["stage4"]["num_channels"] == (18, 36, 72, 144)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    ups = [m for m in model.modules() if type(m).__name__ == "Upsample"]
    assert ups and all(type(u) is sys.modules["mmseg.models.utils.wrappers"].Upsample for u in ups)
    assert not any(isinstance(u, nn.Upsample) for u in ups)
    assert {(u.mode, u.align_corners) for u in ups} == {("bilinear", False)}
    assert _backbone_cfg(FCN_HR48)["extra"]["stage4"]["num_channels"] == (48, 96, 192, 384)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "config,shape",
    [
        pytest.param(FCN_HR18, (1, 3, 96, 128), id="hr18-96x128"),
        # no multiple of 32: branches 23x25, 12x13, 6x7, 3x4 (mmseg's forward resizes to the exact size)
        pytest.param(FCN_HR18, (2, 3, 90, 100), id="hr18-2x90x100"),
        pytest.param(FCN_HR48, (1, 3, 64, 96), id="hr48-64x96"),
        pytest.param(FCN_HR48, (1, 3, 70, 90), id="hr48-70x90"),  # branches 18x23, 9x12, 5x6, 3x3
    ],
)
def test_optimize_matches_the_eager_mmseg_backbone(config, shape, backend):
    model, x, ref = _eager_case(config, shape)
    assert type(ref) is list and len(ref) == 4  # HRNetV2: every branch
    exact = all(2 * lo == hi for a, b in zip(ref, ref[1:]) for hi, lo in zip(a.shape[-2:], b.shape[-2:]))
    assert exact == (shape[-2] % 32 == 0 and shape[-1] % 32 == 0)
    before = copy.deepcopy(model.state_dict())
    fast = _optimize(model, backend)
    with torch.no_grad():
        _assert_same(fast(x), ref)
        _assert_same(fast(x), ref)  # a second call (the cpu backend's per-shape caches are built on the first)
        if x.shape[0] > 1:  # and another batch size
            _assert_same(fast(x[:1]), model(x[:1]))
        if backend == "cpu":  # from the fourth call on, a CPU-graph replay: the same answer
            _assert_same(fast(x), ref)
            assert any(state.startswith("replaying") for state in fast.forward.status().values())
            _assert_same(fast(x), ref)

    assert fast.hrnet_fast_backend == backend and fast.hrnet_fast_skipped == []
    assert not any(isinstance(m, _BatchNorm) for m in fast.modules())
    fused = [m for m in fast.modules() if isinstance(m, FusedHRModule)]
    assert len(fused) == len(_hr_modules(model)) == 8 and not _hr_modules(fast)
    assert {(m.mode, m.align_corners) for m in fused} == {("bilinear", False)}  # read off mmseg's Upsample
    assert any(isinstance(m, FusedConv) for m in fast.modules())
    assert not any(isinstance(m, (hrnet.BasicBlock, hrnet.Bottleneck)) for m in fast.modules())
    # the mmseg model itself is left as it was: same modules, same state-dict keys and values
    assert _hr_modules(model) and not any(isinstance(m, FusedConv) for m in model.modules())
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_state_dict_loads_back_and_flows_through():
    """The mmseg model's state dict (as an mmseg checkpoint of the backbone holds it) loads strictly into a
    freshly built one, whose optimized copy then computes the first model's outputs; the optimized copies'
    own state dicts load into each other and take effect."""
    a, b = _build(TINY, seed=0), _build(TINY, seed=1)
    x = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_a = a(x)
        assert min(_rel_errors(b(x), ref_a)) > 100 * TOL  # the two really differ

        fast_b = hrnet_fast.optimize(b, backend="cpu")
        fast_b(x)  # builds the per-shape caches from b's weights
        fast_b.load_state_dict(hrnet_fast.optimize(a, backend="cpu").state_dict())
        _assert_same(fast_b(x), ref_a)

        result = b.load_state_dict(copy.deepcopy(a.state_dict()), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert list(b.state_dict()) == list(a.state_dict())
        assert all(torch.equal(v, a.state_dict()[k]) for k, v in b.state_dict().items())
        _assert_same(b(x), ref_a)
        for backend in ("torch", "cpu"):
            _assert_same(_optimize(b, backend)(x), ref_a)

        checkpoint = {"meta": {"mmseg_version": mmseg.__version__, "iter": 80000}, "state_dict": a.state_dict()}
        c = _build(TINY, seed=2)
        report = hrnet_fast.load_checkpoint(c, checkpoint)
        assert report.ok and len(report.loaded) == len(a.state_dict())
        _assert_same(_optimize(c, "cpu")(x), ref_a)


def test_optimized_copy_pickles():
    """The fused copy keeps mmseg's Upsample modules for sizes that are no exact multiples: it pickles."""
    model = _build(TINY)
    fast = _optimize(model, "cpu")
    with torch.no_grad():
        for x in (torch.randn(1, 3, 64, 96), torch.randn(1, 3, 70, 90)):
            out = fast(x)
            _assert_same(pickle.loads(pickle.dumps(fast))(x), out)
            _assert_same(out, model(x))


def test_training_mode_mmseg_model_is_refused_until_eval():
    model = _build(TINY)
    assert model.train() is None  # mmseg's train() returns None: eval() can't be chained either
    with pytest.raises(ValueError, match=r"<root> is in training mode: call model\.eval\(\)"):
        hrnet_fast.optimize(model, backend="cpu")
    model.eval()
    _optimize(model, "cpu")


def test_an_upsample_subclass_is_not_taken_for_mmseg_s():
    """Only mmseg's Upsample class itself is read as nn.Upsample (hr_module.UPSAMPLE_LOOKALIKES): a subclass
    may do anything in its forward, so its HR module stays as it is and is listed; the rest is fused."""
    model = _build(TINY)
    wrappers = sys.modules["mmseg.models.utils.wrappers"]

    class Upsample(wrappers.Upsample):
        def forward(self, x):
            return 2 * super().forward(x)

    row = model.stage3[0].fuse_layers[0]
    row[1][2] = Upsample(scale_factor=2, mode="bilinear", align_corners=False).eval()
    with pytest.warns(UserWarning, match="left"):
        fast = hrnet_fast.optimize(model, backend="cpu")
    assert [name for name, _ in fast.hrnet_fast_skipped] == ["stage3.0"]
    assert isinstance(fast.stage2[0], FusedHRModule) and isinstance(fast.stage4[0], FusedHRModule)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _assert_same(fast(x), model(x))
