"""passes/dependency.py: the engine couples, offsets and pins channels as the op rules report them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from atofx.passes.channel_layout import ChannelLayout
from atofx.passes.dependency import tensor_aliases
from atofx.passes.op_rules import OPS
from atofx.passes.registry import Op
from torch import nn

from tests.passes.analysis import Flip, analyse, rows, space_of


def example(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 5, 5, generator=torch.Generator().manual_seed(0))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) + self.b(x))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_a_residual_add_couples_the_two_branches_channel_by_channel() -> None:
    _, zigs = analyse(Residual(), example())
    space = space_of(zigs, "a")
    assert set(space.producers) == {"a", "b"} and space.width == 6 and not space.pinned
    assert rows(zigs, space, "a", 0) == rows(zigs, space, "b", 0) == [[c] for c in range(6)]
    assert rows(zigs, space, "head", 1) == [[c] for c in range(6)]


def test_a_concat_offsets_the_second_input_by_the_width_of_the_first() -> None:
    _, zigs = analyse(Concat(), example())
    a, b = space_of(zigs, "a"), space_of(zigs, "b")
    assert a.index != b.index and (a.width, b.width) == (4, 6) and not a.pinned and not b.pinned
    assert rows(zigs, a, "head", 1) == [[c] for c in range(4)]
    assert rows(zigs, b, "head", 1) == [[4 + c] for c in range(6)]
    layouts = zigs.facts.layouts
    cat = next(v for k, v in layouts.items() if k.startswith("cat"))
    assert isinstance(cat, ChannelLayout) and cat.dim == 1
    assert np.array_equal(cat.ids, np.concatenate([layouts["a"].ids, layouts["b"].ids]))


def test_an_op_without_a_rule_pins_the_channels_it_touches() -> None:
    _, zigs = analyse(Flip(), example())
    assert list(zigs.facts.unknown_ops.values()) == ["function torch.flip"]
    space = space_of(zigs, "a")
    assert space.pinned and "unknown op: function torch.flip" in space.reason


def test_a_rule_whose_answer_does_not_fit_the_shapes_is_refused() -> None:
    def too_narrow(ctx):  # claims the flip returns 3 channels; shape propagation saw 4
        lay = ctx.layout(ctx.arg(0, "input"))
        return lay.sliced(slice(0, 3))

    _, zigs = analyse(Flip(), example(), OPS.with_entries(Op((torch.flip,), "too narrow", too_narrow)))
    (reason,) = zigs.facts.unknown_ops.values()
    assert reason.startswith("rule 'too narrow' could not follow the channels of function torch.flip")
    assert space_of(zigs, "a").pinned


def test_model_inputs_and_outputs_are_pinned() -> None:
    _, zigs = analyse(Residual(), example())
    out = space_of(zigs, "head")
    assert out.pinned and "model output" in out.reason
    (x,) = [s for s in zigs.spaces if not s.producers]
    assert x.pinned and "model input" in x.reason and set(x.consumers) == {"a", "b"}


def test_the_channel_graph_links_each_op_to_the_ops_it_feeds() -> None:
    _, zigs = analyse(Residual(), example())
    graph = zigs.facts.graph
    add = next(n for n in zigs.facts.layouts if n.startswith("add"))
    assert graph.has_edge(("a", 1), (add, 1)) and graph.has_edge(("b", 1), (add, 1))
    assert graph.has_edge((add, 1), ("head", 1)) and not graph.has_edge(("a", 1), ("head", 1))
    assert graph.nodes[(add, 1)]["width"] == 6


def test_a_tensor_shared_by_two_layers_has_one_name() -> None:
    model = Residual()
    model.b.bias = model.a.bias
    assert tensor_aliases(model) == {"b.bias": "a.bias"}
    _, zigs = analyse(model, example())
    assert zigs.facts.tensor_name("b", "bias") == "a.bias" and zigs.facts.tensor_name("b", "weight") == "b.weight"


@pytest.mark.parametrize("model", [Residual, Concat])
def test_every_slice_names_a_real_parameter_dim_of_the_right_width(model: type) -> None:
    net = model()
    _, zigs = analyse(net, example())
    params = dict(net.named_parameters())
    for s in zigs.slices:
        assert params[f"{s.module}.{s.name}"].shape[s.dim] == len(s.ids), s


class Written(nn.Module):
    """conv `a` -> `write(y)` (its result unused: the forward reads y again) -> relu -> conv `head`."""

    def __init__(self, write) -> None:
        super().__init__()
        self.write = write
        self.a, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.write(y)
        return self.head(torch.relu(y))


@pytest.mark.parametrize("write", [lambda y: y.add_(1.0), lambda y: y.clamp_(min=0.5), lambda y: y.sigmoid_(),
                                   lambda y: torch.sigmoid_(y)], ids=["add_", "clamp_", "sigmoid_", "torch.sigmoid_"])
def test_an_in_place_write_whose_result_is_unused_reaches_the_tensors_later_readers(write) -> None:
    """y.add_(1) makes a dropped channel 1 in y itself: the conv reading y afterwards must see that and pin it."""
    _, zigs = analyse(Written(write), example())
    space = space_of(zigs, "a")
    assert space.pinned and "not zero when its group is zeroed" in space.reason, space


@pytest.mark.parametrize("write", [lambda y: y.relu_(), lambda y: y.mul_(2.0), lambda y: F.relu(y, inplace=True)],
                         ids=["relu_", "mul_", "inplace=True"])
def test_an_in_place_write_that_keeps_zeros_keeps_the_channels_prunable(write) -> None:
    _, zigs = analyse(Written(write), example())
    assert not space_of(zigs, "a").pinned


def test_an_in_place_write_through_a_view_pins_what_it_makes_non_zero() -> None:
    """y[:, :2].add_(1) writes into y's first two channels through the slice: only those are pinned."""
    _, zigs = analyse(Written(lambda y: y[:, :2].add_(1.0)), example())
    pinned = [s for s in zigs.spaces if "a" in s.producers and s.pinned]
    assert [s.width for s in pinned] == [2] and "written in place through a view" in pinned[0].reason
    assert [s.width for s in zigs.spaces if "a" in s.producers and not s.pinned] == [4]


