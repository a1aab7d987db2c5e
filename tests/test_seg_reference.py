"""The reference segmentation HRNet (HRNetV2): key-exact with the official seg_hrnet state_dict, built from
the official Cityscapes YAML as shipped (typo included), bilinear fusion and head checked against an
independent float64 forward, and the official training checkpoint formats loaded strictly."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import hrnet_fast
import references as refs
from hrnet_fast import CheckpointMismatchError, load_checkpoint
from hrnet_fast.reference import (
    BasicBlock,
    HighResolutionModule,
    StageConfig,
    parse_seg_config,
    tiny_pose_hrnet,
    tiny_seg_hrnet,
)

from conftest import DELETE, randomize_bn, set_field

SEG_YAML = "seg_hrnet_w48_cityscapes_512x1024.yaml"
SEG_TSV = "seg_hrnet_w48_cityscapes.state_dict.tsv"


# ---------------------------------------------------------------------------------------------------------
# keys and config


def _fixture_rows(path) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line and not line.startswith("#")]


def _rows(model: nn.Module) -> list[tuple[str, str, str]]:
    return [
        (k, "scalar" if v.dim() == 0 else "x".join(map(str, v.shape)), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]


@pytest.fixture(scope="module")
def seg_cfg(fixtures_dir) -> dict:
    return yaml.safe_load((fixtures_dir / SEG_YAML).read_text())


def _ns(node):
    return SimpleNamespace(**{k: _ns(v) for k, v in node.items()}) if isinstance(node, dict) else node


def test_fixture_is_the_official_file_with_its_typo(seg_cfg):
    stage1 = seg_cfg["MODEL"]["EXTRA"]["STAGE1"]
    assert "NUM_RANCHES" in stage1 and "NUM_BRANCHES" not in stage1
    assert seg_cfg["MODEL"]["ALIGN_CORNERS"] is False and seg_cfg["DATASET"]["NUM_CLASSES"] == 19


@pytest.mark.parametrize("form", ["path", "dict", "attributes"])
def test_state_dict_matches_official_key_for_key(fixtures_dir, seg_cfg, form):
    """All 1839 tensors, in the official order, with the official shapes and dtypes; built on the meta device."""
    cfg = {"path": fixtures_dir / SEG_YAML, "dict": seg_cfg, "attributes": _ns(seg_cfg)}[form]
    expected = _fixture_rows(fixtures_dir / SEG_TSV)
    with torch.device("meta"):
        got = _rows(hrnet_fast.get_seg_model(cfg))
    assert len(got) == len(expected) == 1839
    for e, g in zip(expected, got):
        assert g == e


def test_w48_preset_matches_the_official_keys(fixtures_dir):
    with torch.device("meta"):
        preset = hrnet_fast.seg_hrnet_w48(num_classes=19, align_corners=False)
    assert _rows(preset) == _fixture_rows(fixtures_dir / SEG_TSV)
    assert preset.config == parse_seg_config(fixtures_dir / SEG_YAML)


def test_official_yaml_parses_as_shipped(fixtures_dir):
    c = parse_seg_config(fixtures_dir / SEG_YAML)
    assert c.stage1 == StageConfig(1, 1, "BOTTLENECK", (4,), (64,))
    assert c.stage4.num_channels == (48, 96, 192, 384) and c.stage4.block == "BASIC"
    assert (c.stage2.num_modules, c.stage3.num_modules, c.stage4.num_modules) == (1, 4, 3)
    assert c.stage3.num_blocks == (4, 4, 4)
    assert c.num_classes == 19 and c.final_conv_kernel == 1 and c.align_corners is False


def test_attribute_style_and_path_configs_equal_the_dict(fixtures_dir, seg_cfg):
    path = fixtures_dir / SEG_YAML
    assert parse_seg_config(_ns(seg_cfg)) == parse_seg_config(seg_cfg) == parse_seg_config(str(path))


def test_official_defaults_where_the_config_is_silent(seg_cfg):
    """MODEL.ALIGN_CORNERS defaults to True and DATASET.NUM_CLASSES to 19 (the official defaults); without
    STAGE1, layer1 is the 4 Bottlenecks of 64 planes the first official seg_hrnet.py hard-coded."""
    cfg = set_field(set_field(seg_cfg, "MODEL.ALIGN_CORNERS", DELETE), "DATASET", DELETE)
    cfg = set_field(cfg, "MODEL.EXTRA.STAGE1", DELETE)
    c = parse_seg_config(cfg)
    assert c.align_corners is True and c.num_classes == 19
    assert c.stage1 == parse_seg_config(seg_cfg).stage1


def test_num_classes_kernel_and_align_corners_reach_the_model(seg_cfg):
    cfg = set_field(set_field(seg_cfg, "DATASET.NUM_CLASSES", 7), "MODEL.EXTRA.FINAL_CONV_KERNEL", 3)
    cfg = set_field(cfg, "MODEL.ALIGN_CORNERS", True)
    with torch.device("meta"):
        model = hrnet_fast.get_seg_model(cfg)
    head = model.last_layer[3]
    assert head.out_channels == 7 and head.kernel_size == (3, 3) and head.padding == (1, 1)
    assert model.align_corners is True
    modules = [m for m in model.modules() if isinstance(m, HighResolutionModule)]
    assert len(modules) == 8 and all(m.upsample_mode == "bilinear" and m.align_corners for m in modules)


def test_stage1_is_read_as_the_official_code_reads_it(seg_cfg):
    cfg = set_field(seg_cfg, "MODEL.EXTRA.STAGE1.NUM_CHANNELS", [32])
    cfg = set_field(cfg, "MODEL.EXTRA.STAGE1.NUM_BLOCKS", [2])
    with torch.device("meta"):
        model = hrnet_fast.get_seg_model(cfg)
    assert len(model.layer1) == 2 and model.layer1[0].conv1.out_channels == 32
    assert model.transition1[0][0].in_channels == 128  # 32 planes * Bottleneck's expansion 4


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("MODEL.EXTRA.STAGE1.NUM_RANCHES", DELETE, None),  # the typo'd key is not read: removing it changes nothing
        ("MODEL.EXTRA.STAGE1.NUM_BRANCHES", 2, "MODEL.EXTRA.STAGE1.NUM_BRANCHES must be 1"),
        ("MODEL.EXTRA.STAGE1.NUM_MODULES", 2, "MODEL.EXTRA.STAGE1.NUM_MODULES must be 1"),
        ("MODEL.EXTRA.STAGE1.NUM_BLOCKS", [4, 4], "MODEL.EXTRA.STAGE1.NUM_BLOCKS must be a list of one entry"),
        ("MODEL.EXTRA.STAGE1.NUM_CHANNELS", [0], "MODEL.EXTRA.STAGE1.NUM_CHANNELS[0] must be an integer >= 1"),
        ("MODEL.EXTRA.STAGE1.BLOCK", "RESNEXT", "MODEL.EXTRA.STAGE1.BLOCK must be one of"),
        ("MODEL.EXTRA.STAGE1.BLOCK", DELETE, "config is missing MODEL.EXTRA.STAGE1.BLOCK"),
        ("MODEL.EXTRA.STAGE4.NUM_CHANNELS", [48, 96, 192], "MODEL.EXTRA.STAGE4.NUM_CHANNELS has 3 entries but NUM_BRANCHES is 4"),
        ("MODEL.EXTRA.STAGE3.NUM_BRANCHES", DELETE, "config is missing MODEL.EXTRA.STAGE3.NUM_BRANCHES"),
        ("MODEL.EXTRA.FINAL_CONV_KERNEL", DELETE, "config is missing MODEL.EXTRA.FINAL_CONV_KERNEL"),
        ("MODEL.EXTRA.FINAL_CONV_KERNEL", 5, "MODEL.EXTRA.FINAL_CONV_KERNEL must be 1 or 3"),
        ("MODEL.ALIGN_CORNERS", "false", "MODEL.ALIGN_CORNERS must be true or false"),
        ("DATASET.NUM_CLASSES", 0, "DATASET.NUM_CLASSES must be an integer >= 1"),
    ],
)
def test_config_fields_are_checked_by_name(seg_cfg, field, value, message):
    cfg = set_field(seg_cfg, field, value)
    if message is None:
        assert parse_seg_config(cfg) == parse_seg_config(seg_cfg)
        return
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_seg_config(cfg)


def test_hr_module_rejects_an_unknown_upsample_mode():
    with pytest.raises(ValueError, match="upsample must be 'nearest' or 'bilinear'"):
        HighResolutionModule(2, BasicBlock, [1, 1], [4, 8], [4, 8], upsample="bicubic")


def test_fuse_layers_hold_no_upsample_module_but_pose_ones_do():
    seg, pose = tiny_seg_hrnet(), tiny_pose_hrnet()
    assert [type(m) for m in seg.stage4[0].fuse_layers[0][3]] == [nn.Conv2d, nn.BatchNorm2d]
    assert isinstance(pose.stage4[0].fuse_layers[0][3][2], nn.Upsample)
    assert not any(isinstance(m, nn.Upsample) for m in seg.modules())


# ---------------------------------------------------------------------------------------------------------
# values: an independent float64 forward


def bilinear(y: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """y [N, C, h, w] resized to `size` by the bilinear rule PyTorch documents, written out: output index d
    reads source position s = d * (in - 1) / (out - 1) with align_corners (0 for out == 1), else
    s = max((d + 0.5) * in / out - 0.5, 0); it blends rows floor(s) and floor(s) + 1 (clamped) by the
    fraction. Separable: rows, then columns, as two interpolation matrices."""

    def matrix(n_in: int, n_out: int) -> torch.Tensor:
        d = torch.arange(n_out, dtype=torch.float64)
        if align_corners:
            s = d * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(d)
        else:
            s = ((d + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        i0 = s.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = s - i0
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), i0] += 1 - frac
        m[torch.arange(n_out), i1] += frac
        return m

    rows, cols = matrix(y.shape[2], size[0]), matrix(y.shape[3], size[1])
    return torch.einsum("ph,nchw,qw->ncpq", rows, y.to(torch.float64), cols)


def _relu(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t < 0, torch.zeros_like(t), t)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * s[:, None, None, None]
    b = bn.bias.double() - bn.running_mean.double() * s
    if conv.bias is not None:
        b = b + conv.bias.double() * s
    return w, b


def _conv_bn(x, conv, bn, relu: bool, residual=None) -> torch.Tensor:
    w, b = _fold(conv, bn)
    return refs.conv_bias_act(x, w, b, conv.stride, conv.padding, residual, relu)


def _chain(x, seq: nn.Module) -> torch.Tensor:
    """A (nested) Sequential of Conv2d, BatchNorm2d[, ReLU] groups, as sliding-window sums with BN folded."""
    leaves = [m for m in seq.modules() if not list(m.children())]
    k = 0
    while k < len(leaves):
        relu = k + 2 < len(leaves) and isinstance(leaves[k + 2], nn.ReLU)
        x = _conv_bn(x, leaves[k], leaves[k + 1], relu)
        k += 3 if relu else 2
    return x


def _block(x, blk) -> torch.Tensor:
    res = x if blk.downsample is None else _chain(x, blk.downsample)
    y = _conv_bn(x, blk.conv1, blk.bn1, True)
    if hasattr(blk, "conv3"):
        y = _conv_bn(y, blk.conv2, blk.bn2, True)
        return _conv_bn(y, blk.conv3, blk.bn3, True, residual=res)
    return _conv_bn(y, blk.conv2, blk.bn2, True, residual=res)


def _hr_module(xs, m: HighResolutionModule) -> list[torch.Tensor]:
    xs = [functools.reduce(_block, branch, x) for branch, x in zip(m.branches, xs)]
    if m.fuse_layers is None:
        return xs
    out = []
    for i, row in enumerate(m.fuse_layers):
        y = torch.zeros_like(xs[i])
        for j, x in enumerate(xs):
            if j == i:
                y = y + x
            elif j > i:
                conv, bn = row[j]
                y = y + bilinear(_conv_bn(x, conv, bn, False), xs[i].shape[-2:], m.align_corners)
            else:
                y = y + _chain(x, row[j])
        out.append(_relu(y))
    return out


def _head(ys, model) -> torch.Tensor:
    """last_layer without the concatenation: its first 1x1 conv (BN folded) is a sum over the branches of
    that branch's slice of the weight, applied at the branch's resolution, then upsampled (conv1x1 and
    bilinear resizing commute; the bias goes on once, at full size)."""
    conv_a, bn, _, conv_b = model.last_layer
    w, b = _fold(conv_a, bn)
    w = w[:, :, 0, 0]
    size, z, start = ys[0].shape[-2:], b[None, :, None, None], 0
    for k, y in enumerate(ys):
        part = torch.einsum("oc,nchw->nohw", w[:, start:start + y.shape[1]], y)
        z = z + (part if k == 0 else bilinear(part, size, model.align_corners))
        start += y.shape[1]
    z = _relu(z)
    return refs.conv_bias_act(z, conv_b.weight, conv_b.bias, conv_b.stride, conv_b.padding, relu=False)


def independent_forward(model, x: torch.Tensor) -> torch.Tensor:
    """The segmentation HRNet's forward in float64 from its parameters alone: no module's forward runs."""
    x = _conv_bn(x.double(), model.conv1, model.bn1, True)
    x = _conv_bn(x, model.conv2, model.bn2, True)
    ys = [functools.reduce(_block, model.layer1, x)]
    for transition, stage in ((model.transition1, model.stage2), (model.transition2, model.stage3), (model.transition3, model.stage4)):
        xs = [ys[i] if t is None else _chain(ys[min(i, len(ys) - 1)], t) for i, t in enumerate(transition)]
        ys = functools.reduce(lambda acc, m: _hr_module(acc, m), stage, xs)
    return _head(ys, model)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(37, 23), (9, 14), (1, 5), (16, 16)])
@pytest.mark.parametrize("src", [(5, 4), (1, 3), (16, 16)])
def test_bilinear_formula_agrees_with_torch(align_corners, size, src):
    """The written-out formula the model is checked against, itself checked once against F.interpolate."""
    y = torch.randn(2, 3, *src, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(bilinear(y, size, align_corners), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("align_corners", [True, False])
def test_hr_module_fuses_bilinearly_to_the_exact_size(align_corners):
    """Three branches at odd sizes (9x7, 5x4, 3x2), float64: each output against the independent fusion."""
    torch.manual_seed(0)
    m = HighResolutionModule(
        3, BasicBlock, [1, 1, 1], [4, 8, 16], [4, 8, 16], upsample="bilinear", align_corners=align_corners
    )
    m = randomize_bn(m, seed=3).double().eval()
    xs = [torch.randn(2, 4, 9, 7), torch.randn(2, 8, 5, 4), torch.randn(2, 16, 3, 2)]
    xs = [x.double() for x in xs]
    with torch.no_grad():
        got = m([x.clone() for x in xs])
        expected = _hr_module(xs, m)
    assert [tuple(g.shape) for g in got] == [(2, 4, 9, 7), (2, 8, 5, 4), (2, 16, 3, 2)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10 * e.abs().max().item())


def _seeded_tiny(align_corners: bool, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(tiny_seg_hrnet(align_corners=align_corners, num_classes=num_classes), seed=1).eval()


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(64, 48), (50, 70)])
def test_whole_model_float64_equals_the_independent_forward(align_corners, size):
    """Stem, blocks, transitions, bilinear fusions and the head, all from the parameters in float64; 50x70
    is no multiple of 32, so every branch has an odd size somewhere and the resizing is not by 2**k."""
    model = _seeded_tiny(align_corners).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        expected = independent_forward(model, x)
    assert got.shape == (2, 3, -(-size[0] // 4), -(-size[1] // 4))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_float32_model_is_within_rounding_of_float64():
    model = _seeded_tiny(False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        expected = independent_forward(model, x)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_align_corners_changes_the_output():
    """The same weights give different logits with align_corners True and False, each equal to its own formula
    (checked above): the flag reaches every fusion and the head."""
    a, b = _seeded_tiny(True), _seeded_tiny(False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x), rtol=0, atol=1e-4)


def test_head_upsamples_concatenates_and_classifies():
    """The head by its other reading: F.interpolate each branch, torch.cat, then last_layer's modules in order."""
    model = _seeded_tiny(False, num_classes=5)
    seen = {}
    model.stage4.register_forward_hook(lambda m, args, out: seen.setdefault("y", [t.clone() for t in out]))
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        out = model(x)
        y = seen["y"]
        up = [torch.nn.functional.interpolate(t, size=y[0].shape[-2:], mode="bilinear", align_corners=False) for t in y[1:]]
        expected = model.last_layer(torch.cat([y[0], *up], 1))
    assert len(y) == 4 and out.shape == (2, 5, 12, 20)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(64, 128), (72, 40)])
