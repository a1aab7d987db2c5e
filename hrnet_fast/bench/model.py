"""The model a benchmark runs: built from a name or an official YAML (pose or segmentation), with seeded
random weights and BN stats."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# name -> (builder call, default input (H, W)): the pose nets at their COCO size, HRNetV2-W48 at the
# Cityscapes crop its official config trains on (align_corners=False, as that config sets)
PRESETS: dict[str, tuple[str, dict, tuple[int, int]]] = {
    "w32": ("pose_hrnet_w32", {}, (256, 192)),
    "w48": ("pose_hrnet_w48", {}, (256, 192)),
    "seg_w48": ("seg_hrnet_w48", {"align_corners": False}, (512, 1024)),
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")


class BenchError(Exception):
    """A bad argument or missing piece the user can fix; the CLI prints it as one line (exit code 2)."""


@dataclass
class ModelSpec:
    """What --model named: a short tag for file names, the builder's description, a default (H, W)."""

    tag: str
    source: str
    default_size: tuple[int, int]


def parse_input_size(text: str) -> tuple[int, int]:
    """'256x192' (H x W) -> (256, 192); raises BenchError for anything else."""
    m = _SIZE_RE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise BenchError(f"--input-size must be HEIGHTxWIDTH with positive integers, e.g. 256x192; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _is_seg_config(cfg: dict) -> bool:
    """An official segmentation experiment (HRNet-Semantic-Segmentation: MODEL.NAME seg_hrnet)."""
    return "seg" in str(cfg["MODEL"].get("NAME", "")).lower()


def resolve_model(spec: str) -> ModelSpec:
    """Check --model (a preset name, or an existing pose or segmentation .yaml/.yml path) without building anything."""
    if spec in PRESETS:
        name, kwargs, size = PRESETS[spec]
        return ModelSpec(spec, f"hrnet_fast.{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})", size)
    path = Path(spec)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise BenchError(f"unknown --model {spec!r}: expected one of {', '.join(PRESETS)} or a path to an official-format .yaml")
    if not path.is_file():
        raise BenchError(f"--model {spec!r}: no such file")
    cfg = _read_yaml(path, spec)
    tag = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.stem)
    if _is_seg_config(cfg):
        size = (cfg.get("TRAIN") or {}).get("IMAGE_SIZE") or [1024, 512]  # official order is [W, H]
        return ModelSpec(tag, f"hrnet_fast.get_seg_model({str(path)!r})", (int(size[1]), int(size[0])))
    size = cfg["MODEL"].get("IMAGE_SIZE") or [192, 256]  # official order is [W, H]
    return ModelSpec(tag, f"hrnet_fast.get_pose_net({str(path)!r})", (int(size[1]), int(size[0])))


def _read_yaml(path: Path, spec: str) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise BenchError(f"--model {spec!r}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("MODEL"), dict):
        raise BenchError(f"--model {spec!r}: not an official HRNet config (no MODEL section)")
    return cfg


def build_model(spec: str) -> nn.Module:
    """The reference HRNet for --model, in eval mode, from hrnet_fast's public builders."""
    import hrnet_fast

    if spec in PRESETS:
        name, kwargs, _ = PRESETS[spec]
        model = getattr(hrnet_fast, name)(**kwargs)
    elif _is_seg_config(_read_yaml(Path(spec), spec)):
        model = hrnet_fast.get_seg_model(spec)
    else:
        model = hrnet_fast.get_pose_net(spec)
    return model.eval()


@torch.no_grad()
def randomize(model: nn.Module, size: tuple[int, int], seed: int = 0) -> nn.Module:
    """Seeded random weights and BN statistics, so outputs are non-trivial and reproducible.

    Convs get He-normal weights (the official init's std=0.001 would shrink the heatmaps to ~0);
    BN running stats are measured on one random batch, then perturbed, so every layer stays in a
    sane range while folding BN still has real work to do. The caller's global RNG is untouched.
    The calibration batch runs on one thread, so the statistics, and so the model, are the same bits at
    every thread count (a reduction split between threads rounds differently): the thread-scaling table
    times one model, and an exported ONNX file of it can be reused (`--onnx-cache`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.1)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(bn.momentum, bn.training) for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
            bn.train()
        device = next(model.parameters()).device
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model(torch.randn(2, 3, *size, device=device))
        finally:
            torch.set_num_threads(threads)
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
            bn.running_mean += 0.1 * torch.randn_like(bn.running_mean)
            bn.running_var *= torch.empty_like(bn.running_var).uniform_(0.8, 1.25)
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(std=0.1)
    return model.eval()
