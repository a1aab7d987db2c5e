"""CPU graphs (hrnet_fast/cpu_graphs.py, csrc/cpu/cpu_graph.cpp): a replayed forward gives the Python
forward's bits for any input, follows weight changes, and is refused wherever it could differ."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hrnet_fast
from hrnet_fast.cpu_graphs import CPUGraphForward
from hrnet_fast.reference import tiny_pose_hrnet, tiny_seg_hrnet

from conftest import in_threads, randomize_bn

X = (2, 3, 64, 64)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(tiny_pose_hrnet(), seed=seed).eval()


def _status(fast: nn.Module) -> str:
    (state,) = fast.forward.status().values()
    return state


def _warm(fast: nn.Module, x: torch.Tensor) -> None:
    """Call until the shape replays (two recordings in a row agree: a first call packs weights)."""
    with torch.no_grad():
        for _ in range(3):
            fast(x)
    assert _status(fast).startswith("replaying"), fast.forward.status()


def _same(a, b) -> None:
    for x, y in zip(a, b) if isinstance(a, (list, tuple)) else [(a, b)]:
        assert x.shape == y.shape and x.stride() == y.stride()
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def _models():
    import timm

    torch.manual_seed(0)
    return [
        ("tiny_pose", _tiny(), X),
        ("tiny_seg", randomize_bn(tiny_seg_hrnet()).eval(), (1, 3, 64, 128)),
        ("w32", randomize_bn(hrnet_fast.pose_hrnet_w32()).eval(), (1, 3, 96, 64)),
        ("timm_features", randomize_bn(timm.create_model("hrnet_w18_small", features_only=True)).eval(), (2, 3, 64, 64)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["tiny_pose", "tiny_seg", "w32", "timm_features"])
def test_replay_gives_the_python_forwards_bits_for_new_inputs(index):
    _, model, shape = _models()[index]
    fast = hrnet_fast.optimize(model, backend="cpu")
    plain = hrnet_fast.optimize(model, backend="cpu", cpu_graph=False)
    assert isinstance(fast.forward, CPUGraphForward) and not isinstance(plain.forward, CPUGraphForward)
    _warm(fast, torch.randn(*shape))
    with torch.no_grad():
        for seed in range(3):  # values the recordings never saw: nothing of theirs is frozen in the graph
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + seed))
            _same(fast(x), plain(x))
        out = fast(x)
        ref = model(x)
    for o, r in zip(out, ref) if isinstance(out, (list, tuple)) else [(out, ref)]:
        assert (o - r).abs().max() <= 1e-4 * r.abs().max()


def test_nan_and_inf_inputs_replay_as_the_python_forward():
    model = _tiny()
    fast, plain = hrnet_fast.optimize(model, backend="cpu"), hrnet_fast.optimize(model, backend="cpu", cpu_graph=False)
    _warm(fast, torch.randn(*X))
    x = torch.randn(*X)
    x[0, 1, 10, 20], x[1, 0, 40, 3] = float("nan"), float("inf")
    with torch.no_grad():
        out = fast(x)
        _same(out, plain(x))
    assert out.isnan().any()


def test_each_shape_has_its_graph_and_nchw_comes_back_nchw():
    fast = hrnet_fast.optimize(_tiny(), backend="cpu")
    plain = hrnet_fast.optimize(_tiny(), backend="cpu", cpu_graph=False)
    shapes = [(1, 3, 64, 64), (2, 3, 96, 64), (1, 3, 64, 64)]
    with torch.no_grad():
        for _ in range(3):
            for s in shapes:
                fast(torch.randn(*s))
        assert fast.forward.num_graphs == 2
        for s in shapes:
            x = torch.randn(*s)
            out = fast(x)
            assert out.is_contiguous()  # eager's layout for an NCHW input
            _same(out, plain(x))
        xl = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
        for _ in range(3):
            out = fast(xl)
        _same(out, plain(xl))
    # a channels_last input has a graph of its own: an NCHW one's stem reads the image's planes and its
    # head writes NCHW (hrnet_fast.convert.io_convs)
    assert fast.forward.num_graphs == 3


def test_load_state_dict_reaches_a_replaying_model():
    ma, mb = _tiny(0), _tiny(1)
    fb = hrnet_fast.optimize(mb, backend="cpu")
    x = torch.randn(*X)
    _warm(fb, x)
    with torch.no_grad():
        fb.load_state_dict(hrnet_fast.optimize(ma, backend="cpu").state_dict())
        torch.testing.assert_close(fb(x), ma(x), rtol=1e-4, atol=1e-4)
        assert _status(fb) == "recording"  # the packed 1x1 weights were derived from the old ones
        for _ in range(3):
            out = fb(x)
        torch.testing.assert_close(out, ma(x), rtol=1e-4, atol=1e-4)
    assert _status(fb).startswith("replaying")


def test_in_place_edit_of_a_packed_conv_reaches_the_replay():
    fast = hrnet_fast.optimize(_tiny(2), backend="cpu")
    x = torch.randn(*X)
    _warm(fast, x)
    with torch.no_grad():
        fast.final_layer.weight.zero_()  # a 1x1 conv (oneDNN, packed per input shape): out == its bias
        out = fast(x)
    torch.testing.assert_close(out, fast.final_layer.bias.view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)


def test_in_place_edit_of_a_winograd_conv_reaches_the_replay():
    """The replay's Winograd kernel reads the weight state_dict shows, in place (OIHW): editing it in
    place changes the next replay's output as it changes the Python forward's."""
    fast = hrnet_fast.optimize(_tiny(4), backend="cpu")
    plain = hrnet_fast.optimize(_tiny(4), backend="cpu", cpu_graph=False)
    x = torch.randn(*X)
    _warm(fast, x)
    conv, same_in_plain = fast.stage2[0].branches[1][0].convs[0], plain.stage2[0].branches[1][0].convs[0]
    assert conv._winograd and conv._winograd_weight is conv.weight and conv.weight.is_contiguous()
    with torch.no_grad():
        before = fast(x)
        for c in (conv, same_in_plain):
            c.weight.mul_(-0.5)
        after = fast(x)
        _same(after, plain(x))
    assert not torch.equal(after, before)
    assert conv._winograd_weight is conv.weight


def test_a_recording_ending_after_the_shape_replays_leaves_its_graph():
    """Threads sharing a model may record one shape at once: a recording that ends after the others
    agreed (here one that could not be graphed, as a submodule had a hook while it ran) must not take
    the graph that other threads now replay without the lock (it did: 'NoneType' has no attribute 'run',
    test_optimize's serving threads, 1 run in 6)."""
    fast = hrnet_fast.optimize(_tiny(5), backend="cpu")
    x = torch.randn(*X)
    _warm(fast, x)
    handle = fast.final_layer.register_forward_hook(lambda *_: None)
    with torch.no_grad():
        fast.forward._record(fast.forward._key((x,)), (x,))  # as a thread that began before the agreement
    handle.remove()
    assert _status(fast).startswith("replaying")
    with torch.no_grad():
        _same(fast(x), hrnet_fast.optimize(_tiny(5), backend="cpu", cpu_graph=False)(x))


def test_a_replaced_tensor_or_module_reaches_the_replay():
    fast = hrnet_fast.optimize(_tiny(3), backend="cpu")
    plain = hrnet_fast.optimize(_tiny(3), backend="cpu", cpu_graph=False)
    x = torch.randn(*X)
    _warm(fast, x)
    with torch.no_grad():
        before = fast(x)
        fast.final_layer.bias = fast.final_layer.bias + 1.0  # a new tensor object, set as the buffer
        torch.testing.assert_close(fast(x), before + 1.0, rtol=1e-5, atol=1e-5)
        _warm(fast, x)
        fast.final_layer = plain.final_layer = nn.Identity()  # a submodule replaced
        out = fast(x)
        _same(out, plain(x))
    assert out.shape != before.shape


def test_modules_built_elsewhere_leave_the_graphs_alone():
    fast = hrnet_fast.optimize(_tiny(3), backend="cpu")
    x = torch.randn(*X)
    _warm(fast, x)
    other = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))  # registers modules, parameters, buffers
    other.register_buffer("extra", torch.zeros(1))
    assert _status(fast).startswith("replaying")
    with torch.no_grad():
        fast(x)
    assert _status(fast).startswith("replaying")
    new_head = nn.Conv2d(fast.final_layer.weight.shape[1], 5, 1)  # set into the model, then given a new weight
    fast.final_layer = new_head
    _warm(fast, x)
    new_head.weight = nn.Parameter(torch.zeros_like(new_head.weight))
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, new_head.bias.detach().view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)


