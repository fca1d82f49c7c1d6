"""passes/tracing.py: untraceable code raises a clear TraceError; leaf modules and concrete_args."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from atofx.passes.tracing import mode_branches, trace, trace_graph
from torch import nn

import atofx
from atofx.errors import AtofxError, TraceError


class Branchy(nn.Module):
    """Data-dependent control flow: an `if` on a tensor value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Iterates(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([row * 2 for row in x])


class Net(nn.Module):
    """conv -> body.block (the construct under test) -> conv."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.body = nn.Module()
        self.body.block = block
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.body.block(torch.relu(self.conv1(x))))


def example() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))


def _trace_error(model: nn.Module) -> TraceError:
    with pytest.raises(TraceError) as info:
        atofx.compile(model, example())
    return info.value


def test_control_flow_raises_a_trace_error_with_the_fix() -> None:
    err = _trace_error(Net(Branchy()))
    assert isinstance(err, AtofxError)
    text = str(err)
    assert "data-dependent control flow" in text
    assert "leaf_modules" in text and "concrete_args" in text
    assert isinstance(err.__cause__, Exception)  # the torch.fx error is kept for debugging


def test_trace_error_names_the_failing_submodule() -> None:
    text = str(_trace_error(Net(Branchy())))
    assert "'body.block'" in text and "Branchy" in text
    assert "leaf_modules=[Branchy]" in text


def test_iteration_over_a_tensor_is_named() -> None:
    assert "iteration over a tensor" in str(_trace_error(Net(Iterates())))


def test_error_at_the_root_names_the_root() -> None:
    text = str(_trace_error(Branchy()))
    assert "'<root>' (Branchy)" in text


@pytest.mark.parametrize("spec", ["type", "path", "instance"])
def test_leaf_module_stays_opaque_and_pins(spec: str) -> None:
    model = Net(Branchy())
    leaf = {"type": Branchy, "path": "body.block", "instance": model.body.block}[spec]
    ato = atofx.compile(model, example(), leaf_modules=[leaf])
    calls = [n for n in ato.graph_module.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["conv1", "body.block", "conv2"]
    (sp,) = [s for s in ato.spaces if "conv1" in s.producers]
    assert sp.pinned and "kept opaque (leaf_modules): module Branchy ('body.block')" in sp.reason
    assert not ato.zigs.facts.unknown_ops  # the user chose it: not an op outside the rule table
    assert "ops outside the rule table" not in ato.report()



def test_leaf_spec_matches_only_what_it_names() -> None:
    """A path or instance leaf leaves other modules of the same type traceable."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 1))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Twice()
    for leaf in ("a", model.a):
        gm = trace(model, leaf_modules=[leaf])
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "b.0"]
    gm = trace(model, leaf_modules=[nn.Sequential])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["a", "b"]


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
        y = self.conv1(x)
        if sigmoid:
            y = torch.sigmoid(y)
        return self.conv2(y)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_concrete_args_fix_the_branch(sigmoid: bool) -> None:
    with pytest.raises(TraceError, match="concrete_args"):
        trace(Flagged())
    gm = trace(Flagged(), concrete_args={"sigmoid": sigmoid})
    assert isinstance(gm, fx.GraphModule)
    assert any(n.target is torch.sigmoid for n in gm.graph.nodes) == sigmoid
    ato = atofx.compile(Flagged(), (example(), sigmoid), concrete_args={"sigmoid": sigmoid})
    (sp,) = [s for s in ato.spaces if "conv1" in s.producers]
    assert sp.pinned == sigmoid  # sigmoid(0) != 0 pins conv1's channels


def test_concrete_args_need_not_be_repeated_in_example_inputs() -> None:
    atofx.compile(Flagged(), example(), concrete_args={"sigmoid": True})


# ---------------------------------------------------------------- shapes fixed from the example input


