"""optimize(model): same outputs as the eager model on every HRNet it claims, the input model untouched."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hrnet_fast
from hrnet_fast.fused.conv import FusedConv
from hrnet_fast.fused.hr_module import FusedHRModule
from hrnet_fast.ops.winograd import choose_tile
from hrnet_fast.profile import count_ops, held_bytes
from hrnet_fast.reference import tiny_pose_hrnet

from conftest import POSE_CASES, in_threads, randomize_bn

BACKENDS = [pytest.param("torch"), pytest.param("cpu")]


def _check(model: nn.Module, x: torch.Tensor, backend: str) -> nn.Module:
    """optimize(model) agrees within 1e-4 * max|ref| on every output; returns the fused copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left unfused on these models
        fused = hrnet_fast.optimize(model, backend=backend)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    refs, outs = (ref, out) if isinstance(ref, (list, tuple)) else ([ref], [out])
    assert len(refs) == len(outs)
    for r, o in zip(refs, outs):
        assert o.shape == r.shape
        err = (o - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item(), err
    assert fused.hrnet_fast_skipped == []
    return fused


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_pose_hrnet(backend):
    torch.manual_seed(0)
    fused = _check(randomize_bn(tiny_pose_hrnet()).eval(), torch.randn(2, 3, 64, 64), backend)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, FusedHRModule) for m in fused.modules()) == 3


def test_small_input_whose_lowest_branch_is_1x1():
    """W32 at 32x32: the lowest branch is 1x1, so the fuse layer's stride-2 conv into it adds a residual
    to a 1x1 output, which torch 2.11's oneDNN could not fuse (csrc/cpu/conv_bias_act.cpp)."""
    torch.manual_seed(0)
    _check(randomize_bn(hrnet_fast.pose_hrnet_w32()).eval(), torch.randn(1, 3, 32, 32), "cpu")


@pytest.mark.parametrize("builder,size", POSE_CASES)
def test_pose_hrnet_cpu(builder, size):
    torch.manual_seed(0)
    fused = _check(randomize_bn(builder()).eval(), torch.randn(1, 3, *size), "cpu")
    # every 3x3 stride-1 conv runs Winograd: 2 per BasicBlock, 4 blocks per module branch,
    # 26 module branches; one per stage-1 bottleneck (4); transition1's stride-1 256->C conv
    convs = [m for m in fused.modules() if isinstance(m, FusedConv)]
    winograd = [m for m in convs if m._winograd]
    assert len(winograd) == 26 * 4 * 2 + 4 + 1, len(winograd)
    assert all(tuple(m.weight.shape[2:]) == (3, 3) and m.stride == [1, 1] for m in winograd)
    # the kernel's per-call transform reads the buffer state_dict shows, in place (OIHW): no transformed,
    # panel-major or oneDNN-packed copy is kept beside it
    assert all(m._winograd_weight is m.weight and m.weight.is_contiguous() for m in winograd)
    assert all(m._packed is None for m in winograd)
    assert all(m._winograd_weight is None for m in convs if not m._winograd)


