"""mmsegmentation's FCNHead as its HRNetV2 configs build it, run as a FusedSegHead.

mmseg's `fcn_hr18` / `fcn_hr48` configs give the segmentor a decode head that is HRNetV2's head written
another way: `resize_concat` (each selected branch resized bilinearly to the first one's size, then
concatenated), one ConvModule (1x1 conv, BN, ReLU), dropout (nothing in eval mode), `conv_seg` (1x1). So
`optimize` gives such a head a FusedSegHead (hrnet_fast/fused/seg_head.py: no resized branch, no
concatenation, and on the cpu backend not even the sum's channels written) and a forward that calls it
(MMSegHeadForward), after a probe shows the decomposition reproduces the head's own forward; its ConvModule
and conv_seg go (their weights live folded in the FusedSegHead). The head's other methods (predict,
predict_by_feat) call its forward, so the segmentor's `predict` runs the fused head too.

The branches' channels, which the head keeps only as their sum, are read off one probe forward of the model.
On the backends that run channels_last, a segmentor's last decode head returns its logits in eager's
layout (EagerLayoutForward): `mode="predict"` hands them back inside SegDataSamples, where the optimized
forward's own layout restoring does not reach.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from hrnet_fast.fused.blocks import conv_module_parts
from hrnet_fast.fused.conv import planar_output
from hrnet_fast.fused.hr_module import PROBE_RTOL, probe_error
from hrnet_fast.fused.seg_head import FusedSegHead, head_reference, why_not_seg_head

# The class, by module and name (mmseg is not imported here; a subclass may do anything in its forward).
MMSEG_FCN_HEADS = frozenset({("mmseg.models.decode_heads.fcn_head", "FCNHead")})
# what a head of the HRNetV2 form that is not fused keeps (its ConvModule is still folded)
_KEPT = "decode head keeps its resize, concatenation and convs"


def is_mmseg_fcn_head(m: nn.Module) -> bool:
    return (type(m).__module__, type(m).__qualname__) in MMSEG_FCN_HEADS


def head_layers(head: nn.Module) -> nn.Sequential | str:
    """Sequential(conv, BN, ReLU, conv_seg) of an FCNHead in the HRNetV2 form, or why it is not in it."""
    if head.input_transform != "resize_concat" or getattr(head, "concat_input", True) or getattr(head, "num_convs", 0) != 1:
        return "not the HRNetV2 form (input_transform='resize_concat', num_convs=1, concat_input=False)"
    if head.dropout is not None and not isinstance(head.dropout, (nn.Dropout, nn.Dropout2d)):
        return f"its dropout is a {type(head.dropout).__name__}"
    parts = conv_module_parts(head.convs[0])
    if parts is None or parts[1] is None or not parts[2]:
        return "its conv is not a ConvModule of a conv, a BatchNorm and a ReLU, in that order"
    conv, bn, _ = parts
    layers = nn.Sequential(conv, bn, nn.ReLU(), head.conv_seg)
    why = why_not_seg_head(layers)
    return layers if why is None else why


class MMSegHeadForward:
    """The forward of a converted FCNHead: its selected branches into its FusedSegHead. A plain picklable
    object (not a bound method) holding the head."""

    def __init__(self, head: nn.Module):
        self.head = head

    def __call__(self, inputs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.head.hrnet_fast_head(_branches(self.head, inputs))


def _branches(head: nn.Module, inputs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The head's selected inputs, the first resized to its own size as mmseg does: the same size, but a
    bilinear blend, which turns an inf into NaN; done the same way, so the NaNs are eager's (a few MB)."""
    x = [inputs[i] for i in head.in_index]
    x[0] = F.interpolate(x[0], size=x[0].shape[2:], mode="bilinear", align_corners=head.align_corners)
    return x


class EagerLayoutForward:
    """The forward of a segmentor's last decode head, whose output is the logits: made NCHW where the
    caller passed NCHW or called no optimized forward (`segmentor.predict(x)` calls the head's forward
    itself), as eager gives them for an NCHW image. The optimized model runs channels_last, and its
    forward can put back the layout of the tensors it returns only: `mode="predict"` returns them inside
    SegDataSamples, resized by the head's own predict_by_feat."""

    def __init__(self, head: nn.Module, forward: object | None):
        self.head, self.forward = head, forward

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        out = (self.forward or type(self.head).forward.__get__(self.head))(*args, **kwargs)
        if getattr(planar_output, "on", None) is False or not isinstance(out, torch.Tensor):
            return out  # the caller passed channels_last: eager's logits would be too
        return out.contiguous()