class Counted(nn.Module):
    """conv `a` -> relu -> `use(conv head's output, the relu's output)`."""

    def __init__(self, use, head_in: int = 6) -> None:
        super().__init__()
        self.use = use
        self.a, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(head_in, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.use(self.head, y)


@pytest.mark.parametrize("use", [
    lambda head, y: head(y) / y.shape[1],
    lambda head, y: head(y) * y.size(1),
    lambda head, y: head(y) / y.numel(),
    lambda head, y: head(y) * (y.size(-3) // 2 + 1),
    lambda head, y: (head(y), y.shape[1]),
], ids=["shape[1]", "size(1)", "numel", "arithmetic", "returned"])
def test_a_channel_count_used_as_a_number_pins_the_channels(use) -> None:
    """After pruning, y.shape[1] is another number: the pruned model would divide by it."""
    _, zigs = analyse(Counted(use), example())
    space = space_of(zigs, "a")
    assert space.pinned and "channel count (x.shape, x.size()) is used as a number" in space.reason, space


@pytest.mark.parametrize("use", [
    lambda head, y: head(y.view(y.size(0), y.size(1), -1).view(y.shape)),
    lambda head, y: head(y) * y.shape[0] + y.shape[2],
    lambda head, y: head(y.view(y.shape[0], 2, y.shape[1] // 2, 5, 5).transpose(1, 2).reshape(y.shape)),
], ids=["view", "batch-and-spatial", "channel-shuffle"])
def test_a_channel_count_sizing_a_reshape_or_other_dims_keeps_the_channels_prunable(use) -> None:
    _, zigs = analyse(Counted(use), example())
    assert not space_of(zigs, "a").pinned
