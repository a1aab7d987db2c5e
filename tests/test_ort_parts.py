"""hrnet_fast.bench.ort_parts: ONNX Runtime's node times go to the part of the model whose module made
the node's output, by the names the exporter keeps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hrnet_fast.bench.ort_parts import by_part, module_of_values, node_value, ort_module_ms, part_of
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import randomize_bn


def test_names_and_parts():
    assert node_value("relu_14_nchwc") == "relu_14" and node_value("node_add_12") == "add_12"
    assert node_value("getitem_6") == "getitem_6"
    assert [part_of(p) for p in ("conv1", "bn2", "relu", "layer1.0.conv1", "transition1.0.0", "stage2.0.branches.1",
                                 "transition3.3.0.2", "stage4.0.fuse_layers.3", "final_layer", "somewhere")] == [
        "stem", "stem", "stem", "stage1", "stage2", "stage2", "stage4", "stage4", "head", "other"]
    assert by_part({"conv1": 1.0, "relu": 0.5, "layer1.0.relu": 2.0, "(none)": 0.25}) == {
        "stem": 1.5, "stage1": 2.0, "other": 0.25}


def test_every_part_gets_its_nodes(tmp_path: Path):
    """The tiny pose net exported and profiled: every part but the stem-less ones has time, and the parts'
    sum is what ONNX Runtime's kernels took, nearly all of it placed (a few nodes may be the graph's own)."""
    pytest.importorskip("onnxruntime")
    from hrnet_fast.bench.contenders import _export_into

    model = randomize_bn(tiny_pose_hrnet()).eval()
    x = torch.randn(1, 3, 64, 64)
    modules = module_of_values(model, x)
    assert any(path.startswith("stage4.") for path in modules.values())
    ms = ort_module_ms(_export_into(model, x, tmp_path / "m"), x, threads=1, runs=2, modules=modules)
    parts = by_part(ms)
    assert all(parts.get(p, 0) > 0 for p in ("stem", "stage1", "stage2", "stage3", "stage4", "head")), parts
    assert parts.get("other", 0) <= 0.2 * sum(parts.values())