class SamePaddingConv(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from the input size at run time (the pattern of timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation), strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = SamePaddingConv(4, 8, 3, stride=2)
        self.dw = SamePaddingConv(8, 8, 3, groups=8)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.dw(torch.relu(self.conv1(x)))))


class ShapeBranches(nn.Module):
    """Python on sizes at the root: an `if` on the input width, `int()` of a size, a shape unpacked."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        if x.shape[-1] > 32:
            y = F.max_pool2d(y, 2)
        channels = int(y.size(1))
        y = y.flatten(2).view(y.shape[0], channels, *y.shape[2:])
        return self.conv2(y)


@pytest.mark.parametrize("make", [SameNet, ShapeBranches])
def test_python_on_shapes_traces_specialised_to_the_example(make: type) -> None:
    model = make().eval()
    with pytest.raises(TraceError, match="example_inputs"):
        trace(model)  # plain fx cannot, and says the example input would help
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    ato = atofx.compile(model, x)
    assert not ato.zigs.facts.unknown_ops
    assert torch.allclose(ato.graph_module(x), model(x))
    sp = next(s for s in ato.spaces if "conv1" in s.producers)
    assert not sp.pinned and sp.width == 8
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))  # the equivalence check runs inside
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_same_padding_is_folded_into_literals_inside_the_layer() -> None:
    x = torch.randn(1, 4, 9, 9)
    gm = atofx.compile(SameNet(), x).graph_module
    pads = [n for n in gm.graph.nodes if n.target is F.pad]
    assert [n.args[1] for n in pads] == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is math.ceil]


def test_a_branch_on_tensor_values_is_still_refused_with_shapes_known() -> None:
    text = str(_trace_error(Branchy()))
    assert "data-dependent control flow" in text and "move the branch into a submodule" in text


class ChunkList(nn.Module):
    """YOLOv8's C2f: `list(x.chunk(2, 1))`, then stages appended and all concatenated."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 1)
        self.m = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.conv1(x).chunk(2, 1))
        y.append(torch.relu(self.m(y[-1])))
        return self.conv2(torch.cat(y, 1))


def test_a_list_of_chunks_iterates_with_the_example_length() -> None:
    model = ChunkList().eval()
    with pytest.raises(TraceError, match="iteration over a tensor"):
        trace(model)
    x = example()
    ato = atofx.compile(model, x)
    assert torch.allclose(ato.graph_module(x), model(x))
    assert any(not s.pinned for s in ato.spaces if "conv1" in s.producers)
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))  # the equivalence check runs inside
    assert small.conv1.out_channels < 8


class PerSample(nn.Module):
    """Iterates over the batch: the count would be baked in from the example's batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(list(self.conv(x).unbind(0)))


def test_a_list_of_batch_slices_is_still_refused() -> None:
    assert "iteration over a tensor" in str(_trace_error(PerSample()))


class _Halves(nn.Module):
    """Halves its input in train mode: a Python branch on `self.training`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x * 0.5
        return x + 1


class _Branching(nn.Module):
    """A branch on `self.training` in the model itself (`aux`: googlenet's `if self.training and self.aux_logits`,
    one graph either way without aux) or in a submodule (`inner`)."""

    def __init__(self, inner: bool = False, aux: bool = True):
        super().__init__()
        self.inner, self.aux = inner, aux
        self.conv, self.halves = nn.Conv2d(3, 4, 1), _Halves()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.inner:
            return self.halves(y)
        if self.training and self.aux:
            y = y * 0.5
        return y


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("model", "expected"), [
    (lambda: _Branching(), ("",)),
    (lambda: _Branching(inner=True), ("halves",)),
    (lambda: _Branching(aux=False), ()),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5)), ()),
], ids=["the-model-itself", "a-submodule", "one-graph-either-way", "dropout"])
def test_a_branch_on_training_that_changes_the_graph_is_marked_with_its_module(model, expected, mode):
    """fx records the branch of the model's mode; atofx marks the graph when the other mode's differs."""
    assert mode_branches(trace_graph(model().train(mode))) == expected
