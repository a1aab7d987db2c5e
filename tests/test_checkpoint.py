"""load_checkpoint: every format people have round-trips; every mismatch raises one error listing it."""
from __future__ import annotations

import re

import pytest
import torch

import hrnet_fast
from hrnet_fast import CheckpointMismatchError, load_checkpoint
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import randomize_bn


@pytest.fixture
def source_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(tiny_pose_hrnet(), seed=1).eval()


def _formats(sd: dict) -> dict:
    return {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "module_prefix_in_state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }


@pytest.mark.parametrize("fmt", ["plain", "state_dict", "model", "module_prefix", "module_prefix_in_state_dict"])
@pytest.mark.parametrize("as_path", [True, False])
def test_round_trip(tmp_path, source_model, fmt, as_path):
    obj = _formats(source_model.state_dict())[fmt]
    src = obj
    if as_path:
        src = tmp_path / "ckpt.pth"
        torch.save(obj, src)
    target = tiny_pose_hrnet().eval()
    report = load_checkpoint(target, src)
    assert report.ok and len(report.loaded) == len(source_model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source_model(x), rtol=0, atol=0)


def _mismatched(sd: dict, kind: str) -> dict:
    sd = dict(sd)
    if kind in ("missing", "combined"):
        del sd["final_layer.weight"]
    if kind in ("unexpected", "combined"):
        sd["head.extra.weight"] = torch.zeros(2)
    if kind in ("shape", "combined"):
        sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    return sd


@pytest.mark.parametrize(
    "kind,fragments",
    [
        ("missing", ["1 missing from the checkpoint: final_layer.weight"]),
        ("unexpected", ["1 unexpected in the checkpoint: head.extra.weight"]),
        ("shape", ["1 with the wrong shape: conv1.weight (model [64, 3, 3, 3], checkpoint [64, 3, 5, 5])"]),
        ("combined", ["missing from the checkpoint: final_layer.weight", "unexpected in the checkpoint: head.extra.weight", "conv1.weight (model"]),
    ],
)
def test_strict_mismatch_raises_one_error_listing_all(source_model, kind, fragments):
    target = tiny_pose_hrnet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(target, _mismatched(source_model.state_dict(), kind))
    for f in fragments:
        assert f in str(info.value)
    for k, v in target.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k])


def test_many_missing_keys_are_counted_not_all_listed(source_model):
    sd = {k: v for k, v in source_model.state_dict().items() if not k.startswith("stage4")}
    n = sum(k.startswith("stage4") and not k.endswith("num_batches_tracked") for k in source_model.state_dict())
    with pytest.raises(CheckpointMismatchError, match=rf"{n} missing from the checkpoint: .*\(\+{n - 5} more\)"):
        load_checkpoint(tiny_pose_hrnet(), sd)


def test_non_strict_loads_the_rest_and_warns(source_model):
    target = tiny_pose_hrnet()
    with pytest.warns(UserWarning, match="final_layer.weight"):
        report = load_checkpoint(target, _mismatched(source_model.state_dict(), "combined"), strict=False)
    assert report.missing == ["final_layer.weight"] and report.unexpected == ["head.extra.weight"]
    assert [k for k, _, _ in report.mismatched] == ["conv1.weight"]
    assert torch.equal(target.conv2.weight, source_model.conv2.weight)
    assert not torch.equal(target.conv1.weight, source_model.conv1.weight)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(CheckpointMismatchError, match="could not be read as a PyTorch checkpoint"):
        load_checkpoint(tiny_pose_hrnet(), bad)
    with pytest.raises(CheckpointMismatchError, match="has no tensors"):
        load_checkpoint(tiny_pose_hrnet(), {"epoch": 1})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tiny_pose_hrnet(), tmp_path / "absent.pth")


def test_w32_preset_loads_an_official_layout_checkpoint(tmp_path):
    """A checkpoint written by a model with the official key layout loads into the preset strictly."""
    official_layout = hrnet_fast.pose_hrnet_w32()
    torch.save({"state_dict": official_layout.state_dict()}, tmp_path / "w32.pth")
    assert load_checkpoint(hrnet_fast.pose_hrnet_w32(), tmp_path / "w32.pth").ok


def test_a_checkpoint_without_num_batches_tracked_loads(source_model):
    """Older checkpoints lack BatchNorm's num_batches_tracked; torch's strict load_state_dict accepts that."""
    sd = {k: v for k, v in source_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = tiny_pose_hrnet()
    report = load_checkpoint(target, sd)
    assert report.ok and torch.equal(target.final_layer.weight, source_model.final_layer.weight)


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_unusable_tensors_are_refused_before_anything_is_copied(source_model, kind):
    sd = dict(source_model.state_dict())
    key = "stage4.0.fuse_layers.1.0.0.0.weight" if "stage4.0.fuse_layers.1.0.0.0.weight" in sd else sorted(sd)[-3]
    sd[key] = torch.empty_like(sd[key], device="meta") if kind == "meta" else sd[key].to_sparse()
    target = tiny_pose_hrnet()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=rf"1 that cannot be loaded: {re.escape(key)} \(a {kind}"):
        load_checkpoint(target, sd)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items()), "something was loaded"


def test_a_nested_dict_without_tensors_names_where_it_looked(source_model):
    target = tiny_pose_hrnet()
    assert load_checkpoint(target, {"state_dict": {"a": 1}, "model": source_model.state_dict()}).ok  # "model" has them
    with pytest.raises(CheckpointMismatchError, match=r"\['state_dict'\] has keys 'a'; the given state dict has keys 'state_dict', 'epoch'"):
        load_checkpoint(target, {"state_dict": {"a": 1}, "epoch": 3})
