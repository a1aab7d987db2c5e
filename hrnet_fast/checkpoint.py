"""load_checkpoint: the checkpoint formats people have, strict by default, every mismatch named.

Formats: a plain state dict; one under "state_dict" or "model"; "module."-prefixed (DataParallel /
DDP); and the official segmentation trainer's (HRNet-Semantic-Segmentation tools/train.py saves
`FullModel(model, loss).state_dict()` as best.pth / final_state.pth, and under "state_dict" in
checkpoint.pth.tar): keys "model.<key>", plus the loss's buffers "loss.<key>" (the class weights
`loss.criterion.weight` where the loss has them), which are set aside as not part of the model.

The official loader's `load_state_dict(..., strict=False)` silently drops what does not match; here a
mismatch raises one error that lists the missing, unexpected and wrongly shaped keys.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch
from torch import nn

_SHOWN = 5  # keys listed per kind; the counts say how many more


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model's."""


@dataclass
class LoadReport:
    """What load_checkpoint did: keys loaded, and what it skipped (only with strict=False)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (key, why its tensor cannot be copied)
    # the official seg trainer's FullModel loss buffers ("loss.*"): in the file, not part of the model
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.unusable)

    def describe(self) -> str:
        def listing(kind: str, items: list[str]) -> str:
            more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            return f"{len(items)} {kind}: {', '.join(items[:_SHOWN])}{more}"

        parts = []
        if self.missing:
            parts.append(listing("missing from the checkpoint", self.missing))
        if self.unexpected:
            parts.append(listing("unexpected in the checkpoint", self.unexpected))
        if self.mismatched:
            shapes = [f"{k} (model {list(m)}, checkpoint {list(c)})" for k, m, c in self.mismatched]
            parts.append(listing("with the wrong shape", shapes))
        if self.unusable:
            parts.append(listing("that cannot be loaded", [f"{k} ({why})" for k, why in self.unusable]))
        return "; ".join(parts)


def _extract_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside `obj`: itself, or under "state_dict" / "model"; "module." prefixes dropped."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{where} holds a {type(obj).__name__}, not a state dict")
    # where a state dict may be: under "state_dict", under "model", or the object itself (first with tensors)
    places = [(f"{where}[{k!r}]", obj[k]) for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
    places.append((where, obj))
    tensors: dict[str, torch.Tensor] = {}
    for _, place in places:
        tensors = {k: v for k, v in place.items() if isinstance(v, torch.Tensor)}
        if tensors:
            break
    if not tensors:
        looked = "; ".join(f"{name} has keys {', '.join(map(repr, list(p)[:_SHOWN])) or 'none'}" for name, p in places)
        raise CheckpointMismatchError(
            f"{where} has no tensors: expected a state dict, or a dict holding one under 'state_dict' or 'model' ({looked})"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _unwrap_full_model(state: dict[str, torch.Tensor], own: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The official segmentation trainer's FullModel(model, loss) state dict: "model.<key>" for the
    model, "loss.<key>" for the loss's buffers. Returns the model's keys without the prefix and the
    loss keys set aside; anything else (or a model whose own keys start so) is returned as it is."""
    if any(k.startswith(("model.", "loss.")) for k in own):
        return state, []
    if not any(k.startswith("model.") for k in state) or not all(k.startswith(("model.", "loss.")) for k in state):
        return state, []
    return (
        {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
        [k for k in state if k.startswith("loss.")],
    )


def _unusable(v: torch.Tensor, target: torch.Tensor) -> str | None:
    """Why tensor `v` cannot be copied into `target`, or None when it can."""
    if v.layout != torch.strided:
        return f"a {str(v.layout).removeprefix('torch.')} tensor, not a dense one"
    if v.device.type == "meta":
        return "a meta tensor: it holds no values"
    if v.is_quantized:
        return "a quantized tensor"
    if target.is_floating_point() and not (v.is_floating_point() or v.dtype in (torch.int64, torch.int32)):
        return f"dtype {v.dtype} for a {target.dtype} tensor"
    return None


def load_checkpoint(model: nn.Module, source: str | PathLike | Mapping[str, Any], strict: bool = True) -> LoadReport:
    """Load `source` (a path, or a state dict) into `model`; returns a LoadReport.

    strict=True (default): any missing, unexpected or wrongly shaped key raises CheckpointMismatchError
    listing them, and nothing is loaded. strict=False loads what matches, warns about the rest, and the
    report lists it. The loss buffers of an official segmentation training checkpoint ("loss.*" beside
    "model.*") are not model weights: they are skipped in either mode and listed in `report.ignored`.
    """
    if isinstance(source, (str, PathLike)):
        where = f"checkpoint {str(source)!r}"
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # not a torch file, or pickled objects weights_only refuses
            raise CheckpointMismatchError(
                f"{where} could not be read as a PyTorch checkpoint ({type(e).__name__}: {str(e).strip() or 'no details'})"
            ) from e
    else:
        where, obj = "the given state dict", source
    state = _extract_state_dict(obj, where)

    own = model.state_dict()
    state, ignored = _unwrap_full_model(state, own)
    report = LoadReport(
        # older checkpoints have no BatchNorm num_batches_tracked, which torch's strict load accepts too
        missing=[k for k in own if k not in state and not k.endswith(".num_batches_tracked")],
        unexpected=[k for k in state if k not in own],
        ignored=ignored,
    )
    # everything is checked before anything is copied: an error leaves the model as it was
    for k, v in state.items():
        if k not in own:
            continue
        why = _unusable(v, own[k])
        if why is not None:
            report.unusable.append((k, why))
        elif v.shape != own[k].shape:
            report.mismatched.append((k, tuple(own[k].shape), tuple(v.shape)))
        else:
            report.loaded.append(k)
    if not report.ok:
        message = f"{where} does not match {type(model).__name__}: {report.describe()}"
        if strict:
            raise CheckpointMismatchError(message)
        warnings.warn(message + "; loaded the rest (strict=False)", stacklevel=2)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
