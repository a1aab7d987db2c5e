"""optimize() on mmsegmentation's whole HRNet segmentors: EncoderDecoder with the HRNetV2 FCNHead of its
fcn_hr18 and fcn_hr48 configs (hrnet_fast/fused/mmseg_head.py), and OCRNet's CascadeEncoderDecoder (that
FCNHead, then an OCRHead whose mmcv ConvModules fold like any conv-BN-ReLU), against eager within 1e-4 of
its largest value, the same layout and NaNs, nothing left unfused; the segmentor's `predict` runs the
fused head too; a head in another form keeps its forward, its ConvModules folded; a model the probe
cannot run keeps the head's structure and is listed.

Imported as tests/test_mmseg.py imports mmseg's HRNet (its docstring says why), plus what the decode head
and the segmentor import: the packages `mmseg.utils` (its __init__ imports a CLIP tokenizer that needs
ftfy), `mmseg.models.losses` (focal loss needs the compiled mmcv.ops, Hausdorff scipy), `decode_heads` and
`segmentors` are created without running their __init__, and the names the real files take from them
bound from the real modules that define them (typing_utils, misc, accuracy, SelfAttentionBlock).
"""
from __future__ import annotations

import copy
import functools
import importlib
import pickle
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import hrnet_fast
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.mmseg_head import EagerLayoutForward, MMSegHeadForward
from hrnet_fast.fused.seg_head import FusedSegHead

from conftest import randomize_openmmlab
from test_mmseg import CONFIGS, FCN_HR18, FCN_HR48, MMSEG_DIR, MODELS, TOL, _package  # noqa: F401 (imports mmseg's HRNet)

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402


def _import_segmentor() -> None:
    """FCNHead, CrossEntropyLoss, SegDataPreProcessor and EncoderDecoder registered, as shipped (docstring)."""
    utils = _package("mmseg.utils", MMSEG_DIR / "utils")
    for name in ("typing_utils", "misc"):
        module = importlib.import_module(f"mmseg.utils.{name}")
        for key in getattr(module, "__all__", None) or [k for k in dir(module) if not k.startswith("_")]:
            setattr(utils, key, getattr(module, key))
    models = MMSEG_DIR / "models"
    losses = _package("mmseg.models.losses", models / "losses")
    losses.accuracy = importlib.import_module("mmseg.models.losses.accuracy").accuracy
    importlib.import_module("mmseg.models.losses.cross_entropy_loss")
    # OCRHead's attention block, from the package whose __init__ test_mmseg does not run either
    sys.modules["mmseg.models.utils"].SelfAttentionBlock = importlib.import_module(
        "mmseg.models.utils.self_attention_block").SelfAttentionBlock
    _package("mmseg.models.decode_heads", models / "decode_heads")
    importlib.import_module("mmseg.models.decode_heads.fcn_head")
    importlib.import_module("mmseg.models.decode_heads.ocr_head")
    _package("mmseg.models.segmentors", models / "segmentors")
    importlib.import_module("mmseg.models.data_preprocessor")
    importlib.import_module("mmseg.models.segmentors.encoder_decoder")
    importlib.import_module("mmseg.models.segmentors.cascade_encoder_decoder")


_import_segmentor()


@functools.lru_cache(maxsize=None)
def _model_cfg(config: str):  # noqa: ANN202  (mmengine's ConfigDict: the segmentor reads test_cfg.mode)
    cfg = Config.fromfile(CONFIGS / config).model
    assert cfg["type"] in ("EncoderDecoder", "CascadeEncoderDecoder")
    return cfg


def _build(config: str, align_corners: bool | None = None, seed: int = 0, **head) -> nn.Module:
    """The config's whole segmentor through mmseg's registry, eval mode, random weights (as test_mmseg._build)."""
    cfg = copy.deepcopy(_model_cfg(config))
    cfg.pop("pretrained", None)  # a checkpoint to download: the weights are random here
    if head:
        cfg["decode_head"].update(head)
    if align_corners is not None:
        cfg["decode_head"]["align_corners"] = align_corners
    torch.manual_seed(seed)
    # the config names its data preprocessor by its name in mmseg's scope; only for this build (a default
    # scope left set would make MMPose's tests build mmseg's HRNet)
    with warnings.catch_warnings(), DefaultScope.overwrite_default_scope("mmseg"):
        warnings.simplefilter("ignore")  # mmseg's own notes on its loss defaults
        model = MODELS.build(cfg)
    return randomize_openmmlab(model, seed)