def test_a_cast_model_runs_its_python_forward():
    fast = hrnet_fast.optimize(_tiny(3), backend="cpu")
    _warm(fast, torch.randn(*X))
    fast.double()
    with pytest.raises(RuntimeError, match="optimize the torch.float64 model itself"):
        with torch.no_grad():
            fast(torch.randn(*X))


class _Wrapper(nn.Module):
    """An HRNet with something around it that a graph cannot replay (or can)."""

    def __init__(self, inner: nn.Module, extra: str) -> None:
        super().__init__()
        self.inner, self.extra = inner, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.extra == "item":  # Python branches on a value
            return out * 2 if out.mean().item() > 0 else out - 1
        if self.extra == "numpy":  # a tensor made per call outside the dispatcher's view
            return out + torch.from_numpy(np.full((1,), float(x.shape[0]), dtype=np.float32))
        if self.extra == "random":
            return out + torch.rand_like(out)
        return out.clamp(min=-1.0)


@pytest.mark.parametrize(
    "extra,why",
    [
        ("item", r"returns a \w+ \(the Python that called it may branch on it\)"),
        ("numpy", "recordings of its forward never agreed"),
        ("random", "draws random numbers"),
    ],
)
def test_forwards_a_replay_could_get_wrong_stay_in_python(extra, why):
    fast = hrnet_fast.optimize(_Wrapper(_tiny(4), extra).eval(), backend="cpu")
    plain = hrnet_fast.optimize(_Wrapper(_tiny(4), extra).eval(), backend="cpu", cpu_graph=False)
    with torch.no_grad():
        for sign in (1, -1, 1, -1, 1):
            x = sign * torch.randn(*X)
            out = fast(x)
            if extra != "random":
                _same(out, plain(x))
    assert _status(fast) != "recording" and not _status(fast).startswith("replaying")
    assert __import__("re").search(why, _status(fast)), _status(fast)


