"""optimize() on segmentation HRNets (issue 12, items 3 and 4): bilinear HR-module fusion and the fused head.

Models: our reference (tiny_seg_hrnet, seg_hrnet_w48), the official seg_hrnet instance (a test-only
copy of the official code in tests/official/seg_hrnet.py, whose fusion mode is nowhere written on its
modules: optimize() probes it), and MMPose's own HRNet backbone with extra['upsample'] bilinear (also
run with mmsegmentation's HR-module forward, which resizes again to the exact size; mmsegmentation's
own HRNet is tested in tests/test_mmseg.py).
Every output within 1e-4 * max|eager| in float32, the same layout, nothing left unfused (strict=True).
"""
from __future__ import annotations

import copy
import pickle
import types
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hrnet_fast
from hrnet_fast.convert import ConversionError
from hrnet_fast.fused.hr_module import FusedHRModule
from hrnet_fast.fused.seg_head import FusedSegHead, SegForward
from hrnet_fast.reference import seg_hrnet_w48, tiny_seg_hrnet

from conftest import randomize_bn
from official import seg_hrnet as official

BACKENDS = ["torch", "cpu"]
X = (1, 3, 64, 128)
ODD = (1, 3, 70, 90)  # no multiple of 32: branches 18x23, 9x12, 5x6, 3x3


class _Cfg(dict):
    """The official code reads its config both ways: cfg.MODEL.EXTRA and extra['STAGE2']."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def official_cfg(align_corners, width: int = 4, num_classes: int = 3) -> _Cfg:
    """tiny_seg_hrnet's shape as an official config (same keys: the state dicts load into each other)."""
    def stage(n):
        return _Cfg(
            NUM_MODULES=1, NUM_BRANCHES=n, BLOCK="BASIC", NUM_BLOCKS=[1] * n,
            NUM_CHANNELS=[width * 2**k for k in range(n)], FUSE_METHOD="SUM",
        )

    extra = _Cfg(
        STAGE1=_Cfg(NUM_MODULES=1, NUM_BRANCHES=1, BLOCK="BOTTLENECK", NUM_BLOCKS=[1], NUM_CHANNELS=[8]),
        STAGE2=stage(2), STAGE3=stage(3), STAGE4=stage(4), FINAL_CONV_KERNEL=1,
    )
    return _Cfg(MODEL=_Cfg(EXTRA=extra, ALIGN_CORNERS=align_corners), DATASET=_Cfg(NUM_CLASSES=num_classes))