# Teams of 3 to 12 threads on shapes other than the model's own: the scheduling that only more cores use
# (the Winograd plans fitted to the team, branches side by side on shares of the threads by their plans'
# cost, the fusions' and direct convs' splits) on sizes whose tiles, rows and channel panels divide
# unevenly between the threads. Here the threads outnumber the cores: that costs time, not bits.
@pytest.mark.parametrize(
    "builder,threads,batch,size",
    [
        (hrnet_fast.pose_hrnet_w32, 3, 3, (96, 160)),
        (hrnet_fast.pose_hrnet_w32, 6, 2, (224, 64)),
        (hrnet_fast.pose_hrnet_w32, 12, 1, (128, 128)),
        (hrnet_fast.pose_hrnet_w48, 5, 4, (64, 96)),
        (hrnet_fast.pose_hrnet_w48, 7, 1, (160, 96)),
    ],
)
def test_pose_hrnet_cpu_on_odd_teams(builder, threads, batch, size):
    torch.manual_seed(0)
    model = randomize_bn(builder()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(batch, 3, *size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            want = model(x)
            # three forwards: the CPU graph is recorded on a shape's first two and replayed from the third
            for _ in range(3):
                got = fused(x)
                assert got.shape == want.shape
                err = (got - want).abs().max().item()
                assert err <= 1e-4 * want.abs().max().item(), err
    finally:
        torch.set_num_threads(before)


def test_winograd_off_keeps_direct_convolution():
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", winograd=False)
    assert not any(m._winograd for m in fused.modules() if isinstance(m, FusedConv))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_fused_conv_winograd_at_alternating_sizes():
    """A 256-channel 3x3 conv meets 8x6 (F(2x2): few tiles), 32x32 (F(4x4)) and 8x6 again: each call
    transforms the dense weight for its own tile, read in place: nothing derived is kept, every answer
    is right."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(256, 256, 3, 3, generator=g) / 48, torch.randn(256, generator=g)
    conv = FusedConv(w, b, (1, 1), (1, 1), relu=False, backend="cpu")
    conv.pack(use_winograd=True)
    held = held_bytes(conv)
    for size, tile in [((8, 6), 2), ((32, 32), 4), ((8, 6), 2)]:
        x = torch.randn(1, 256, *size, generator=g).contiguous(memory_format=torch.channels_last)
        assert choose_tile(x.shape, 256) == tile
        out = conv(x)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
        assert (out.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    assert held_bytes(conv) == held == (w.numel() + b.numel()) * 4


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kernel,stride,winograd", [(3, 1, True), (3, 2, False), (1, 1, False)])
def test_fused_conv_writes_into_out(backend, kernel, stride, winograd):
    """FusedConv(x, residual, out): the same values as its own output, written into a slice of a larger
    batch (ChunkedStage's last blocks) whichever kernel runs it (Winograd and the torch backend copy
    theirs in), and `out` returned."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(16, 8, kernel, kernel, generator=g) / 9, torch.randn(16, generator=g)
    conv = FusedConv(w, b, (stride, stride), (kernel // 2,) * 2, relu=True, backend=backend)
    if backend == "cpu":
        conv.pack(use_winograd=winograd)
        assert conv._winograd == winograd
    x = torch.randn(2, 8, 12, 10, generator=g).contiguous(memory_format=torch.channels_last)
    shape = conv.output_shape(x.shape)
    residual = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    big = torch.zeros([4, *shape[1:]]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x, residual)
        assert list(expected.shape) == shape
        out = big.narrow(0, 1, 2)
        assert conv(x, residual, out) is out
    assert torch.equal(big[1:3], expected)
    assert not big[0].any() and not big[3].any()


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("hrnet_w18_small", {}),
        ("hrnet_w18_small", {"features_only": True}),
        ("hrnet_w18", {}),
        ("hrnet_w32", {}),
        ("hrnet_w32", {"features_only": True}),
    ],
)
def test_timm_hrnets(name, kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, **kwargs)).eval()
    _check(model, torch.randn(1, 3, 64, 64), "cpu")


def test_input_model_is_untouched():
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        hrnet_fast.optimize(model, backend="cpu")(x)
        after = model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(ref, after)
    assert not any(isinstance(m, FusedConv) for m in model.modules())


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
        hrnet_fast.optimize(tiny_pose_hrnet().train())


class _GeluBlock(nn.Module):
    """Block-shaped but with a GELU: cannot become conv_bias_act(relu) exactly."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.act1 = nn.GELU()

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + x)


def test_unconvertible_module_is_left_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), _GeluBlock()).eval()
    randomize_bn(model)
    with pytest.warns(UserWarning, match="GELU"):
        fused = hrnet_fast.optimize(model, backend="cpu")
    assert [n for n, _ in fused.hrnet_fast_skipped] == ["3"]
    assert isinstance(fused[3], _GeluBlock)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(hrnet_fast.ConversionError, match="GELU"):
        hrnet_fast.optimize(model, backend="cpu", strict=True)


def test_packed_copy_deepcopies_and_still_matches():
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fused = copy.deepcopy(hrnet_fast.optimize(model, backend="cpu"))
    # oneDNN's packed weights are not copied but made again from the dense ones
    assert any(m._winograd for m in fused.modules() if isinstance(m, FusedConv))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu")
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_op_count_is_at_most_a_third_of_eager():
    """W32 256x192: the fused forward launches at most a third of eager's kernels and moves fewer bytes."""
    model = randomize_bn(hrnet_fast.pose_hrnet_w32()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        fused(x)  # the first call at a new input size packs weights for it (once): not part of a forward
    eager, opt = count_ops(model, x), count_ops(fused, x)
    assert opt["ops"] * 3 <= eager["ops"], (eager["ops"], opt["ops"])
    assert opt["bytes"] < eager["bytes"], (eager["bytes"], opt["bytes"])
    assert "aten::native_batch_norm" not in opt["by_op"] and "aten::_native_batch_norm_legit_no_training" not in opt["by_op"]


def test_dtype_casts_weights_and_inputs():
    """dtype=bfloat16 (torch backend on CPU): float32 input accepted, bfloat16 out, close to float32 eager."""
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fused = hrnet_fast.optimize(model, backend="torch", dtype=torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in fused.buffers() if b.is_floating_point())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa; ~30 layers deep the error measured 0.7% of the range
    assert (out.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_cpu_backend_refuses_half_dtype():
    with pytest.raises(ValueError, match="float32 only"):
        hrnet_fast.optimize(tiny_pose_hrnet().eval(), backend="cpu", dtype=torch.float16)


def test_count_ops_by_hand():
    """conv -> relu on known shapes: two kernels, and the bytes of x, w, b, conv out, relu in/out."""
    conv = nn.Conv2d(2, 3, 1)
    x = torch.randn(1, 2, 4, 4)
    res = count_ops(lambda t: torch.relu(conv(t)), x)
    assert res["ops"] == 2, res["by_op"]
    floats = (2 * 16) + (3 * 2) + 3 + (3 * 16) + 2 * (3 * 16)
    assert res["bytes"] == 4 * floats, res


@pytest.mark.triton
def test_triton_backend_tiny():
    """Under TRITON_INTERPRET=1 the whole tiny pose net runs through the Triton kernels on CPU."""
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fused = hrnet_fast.optimize(model, backend="triton")
    assert fused.hrnet_fast_backend == "triton"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


# ---- drop-in details: layout, refusals decided at optimize time ------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_output_layout_follows_eager(backend):
    """NCHW in, NCHW out (fast(x).view(...) works as on eager's output); channels_last in, channels_last out."""
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    fast = hrnet_fast.optimize(model, backend=backend)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            want, got = model(inp), fast(inp)
            assert got.stride() == want.stride(), (got.stride(), want.stride())
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        fast(x).view(2, -1)


def test_cpu_stem_and_head_read_and_write_nchw_themselves():
    """On the cpu backend the stem conv reads the caller's NCHW image and the head writes NCHW heatmaps
    (io_convs): a forward makes no layout copy (no aten copy at all), and any input, NCHW,
    channels_last or neither, gives eager's answer in eager's layout."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval()
    for cpu_graph in (False, True):
        fast = hrnet_fast.optimize(model, backend="cpu", cpu_graph=cpu_graph)
        assert fast.conv1.reads_planar and fast.final_layer.writes_planar
        assert not any(m.reads_planar or m.writes_planar for m in fast.modules()
                       if isinstance(m, FusedConv) and m not in (fast.conv1, fast.final_layer))
        x = torch.randn(2, 3, 64, 96)
        strided = torch.randn(2, 3, 64, 192)[..., ::2]  # neither layout: made channels_last on entry
        with torch.no_grad():
            for _ in range(3):  # the CPU graph records on the second call, replays from the third
                for inp in (x, x.contiguous(memory_format=torch.channels_last), strided):
                    want, got = model(inp), fast(inp)
                    assert got.stride() == want.stride(), (got.stride(), want.stride())
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            if not cpu_graph:
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    fast(x)
                copies = [e.name for e in p.events() if e.name in ("aten::copy_", "aten::contiguous", "aten::clone")]
                assert copies == []


def test_io_convs_are_found_only_where_the_forward_says_so():
    from hrnet_fast.convert import _fx_graph, io_convs

    class TwiceRead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.conv(x) + x.mean())

    class Pair(TwiceRead):
        def forward(self, x):
            y = self.conv(x)
            return self.head(y), y

    class Untraceable(TwiceRead):
        def forward(self, x):
            return self.head(self.conv(x)) if x.sum() > 0 else x

    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    for model, want in ((seq, ("0", "3")), (TwiceRead(), (None, "head")), (Pair(), ("conv", None)),
                        (Untraceable(), (None, None))):
        assert io_convs(model, _fx_graph(model)) == want, type(model).__name__


def test_refuses_a_submodule_in_training_mode():
    model = tiny_pose_hrnet().eval()
    model.stage2.train()
    with pytest.raises(ValueError, match=r"stage2.* is in training mode"):
        hrnet_fast.optimize(model)


def test_refuses_an_optimized_model():
    fast = hrnet_fast.optimize(tiny_pose_hrnet().eval(), backend="cpu")
    with pytest.raises(ValueError, match="already an optimize"):
        hrnet_fast.optimize(fast, backend="torch")


def test_float64_model_runs_on_the_reference_backend():
    torch.manual_seed(0)
    model = randomize_bn(tiny_pose_hrnet()).eval().double()
    fast = hrnet_fast.optimize(model)
    assert fast.hrnet_fast_backend == "torch"
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cpu backend runs float32 only"):
        hrnet_fast.optimize(model, backend="cpu")


def test_cuda_graph_needs_a_cuda_model():
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        hrnet_fast.optimize(tiny_pose_hrnet().eval(), cuda_graph=True)


def test_streams_need_a_cuda_model():
    with pytest.raises(ValueError, match="streams=True runs branches on parallel CUDA streams, so it needs a model on a CUDA"):
        hrnet_fast.optimize(tiny_pose_hrnet().eval(), streams=True)


def test_model_whose_train_returns_none():
    """MMPose's backbone overrides train() without returning self: optimize must not chain .eval()."""

    class NoneTrain(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_pose_hrnet()

        def forward(self, x):
            return self.net(x)

        def train(self, mode=True):
            super().train(mode)

    torch.manual_seed(0)
    model = NoneTrain()
    randomize_bn(model)
    model.eval()
    fast = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


# ---- weights that change after optimize(): derived weights must follow -------------------------


def _pair(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(tiny_pose_hrnet(), seed=seed).eval()


def test_load_state_dict_takes_effect():
    """FB = optimize(MB); FB(x); FB.load_state_dict(optimize(MA).state_dict()) must then compute MA."""
    ma, mb = _pair(0), _pair(1)
    fb = hrnet_fast.optimize(mb, backend="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fb(x)  # builds the per-shape and Winograd caches from MB's weights
        fb.load_state_dict(hrnet_fast.optimize(ma, backend="cpu").state_dict())
        torch.testing.assert_close(fb(x), ma(x), rtol=1e-4, atol=1e-4)


def test_in_place_weight_edits_take_effect():
    """An in-place edit of a Winograd conv (whose kernel reads the buffer in place), of a oneDNN-packed
    conv and of a 1x1 conv (our kernel, the dense weight) is seen by the next call."""
    model = _pair(2)
    fast = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(1, 3, 64, 64)
    winograd_conv = fast.stage2[0].branches[0][0].convs[0]
    assert winograd_conv._winograd and winograd_conv._winograd_weight is winograd_conv.weight
    with torch.no_grad():
        fast(x)
        model.stage2[0].branches[0][0].conv1.weight.zero_()
        winograd_conv.weight.zero_()
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        assert fast.transition1[1][0]._packed  # stride 2: oneDNN, packed per input shape
        model.transition1[1][0][0].weight.zero_()
        fast.transition1[1][0].weight.zero_()
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
        fast.final_layer.weight.zero_()  # a 1x1 conv: out == its bias
        out = fast(x)
    torch.testing.assert_close(out, fast.final_layer.bias.view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)


def test_a_cast_optimized_model_says_what_to_do():
    fast = hrnet_fast.optimize(_pair(3), backend="cpu").double()
    with pytest.raises(RuntimeError, match="optimize the torch.float64 model itself"):
        fast(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    fast = hrnet_fast.optimize(_pair(3), backend="cpu")
    with pytest.raises(ValueError, match=r"expected a 4-D input \[N, C, H, W\], got shape \(3, 64, 64\)"):
        fast(torch.randn(3, 64, 64))


def test_threads_sharing_a_model_with_different_input_shapes():
    """Serving threads meet new shapes at once: no 'dictionary changed size', the cache stays bounded."""
    import sys

    model = _pair(4)
    fast = hrnet_fast.optimize(model, backend="cpu", winograd=False)
    sizes = [(32 + 32 * (k % 6), 64) for k in range(12)]
    inputs = {s: torch.randn(1, 3, *s) for s in sizes}
    with torch.no_grad():
        want = {s: model(x) for s, x in inputs.items()}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def work(k: int) -> None:
            with torch.no_grad():
                for s in sizes[k:] + sizes[:k]:
                    torch.testing.assert_close(fast(inputs[s]), want[s], rtol=1e-4, atol=1e-4)

        in_threads(work, 6)
    finally:
        sys.setswitchinterval(interval)
    assert all(len(m._packed) <= 4 for m in fast.modules() if isinstance(m, FusedConv) and m._packed is not None)


def test_gradients_through_the_cpu_backend_are_refused_clearly():
    fast = hrnet_fast.optimize(_pair(5), backend="cpu")
    with pytest.raises(RuntimeError, match=r"runs inference only .* torch.no_grad\(\) .* backend='torch'"):
        fast(torch.randn(1, 3, 64, 64, requires_grad=True))
    model = _pair(5)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    hrnet_fast.optimize(model, backend="torch")(x).sum().backward()  # the way to differentiate works
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend,winograd", [("torch", False), ("cpu", False), ("cpu", True)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_input_pixel_reaches_the_output_as_in_eager(backend, winograd, value):
    """One bad pixel: eager's output is non-finite wherever that pixel reaches; so is ours."""
    model = _pair(6)
    fast = hrnet_fast.optimize(model, backend=backend, winograd=winograd)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    x[0, 1, 30, 17] = value
    with torch.no_grad():
        want, got = model(x), fast(x)
    bad = ~torch.isfinite(want)
    assert bad.any()
    assert not (bad & torch.isfinite(got)).any(), f"{int((bad & torch.isfinite(got)).sum())} outputs hid a non-finite value"
    torch.testing.assert_close(got[~bad], want[~bad], rtol=1e-4, atol=1e-4)


def test_sizes_eager_cannot_run_give_the_nearest_by_size_answer():
    """250x190: eager's Upsample(scale_factor=2) makes 64 rows where 63 are needed and fails; the
    optimized model upsamples to the exact size, i.e. the reference with interpolate(size=...)."""
    model = _pair(7)
    fast = hrnet_fast.optimize(model, backend="cpu")
    x = torch.randn(1, 3, 250, 190)
    with torch.no_grad(), pytest.raises(RuntimeError, match="must match"):
        model(x)
    for m in model.modules():  # the same model, with upsampling by size instead of by factor
        if isinstance(m, nn.Upsample):
            m.scale_factor, m.size = None, None
            m.forward = lambda t, m=m: torch.nn.functional.interpolate(t, size=m._target, mode="nearest")
    def set_targets(module, args):
        # each HR module's fuse layer j>i upsamples to branch i's size: record it on the Upsample
        xs = args[0]
        for i, row in enumerate(module.fuse_layers or []):
            for j, f in enumerate(row):
                if j > i:
                    f[2]._target = xs[i].shape[-2:]

    hooks = [m.register_forward_pre_hook(set_targets) for m in model.modules() if hasattr(m, "fuse_layers")]
    with torch.no_grad():
        want = model(x)
        got = fast(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cpu_conv_given_nchw_between_fused_modules_runs_channels_last():
    """An NCHW tensor made by code between the fused modules (as OCRNet's attention block makes one) goes
    to channels_last before the conv: our direct kernel runs it, not oneDNN with its copies in and out
    of its layout, and the next conv reads the channels_last output as it is. Outputs as eager's."""

    class Planar(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32))
            self.c = nn.Conv2d(32, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x).contiguous()) + 1)  # .contiguous(): NCHW, whatever a gave

    model = randomize_bn(Planar()).eval()
    fused = hrnet_fast.optimize(model, backend="cpu", cpu_graph=False, strict=True)
    x = torch.randn(2, 3, 12, 10)
    seen = []
    hook = fused.b.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        ref, out = model(x), fused(x)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fused(x)
    hook.remove()
    assert not seen[0][0].is_contiguous(memory_format=torch.channels_last)  # b was given NCHW
    assert seen[0][1].is_contiguous(memory_format=torch.channels_last)
    assert not any("mkldnn::_convolution_pointwise" in e.name for e in p.events())
    assert out.shape == ref.shape and out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