def keep_eager_logits_layout(model: nn.Module) -> None:
    """Give each mmseg segmentor in `model` an EagerLayoutForward on its last decode head (in place)."""
    for m in model.modules():
        if not type(m).__module__.startswith("mmseg.models.segmentors") or not hasattr(m, "decode_head"):
            continue
        last = m.decode_head[-1] if isinstance(m.decode_head, nn.ModuleList) else m.decode_head
        if not isinstance(last.__dict__.get("forward"), EagerLayoutForward):
            last.forward = EagerLayoutForward(last, last.__dict__.get("forward"))


def _inputs_reproduced(head: nn.Module, layers: nn.Sequential, shapes: list[torch.Size]) -> str | None:
    """None where resize + FusedSegHead's decomposition (head_reference on the identity-resized first
    branch) reproduces the head's own forward on random inputs of `shapes`, else why not."""
    param = next(head.parameters())
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*s, generator=g).to(device=param.device, dtype=param.dtype) for s in shapes]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head's own
        ref = head(inputs)
        out = head_reference(layers, _branches(head, inputs), head.align_corners)
    if not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
        return "its forward does not return what resize + concat + ConvModule + conv_seg give"
    err = probe_error(out, ref)
    return None if err <= PROBE_RTOL else f"resize + concat + ConvModule + conv_seg is {err:.1e} from its forward"


def convert_mmseg_heads(model: nn.Module, backend: str) -> list[tuple[str, str]]:
    """Every FCNHead of `model` in the HRNetV2 form as a FusedSegHead on `backend` (in place); returns
    (name, why) for those of that form left as they are (their ConvModules then folded like any others).
    One probe forward of `model` (a 1x3x70x90 image) finds their inputs' shapes."""
    heads = {name: m for name, m in model.named_modules() if is_mmseg_fcn_head(m)}
    if not heads:
        return []
    # a head in another form is no HRNetV2 head: the converter folds its ConvModules like any others
    skipped: list[tuple[str, str]] = []
    layers = {name: found for name, head in heads.items() if not isinstance(found := head_layers(head), str)}
    if not layers:
        return []
    # mmseg's segmentors call decode_head.forward(x) itself, which no hook sees: an instance attribute
    # forward does, for the probe's one call
    shapes: dict[str, list[torch.Size]] = {}

    def recording(name: str, forward):  # noqa: ANN001, ANN202
        def record(inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            shapes.setdefault(name, [t.shape for t in inputs])
            return forward(inputs, *args, **kwargs)
        return record

    own = {n: heads[n].__dict__.get("forward") for n in layers}  # an instance's own forward, kept
    for n in layers:
        heads[n].forward = recording(n, heads[n].forward)
    param = next(model.parameters())
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the model's own (mmseg's resize warns about align_corners=True)
            model(torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype))
    except Exception as e:  # noqa: BLE001 - any model that does not run on an image is left as it is
        return [(n, f"{_KEPT}: a 1x3x70x90 probe of the model failed: {type(e).__name__}: {e}") for n in layers]
    finally:
        for n in layers:
            if own[n] is None:
                del heads[n].forward  # the class's again
            else:
                heads[n].forward = own[n]
    for name, seq in layers.items():
        head = heads[name]
        why = "the probe forward did not reach it" if name not in shapes else _inputs_reproduced(head, seq, shapes[name])
        if why is not None:
            skipped.append((name, f"{_KEPT}: {why}"))
            continue
        channels = [shapes[name][i][1] for i in head.in_index]
        head.hrnet_fast_head = FusedSegHead(seq, channels, head.align_corners, backend)
        del head.convs, head.conv_seg
        head.dropout = None  # nothing in eval mode, and nothing reads it now
        head.forward = MMSegHeadForward(head)
    return skipped