def _official(align_corners, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(official.HighResolutionNet(official_cfg(align_corners)), seed).eval()


def _check(model: nn.Module, x: torch.Tensor, backend: str, tol: float = 1e-4) -> nn.Module:
    """optimize(model, strict=True) agrees within tol * max|eager|, same shape and layout; returns it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = hrnet_fast.optimize(model, backend=backend, strict=True)
    with torch.no_grad():
        ref = model(x.clone())
        for _ in range(2):  # the cpu backend builds its per-shape caches on the first call
            out = fused(x.clone())
            assert out.shape == ref.shape and out.stride() == ref.stride()
            err = (out - ref).abs().max().item()
            assert err <= tol * ref.abs().max().item(), err / ref.abs().max().item()
    assert fused.hrnet_fast_skipped == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused


def _modes(fused: nn.Module) -> set[tuple[str, bool]]:
    return {(m.mode, m.align_corners) for m in fused.modules() if isinstance(m, FusedHRModule)}


# ---------------------------------------------------------------------------------------- reference

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners,shape", [(False, X), (True, ODD)], ids=["64x128-ac0", "70x90-ac1"])
def test_reference_seg_model(backend, align_corners, shape):
    model = randomize_bn(tiny_seg_hrnet(align_corners=align_corners)).eval()
    fused = _check(model, torch.randn(*shape, generator=torch.Generator().manual_seed(1)), backend)
    assert sum(isinstance(m, FusedHRModule) for m in fused.modules()) == 3
    assert _modes(fused) == {("bilinear", align_corners)}
    assert isinstance(fused.last_layer, FusedSegHead) and fused.last_layer.align_corners == align_corners
    assert "_hrnet_fast_forward" not in fused.__dict__  # the reference's own forward hands its branches to the head


def test_fused_head_writes_no_concatenation():
    model = randomize_bn(tiny_seg_hrnet()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", strict=True)
    x = torch.randn(*X)
    with torch.no_grad():
        ref = model(x)
        with mock.patch("torch.cat", side_effect=AssertionError("torch.cat called")), \
                mock.patch("torch.nn.functional.interpolate", side_effect=AssertionError("interpolate called")):
            out = fused(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_reference_state_dict_keys_unchanged_by_the_head_protocol():
    model = tiny_seg_hrnet()
    assert all(not k.startswith("last_layer.") or k.split(".")[1] in "0134" for k in model.state_dict())
    assert {k for k in model.state_dict() if k.startswith("last_layer.")} == {
        "last_layer.0.weight", "last_layer.0.bias", "last_layer.1.weight", "last_layer.1.bias",
        "last_layer.1.running_mean", "last_layer.1.running_var", "last_layer.1.num_batches_tracked",
        "last_layer.3.weight", "last_layer.3.bias",
    }


def test_seg_hrnet_w48_structure():
    torch.manual_seed(0)
    model = randomize_bn(seg_hrnet_w48(align_corners=False)).eval()
    fused = _check(model, torch.randn(1, 3, 64, 64), "torch")
    assert sum(isinstance(m, FusedHRModule) for m in fused.modules()) == 8  # 1 + 4 + 3 modules
    assert _modes(fused) == {("bilinear", False)}
    head = fused.last_layer
    assert isinstance(head, FusedSegHead)
    assert tuple(head.base.weight.shape[:2]) == (720, 48)
    assert [tuple(getattr(head, f"w_{k}").shape) for k in range(3)] == [(720, 96), (720, 192), (720, 384)]
    assert tuple(head.classifier.weight.shape[:2]) == (19, 720)


# ----------------------------------------------------------------------------------------- official

def test_official_copy_agrees_with_the_reference():
    """Same keys, same outputs: the test copy and our reference describe the same network."""
    for ac in (False, True):
        model = _official(ac)
        ref = tiny_seg_hrnet(align_corners=ac).eval()
        ref.load_state_dict(model.state_dict(), strict=True)
        x = torch.randn(*ODD)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners", [False, True, None])
def test_official_seg_model(backend, align_corners):
    model = _official(align_corners)  # None: F.interpolate's default, False
    for shape in (X, ODD):
        fused = _check(model, torch.randn(*shape, generator=torch.Generator().manual_seed(2)), backend)
    assert sum(isinstance(m, FusedHRModule) for m in fused.modules()) == 3
    assert _modes(fused) == {("bilinear", bool(align_corners))}  # found by probing: no attribute says so
    assert isinstance(fused.last_layer, FusedSegHead) and fused.last_layer.align_corners == bool(align_corners)
    assert isinstance(fused._hrnet_fast_forward, SegForward)  # what fused.forward (a CPU graph on cpu) runs
    model_forward = type(model).forward
    assert type(fused).forward is model_forward  # the class is untouched; only the copy's instance forward


def test_official_mode_is_what_the_global_says_at_conversion():
    """The official ALIGN_CORNERS is a module global the last model built sets for all: the probe reads
    what the model does now, not what it was built with."""
    first = _official(True)
    _official(False, seed=1)  # sets ALIGN_CORNERS = False for `first` too
    fused = _check(first, torch.randn(*X), "cpu")
    assert _modes(fused) == {("bilinear", False)} and fused.last_layer.align_corners is False


def test_official_with_syncbatchnorm(monkeypatch):
    monkeypatch.setattr(official, "BatchNorm2d", nn.SyncBatchNorm)  # as the official file has it
    model = _official(True)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) > 0
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    for backend in BACKENDS:
        _check(model, torch.randn(*ODD), backend)


def test_optimized_official_copies_and_pickles():
    model = _official(False)
    fused = hrnet_fast.optimize(model, backend="cpu", strict=True)
    x = torch.randn(*X)
    with torch.no_grad():
        out = fused(x)
        for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert other._hrnet_fast_forward.model is other  # the replacement forward follows the copy
            assert other.forward._module is other  # and so does the CPU graph forward around it
            assert torch.equal(other(x), out)


def test_unknown_fusion_mode_is_left_unconverted():
    """A forward-interpolating HR module whose mode is none of the candidates: left as it is, said why."""
    model = _official(False)
    module = model.stage3[0]

    def bicubic_forward(self, x):
        x = [b(t) for b, t in zip(self.branches, x)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = x[i]
            for j in range(self.num_branches):
                if j > i:
                    y = y + F.interpolate(row[j](x[j]), size=x[i].shape[-2:], mode="bicubic", align_corners=False)
                elif j < i:
                    y = y + row[j](x[j])
            out.append(self.relu(y))
        return out

    module.forward = types.MethodType(bicubic_forward, module)
    with pytest.warns(UserWarning, match="left"):
        fused = hrnet_fast.optimize(model, backend="cpu")
    (name, why), = [s for s in fused.hrnet_fast_skipped if s[0] == "stage3.0"]
    assert "matches none of nearest and bilinear" in why
    assert not isinstance(fused.stage3[0], FusedHRModule)
    assert isinstance(fused.stage2[0], FusedHRModule) and isinstance(fused.stage4[0], FusedHRModule)
    x = torch.randn(*X)
    with torch.no_grad():
        ref = model(x)
        assert (fused(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ConversionError, match="stage3.0"):
        hrnet_fast.optimize(model, backend="cpu", strict=True)


def test_head_left_as_it_is_when_the_forward_differs():
    """A model with the official structure whose forward does something else after the head: the
    forward is not replaced (the head still has its BN folded), and the reason is listed."""
    model = _official(True)
    model.forward = types.MethodType(lambda self, x: 2 * type(self).forward(self, x), model)
    with pytest.warns(UserWarning, match="last_layer"):
        fused = hrnet_fast.optimize(model, backend="cpu")
    assert [n for n, _ in fused.hrnet_fast_skipped] == ["last_layer"]
    assert not isinstance(fused.last_layer, FusedSegHead)
    x = torch.randn(*X)
    with torch.no_grad():
        ref = model(x)
        assert (fused(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


# ------------------------------------------------------------------------------------------ MMPose

def _mmpose(align_corners: bool, mmseg_forward: bool = False) -> nn.Module:
    from test_mmpose import TINY_BACKBONE, _build, backbones

    cfg = copy.deepcopy(TINY_BACKBONE)
    cfg["extra"]["upsample"] = dict(mode="bilinear", align_corners=align_corners)
    model = _build(cfg)
    if mmseg_forward:
        for m in model.modules():
            if isinstance(m, backbones.hrnet.HRModule):
                m.forward = types.MethodType(_mmseg_hr_module_forward, m)
    return model


def _mmseg_hr_module_forward(self, x):
    """mmsegmentation 1.2.2's HRModule.forward (mmseg/models/backbones/hrnet.py): after the fuse layer's
    Upsample(scale_factor), a bilinear resize to x[i]'s exact size (align_corners=False)."""
    if self.num_branches == 1:
        return [self.branches[0](x[0])]
    for i in range(self.num_branches):
        x[i] = self.branches[i](x[i])
    x_fuse = []
    for i in range(len(self.fuse_layers)):
        y = 0
        for j in range(self.num_branches):
            if i == j:
                y += x[j]
            elif j > i:
                y = y + F.interpolate(self.fuse_layers[i][j](x[j]), size=x[i].shape[2:], mode="bilinear", align_corners=False)
            else:
                y += self.fuse_layers[i][j](x[j])
        x_fuse.append(self.relu(y))
    return x_fuse


def _check_tuple(model, x, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = hrnet_fast.optimize(model, backend=backend, strict=True)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert type(out) is type(ref) and len(out) == len(ref) == 4
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.stride() == r.stride()
        assert (o - r).abs().max() <= 1e-4 * r.abs().max()
    assert fused.hrnet_fast_skipped == []
    return fused


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_mmpose_bilinear_backbone(backend, align_corners):
    fused = _check_tuple(_mmpose(align_corners), torch.randn(*X), backend)
    assert _modes(fused) == {("bilinear", align_corners)}  # read off the Upsample modules


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmseg_style_resize_at_sizes_no_multiple_of_32(backend):
    """Where x[i]'s size is not x[j]'s times 2**(j-i), Upsample(scale_factor) then a resize is not one
    interpolation to the exact size: those terms run as the module does (MMPose's own forward stops
    there with a size mismatch; mmsegmentation's resizes, as here)."""
    model = _mmpose(False, mmseg_forward=True)
    for shape in (X, ODD):
        _check_tuple(model, torch.randn(*shape), backend)


# ------------------------------------------------------------------------------------------ Triton

@pytest.mark.triton
def test_reference_and_official_seg_models_triton():
    from hrnet_fast.ops._backend import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("needs triton and TRITON_INTERPRET=1 set before pytest starts")
    x = torch.randn(1, 3, 32, 64)
    fused = _check(randomize_bn(tiny_seg_hrnet(align_corners=False)).eval(), x, "triton")
    assert isinstance(fused.last_layer, FusedSegHead)
    _check(_official(True), x, "triton")