def _optimize(model: nn.Module, backend: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left unfused
        return hrnet_fast.optimize(model, backend=backend, strict=True)


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.stride() == ref.stride()
    finite = ~ref.isnan()
    assert torch.equal(out.isnan(), ~finite)
    err = (out[finite] - ref[finite]).abs().max().item() / ref[finite].abs().max().item()
    assert err <= TOL, err


@pytest.mark.filterwarnings("ignore:When align_corners=True")  # mmseg's resize, in the eager forward
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "config,shape,align_corners",
    [
        pytest.param(FCN_HR18, (1, 3, 64, 96), None, id="hr18-64x96"),
        # no multiple of 32 (branches 18x23, 9x12, 5x6, 3x3), two images, the head's align_corners True
        pytest.param(FCN_HR18, (2, 3, 70, 90), True, id="hr18-2x70x90-ac1"),
        pytest.param(FCN_HR48, (1, 3, 64, 128), None, id="hr48-64x128"),
    ],
)
def test_optimize_matches_the_eager_segmentor(config, shape, align_corners, backend):
    model = _build(config, align_corners)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    fast = _optimize(model, backend)
    with torch.no_grad():
        ref = model(x)  # mode="tensor": the decode head's logits
        for _ in range(4):  # the cpu backend: caches on the first call, a CPU-graph replay from the fourth
            _assert_close(fast(x), ref)
    assert fast.hrnet_fast_skipped == []
    assert not any(isinstance(m, _BatchNorm) for m in fast.modules())
    head = fast.decode_head
    fused = head.forward.forward if backend == "cpu" else head.forward  # the torch backend runs NCHW as eager
    assert isinstance(fused, MMSegHeadForward) and isinstance(head.hrnet_fast_head, FusedSegHead)
    assert not hasattr(head, "convs") and not hasattr(head, "conv_seg")  # folded into the fused head
    assert head.hrnet_fast_head.align_corners == model.decode_head.align_corners
    if backend == "cpu":
        assert head.hrnet_fast_head.one_op
        assert any(state.startswith("replaying") for state in fast.forward.status().values())


def test_predict_runs_the_fused_head():
    model = _build(FCN_HR18)
    fast = _optimize(model, "cpu")
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    calls = []
    forward = fast.decode_head.forward
    fast.decode_head.forward = lambda inputs: calls.append(1) or forward(inputs)
    with torch.no_grad():
        want, got = model.predict(x), fast.predict(x)
    assert len(calls) == 1 and len(got) == len(want) == 2
    for g, w in zip(got, want):
        _assert_close(g.seg_logits.data, w.seg_logits.data)
        assert g.pred_sem_seg.data.shape == w.pred_sem_seg.data.shape == (1, 64, 96)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_logits_in_eager_s_layout_however_predicted(backend):
    """The optimized model runs channels_last; the logits come out as eager's, NCHW for an NCHW image and
    channels_last for a channels_last one, from forward (mode "tensor" and "predict": the logits then
    inside SegDataSamples) and from predict() called directly, which runs no optimized forward."""
    model = _build(FCN_HR18)
    fast = _optimize(model, backend)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for image in (x, x.contiguous(memory_format=torch.channels_last)):
            _assert_close(fast(image), model(image))
            _assert_close(fast(image, mode="predict")[0].seg_logits.data, model(image, mode="predict")[0].seg_logits.data)
        _assert_close(fast.predict(x)[0].seg_logits.data, model.predict(x)[0].seg_logits.data)
        want = model(x.contiguous(memory_format=torch.channels_last))
        assert want.is_contiguous(memory_format=torch.channels_last) and not want.is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_same_nans_as_eager(backend):
    """NaN and inf in branch 0 at the head. mmseg resizes branch 0 to its own size too, and aten's bilinear
    blend makes an inf NaN there; the fused head resizes it the same way. The head's weights (and BN's
    scale) made positive, so that without that resize the inf would reach the logits as +inf, not NaN."""
    model = _build(FCN_HR18)
    for m in (model.decode_head.convs[0].conv, model.decode_head.convs[0].bn, model.decode_head.conv_seg):
        m.weight.data.abs_()
    fast = _optimize(model, backend)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, c, 16 >> k, 24 >> k, generator=g) for k, c in enumerate((18, 36, 72, 144))]
    inputs[0][0, 5, 7, 9] = float("nan")
    inputs[0][0, 3, 2, 3] = float("inf")
    with torch.no_grad():
        ref = model.decode_head.forward(inputs)
        out = fast.decode_head.forward([t.contiguous(memory_format=torch.channels_last) for t in inputs]
                                       if backend == "cpu" else inputs)
    assert ref[0, :, 2, 3].isnan().all() and ref[0, :, 7, 9].isnan().all()
    assert torch.equal(out.isnan(), ref.isnan()) and not out.isinf().any()
    finite = ~ref.isnan()
    assert (out[finite] - ref[finite]).abs().max() <= TOL * ref[finite].abs().max()


