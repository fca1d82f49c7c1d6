"""passes/tracing.py: untraceable code raises a clear TraceError; leaf modules and concrete_args."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from atofx.passes.tracing import trace
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
    assert sp.pinned and "unknown op: module Branchy ('body.block')" in sp.reason
    assert any("Branchy" in what for what in ato.zigs.facts.unknown_ops.values())


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