def test_w48_logits_are_a_quarter_of_the_input(size):
    model = hrnet_fast.seg_hrnet_w48().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 19, size[0] // 4, size[1] // 4)


def test_get_seg_model_initialises_like_the_official_code(fixtures_dir):
    model = hrnet_fast.get_seg_model(fixtures_dir / SEG_YAML)
    assert 0.0005 < model.conv1.weight.std().item() < 0.002
    assert 0.0005 < model.last_layer[3].weight.std().item() < 0.002
    assert torch.all(model.last_layer[1].weight == 1) and torch.all(model.last_layer[1].bias == 0)
    assert model.last_layer[0].bias.abs().max() > 0  # conv biases keep PyTorch's default, as officially


# ---------------------------------------------------------------------------------------------------------
# checkpoints


class _CrossEntropy(nn.Module):
    """Shaped like the official trainer's criterion: an nn.CrossEntropyLoss under `criterion`."""

    def __init__(self, weight: torch.Tensor | None):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=255)


class _FullModel(nn.Module):
    """Shaped like the official trainer's FullModel: the network under `model`, the loss under `loss`."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss


def _official_formats(model: nn.Module) -> dict:
    weighted = _FullModel(model, _CrossEntropy(torch.rand(3))).state_dict()  # Cityscapes: class weights
    unweighted = _FullModel(model, _CrossEntropy(None)).state_dict()
    assert "loss.criterion.weight" in weighted and not any(k.startswith("loss.") for k in unweighted)
    return {
        "plain": model.state_dict(),
        "best.pth": weighted,  # torch.save(model.module.state_dict(), 'best.pth') with model = FullModel
        "final_state.pth, no class weights": unweighted,
        "checkpoint.pth.tar": {"epoch": 3, "best_mIoU": 0.5, "state_dict": weighted, "optimizer": {"state": {}, "param_groups": []}},
        "DataParallel(FullModel)": {f"module.{k}": v for k, v in weighted.items()},
    }


@pytest.mark.parametrize("fmt", ["plain", "best.pth", "final_state.pth, no class weights", "checkpoint.pth.tar", "DataParallel(FullModel)"])
@pytest.mark.parametrize("as_path", [True, False])
def test_official_checkpoint_formats_round_trip(tmp_path, fmt, as_path):
    source = _seeded_tiny(False)
    src = _official_formats(source)[fmt]
    if as_path:
        torch.save(src, tmp_path / "ckpt.pth")
        src = tmp_path / "ckpt.pth"
    target = tiny_seg_hrnet(align_corners=False).eval()
    report = load_checkpoint(target, src)
    assert report.ok and len(report.loaded) == len(source.state_dict())
    weighted = fmt in ("best.pth", "checkpoint.pth.tar", "DataParallel(FullModel)")
    assert report.ignored == (["loss.criterion.weight"] if weighted else [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_w48_official_training_checkpoint_loads_into_the_yaml_model(tmp_path, fixtures_dir):
    """best.pth of the official trainer (FullModel with Cityscapes' 19 class weights) into get_seg_model(yaml)."""
    source = hrnet_fast.seg_hrnet_w48(align_corners=False)
    best = _FullModel(source, _CrossEntropy(torch.rand(19))).state_dict()
    target = hrnet_fast.get_seg_model(fixtures_dir / SEG_YAML)
    report = load_checkpoint(target, best)
    assert report.ok and len(report.loaded) == 1839 and report.ignored == ["loss.criterion.weight"]
    assert torch.equal(target.last_layer[3].weight, source.last_layer[3].weight)


def test_a_wrapper_model_takes_the_full_model_state_dict_as_it_is():
    """A model whose own keys start with model. / loss. gets no prefix stripped and nothing set aside."""
    full = _FullModel(_seeded_tiny(False), _CrossEntropy(torch.rand(3)))
    target = _FullModel(tiny_seg_hrnet(align_corners=False), _CrossEntropy(torch.zeros(3)))
    report = load_checkpoint(target, full.state_dict())
    assert report.ok and report.ignored == [] and torch.equal(target.loss.criterion.weight, full.loss.criterion.weight)


@pytest.mark.parametrize(
    "change,fragments",
    [
        ("classes", ["match SegHighResolutionNet: 2 with the wrong shape: last_layer.3.weight (model [3, 60, 1, 1], checkpoint [5, 60, 1, 1]), last_layer.3.bias (model [3], checkpoint [5])"]),
        ("missing", ["match SegHighResolutionNet: 1 missing from the checkpoint: last_layer.3.bias"]),
        ("stray", ["unexpected in the checkpoint: aux_head.weight, model.conv1.weight", "missing from the checkpoint: conv1.weight"]),
        ("pose", ["8 missing from the checkpoint: last_layer.0.weight, last_layer.0.bias, last_layer.1.weight", "2 unexpected in the checkpoint: final_layer.weight, final_layer.bias"]),
    ],
)
def test_mismatched_seg_checkpoints_raise_naming_the_keys(change, fragments):
    if change == "classes":
        sd = _FullModel(_seeded_tiny(False, num_classes=5), _CrossEntropy(torch.rand(5))).state_dict()
    elif change == "missing":
        sd = _FullModel(_seeded_tiny(False), _CrossEntropy(torch.rand(3))).state_dict()
        del sd["model.last_layer.3.bias"]
    elif change == "stray":  # a key outside model. / loss.: not the trainer's format, so nothing is stripped
        sd = {"aux_head.weight": torch.zeros(1), **_FullModel(_seeded_tiny(False), _CrossEntropy(None)).state_dict()}
    else:  # a pose head on the same backbone
        sd = {k: v for k, v in _seeded_tiny(False).state_dict().items() if not k.startswith("last_layer.")}
        sd = {f"model.{k}": v for k, v in {**sd, "final_layer.weight": torch.zeros(3, 4, 1, 1), "final_layer.bias": torch.zeros(3)}.items()}
    target = tiny_seg_hrnet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(target, sd)
    for f in fragments:
        assert f in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "something was loaded"


def test_non_strict_sets_the_loss_aside_and_warns_only_about_the_model():
    sd = _FullModel(_seeded_tiny(False), _CrossEntropy(torch.rand(3))).state_dict()
    del sd["model.last_layer.3.bias"]
    target = tiny_seg_hrnet()
    with pytest.warns(UserWarning, match="last_layer.3.bias") as record:
        report = load_checkpoint(target, sd, strict=False)
    assert report.missing == ["last_layer.3.bias"] and report.unexpected == [] and report.ignored == ["loss.criterion.weight"]
    assert "loss.criterion" not in str(record[0].message)