OCRNET_HR18 = "ocrnet/ocrnet_hr18_4xb2-40k_cityscapes-512x1024.py"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_ocrnet_segmentor(backend):
    """OCRNet (CascadeEncoderDecoder): its first head an FCNHead in HRNetV2's form, fused as one; its
    OCRHead (a 3x3 ConvModule on the concatenated branches, attention built of 1x1 ConvModules) keeps its
    forward, each ConvModule one fused conv (the 3x3 Winograd on the cpu backend)."""
    model = _build(OCRNET_HR18)
    assert [type(h).__name__ for h in model.decode_head] == ["FCNHead", "OCRHead"]
    fast = _optimize(model, backend)
    assert fast.hrnet_fast_skipped == [] and not any(isinstance(m, _BatchNorm) for m in fast.modules())
    fcn, ocr = fast.decode_head
    assert isinstance(fcn.forward, MMSegHeadForward)  # its logits are no output: no EagerLayoutForward
    if backend == "cpu":
        assert isinstance(ocr.forward, EagerLayoutForward) and ocr.forward.forward is None  # the class's
    else:
        assert "forward" not in ocr.__dict__
    assert isinstance(ocr.bottleneck, FusedConv) and ocr.bottleneck.relu
    assert not any(type(m).__name__ == "ConvModule" for m in fast.modules())
    if backend == "cpu":
        assert ocr.bottleneck._winograd
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
        for _ in range(4):
            _assert_close(fast(x), ref)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_head_in_another_form_keeps_its_structure_its_convmodules_folded(backend):
    """Two 3x3 ConvModules and concat_input: no HRNetV2 head, so its forward stays; each ConvModule (conv,
    BN, ReLU) is one fused conv like any other, nothing is listed, and the outputs are eager's."""
    model = _build(FCN_HR18, num_convs=2, kernel_size=3, concat_input=True)
    fast = _optimize(model, backend)
    head = fast.decode_head
    assert not hasattr(head, "hrnet_fast_head")
    assert head.forward.forward is None if backend == "cpu" else "forward" not in head.__dict__  # the class's
    assert all(isinstance(m, FusedConv) for m in (*head.convs, head.conv_cat, head.conv_seg))
    assert [m.relu for m in (*head.convs, head.conv_cat, head.conv_seg)] == [True, True, True, False]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for _ in range(2):
            _assert_close(fast(x), model(x))


def test_optimized_segmentor_copies_and_pickles():
    model = _build(FCN_HR18)
    fast = _optimize(model, "cpu")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = fast(x)
        for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert other.decode_head.forward.head is other.decode_head is other.decode_head.forward.forward.head
            _assert_close(other(x), ref)


def test_a_model_the_probe_cannot_run_is_listed():
    """The branches' channels come from a probe forward on an image: a model whose forward takes more
    keeps its FCNHead's structure (its ConvModule still folded), listed with the probe's error."""

    class Scaled(nn.Module):
        def __init__(self, seg: nn.Module):
            super().__init__()
            self.seg = seg

        def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
            return self.seg(x * scale)

    model = Scaled(_build(FCN_HR18)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = hrnet_fast.optimize(model, backend="cpu")
    [(name, why)] = fast.hrnet_fast_skipped
    assert name == "seg.decode_head" and "a 1x3x70x90 probe of the model failed: TypeError" in why
    assert isinstance(fast.seg.decode_head.convs[0], FusedConv) and fast.seg.decode_head.forward.forward is None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_close(fast(x, 0.5), model(x, 0.5))
    with pytest.raises(hrnet_fast.ConversionError, match="probe of the model failed"):
        hrnet_fast.optimize(model, backend="cpu", strict=True)


def _conv_module(**kwargs) -> nn.Module:
    from mmcv.cnn import ConvModule

    return ConvModule(8, 16, 3, padding=1, **kwargs)


@pytest.mark.parametrize(
    "kwargs,folded,relu",
    [
        (dict(norm_cfg=dict(type="BN")), True, True),
        (dict(norm_cfg=dict(type="BN"), act_cfg=None), True, False),
        (dict(), True, True),  # no norm: the conv's own bias
        (dict(norm_cfg=dict(type="BN"), act_cfg=dict(type="GELU")), False, None),  # not a ReLU
        (dict(norm_cfg=dict(type="BN"), order=("norm", "conv", "act")), False, None),  # BN before the conv
    ],
)
def test_mmcv_convmodule_folds_where_it_is_conv_bn_relu(kwargs, folded, relu):
    torch.manual_seed(0)
    model = randomize_openmmlab(nn.Sequential(_conv_module(**kwargs), nn.Conv2d(16, 4, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = hrnet_fast.optimize(model, backend="cpu")
    assert isinstance(fast[0], FusedConv) == folded
    if folded:
        assert fast[0].relu == relu and fast.hrnet_fast_skipped == []
    else:
        assert fast.hrnet_fast_skipped  # its BN left unfolded, and said so
    x = torch.randn(2, 8, 10, 12)
    with torch.no_grad():
        _assert_close(fast(x), model(x))