def test_plain_ops_around_the_model_replay():
    fast = hrnet_fast.optimize(_Wrapper(_tiny(4), "clamp").eval(), backend="cpu")
    plain = hrnet_fast.optimize(_Wrapper(_tiny(4), "clamp").eval(), backend="cpu", cpu_graph=False)
    _warm(fast, torch.randn(*X))
    assert "aten::clamp" in fast.forward._graphs[next(iter(fast.forward._graphs))].graph.ops()
    x = torch.randn(*X)
    with torch.no_grad():
        _same(fast(x), plain(x))


def test_hooks_keep_the_python_forward():
    fast = hrnet_fast.optimize(_tiny(5), backend="cpu")
    calls = []
    fast.stage2.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        for _ in range(4):
            fast(torch.randn(*X))
    assert len(calls) == 4
    assert "stage2 has forward hooks" in _status(fast)
    # a hook on the model itself runs around the replay
    fast2 = hrnet_fast.optimize(_tiny(5), backend="cpu")
    seen = []
    fast2.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    _warm(fast2, torch.randn(*X))
    assert len(seen) == 3


def test_forward_keeps_its_signature():
    import inspect

    fast = hrnet_fast.optimize(_tiny(6), backend="cpu")
    assert list(inspect.signature(fast.forward).parameters) == ["x"]


def test_grad_mode_and_tasks_run_python():
    model = _tiny(6)
    fast = hrnet_fast.optimize(model, backend="cpu")
    fast(torch.randn(*X))  # grad enabled, input without grad: runs, records nothing
    assert fast.forward.status() == {}
    assert not isinstance(hrnet_fast.optimize(model, backend="cpu", tasks=True).forward, CPUGraphForward)
    with pytest.raises(ValueError, match="cpu_graph=True .* without tasks"):
        hrnet_fast.optimize(model, backend="cpu", tasks=True, cpu_graph=True)
    with pytest.raises(ValueError, match="cpu_graph=True .* needs the cpu backend"):
        hrnet_fast.optimize(model, backend="torch", cpu_graph=True)


def test_threads_replay_one_graph_at_once():
    fast = hrnet_fast.optimize(_tiny(7), backend="cpu")
    plain = hrnet_fast.optimize(_tiny(7), backend="cpu", cpu_graph=False)
    _warm(fast, torch.randn(*X))
    inputs = [torch.randn(*X) for _ in range(6)]
    with torch.no_grad():
        want = [plain(x) for x in inputs]

    def work(k: int) -> None:
        with torch.no_grad():
            for j in range(4):
                _same(fast(inputs[(k + j) % 6]), want[(k + j) % 6])

    in_threads(work, 6)


def test_graph_frees_each_slot_after_its_last_use():
    """A chain by hand: each tensor is dropped after the last step that reads it, so however long the
    chain, at most four slots (the input, a, b and the add's output) live at once."""
    graph = torch.classes.hrnet_fast.CpuGraph()
    x = torch.randn(4, 4)
    graph.begin([x])
    a = torch.relu(x)
    b = a * 2
    c = b + a  # a's and b's last use
    for _ in range(5):
        c = c.neg()
    assert graph.end([c]) == ""
    assert graph.ops() == ["aten::relu", "aten::mul.Tensor", "aten::add.Tensor"] + ["aten::neg"] * 5
    steps, slots, peak = graph.stats()
    assert (steps, slots, peak) == (8, 9, 4)
    y = torch.randn(4, 4)
    (out,) = graph.run([y])
    torch.testing.assert_close(out, -(torch.relu(y) * 3), rtol=0, atol=0)


def test_copies_and_pickles_record_their_own_graphs():
    import copy
    import pickle

    fast = hrnet_fast.optimize(_tiny(8), backend="cpu")
    x = torch.randn(*X)
    _warm(fast, x)
    with torch.no_grad():
        want = fast(x)
        for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert other.forward._module is other and other.forward.status() == {}
            _warm(other, x)
            _same(other(x), want)
