"""passes/equivalence.py and passes/values.py: comparing outputs, eval-mode runs, the first differing node."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from atofx.passes.equivalence import first_divergence, node_values, relative_difference, run_eval
from atofx.passes.rewrite import prune_copy
from atofx.passes.tracing import trace
from atofx.passes.values import evaluating, tensors_in
from torch import nn

from tests.passes.analysis import analyse, space_of

X = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def test_tensors_in_walks_tuples_lists_and_dicts_in_order() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    assert [t.numel() for t in tensors_in((a, {"x": [b, 5], "y": (c,)}, "text"))] == [1, 2, 3]
    assert tensors_in(7) == []


def test_relative_difference_is_relative_to_the_first_output_and_infinite_on_other_structures() -> None:
    a = {"out": torch.tensor([1.0, -4.0]), "aux": (torch.tensor([2.0]),)}
    b = {"out": torch.tensor([1.0, -3.0]), "aux": (torch.tensor([2.0]),)}
    assert relative_difference(a, b) == pytest.approx(1.0 / 4.0)
    assert relative_difference(a, a) == 0.0
    assert relative_difference((torch.ones(2),), (torch.ones(3),)) == float("inf")
    assert relative_difference((torch.ones(2),), (torch.ones(2), torch.ones(2))) == float("inf")


def test_run_eval_runs_without_dropout_and_gives_the_model_back_in_its_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9)).train()
    x = torch.ones(2, 4)
    out = run_eval(model, (x,))
    assert model.training and model[1].training and not out.requires_grad
    assert torch.equal(out, model[0](x).detach())


def test_evaluating_gives_each_layer_back_its_own_mode_even_when_the_run_fails() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    model[1].eval()  # a layer the user froze stays frozen
    with pytest.raises(RuntimeError), evaluating(model):
        assert not model.training and not model[0].training and not torch.is_grad_enabled()
        model(torch.ones(2, 5))
    assert model.training and model[0].training and not model[1].training


def _masked_and_pruned(break_pruned) -> tuple:
    """The traced masked model and the traced pruned model (changed by `break_pruned`), with the keep vector."""
    model = Chain()
    _, zigs = analyse(model, X)
    space = space_of(zigs, "conv1")
    bits = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    keep = zigs.keep_per_component({space.index: bits})
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the masked model: the "out" slices of every dropped ZIG zeroed
        for z in np.flatnonzero(~bits):
            for module, name, dim, idx in zigs.zig_slices(space.index, int(z)):
                getattr(reference.get_submodule(module), name).index_fill_(dim, torch.as_tensor(idx), 0.0)
    small = prune_copy(model, zigs, keep)
    break_pruned(small)
    return trace(reference), trace(small), zigs, keep


def test_a_correct_prune_has_no_first_divergence() -> None:
    ref, new, zigs, keep = _masked_and_pruned(lambda small: None)
    assert first_divergence(ref, new, (X,), zigs, keep, 1e-5) == "the outputs (no single layer differs)"


def test_first_divergence_names_the_first_node_that_differs() -> None:
    def shift_conv2(small: nn.Module) -> None:
        with torch.no_grad():
            small.conv2.bias += 1.0

    ref, new, zigs, keep = _masked_and_pruned(shift_conv2)
    assert first_divergence(ref, new, (X,), zigs, keep, 1e-5) == "conv2 (call_module conv2)"


def test_first_divergence_names_the_node_where_the_pruned_model_fails() -> None:
    def wrong_width(small: nn.Module) -> None:
        small.conv3 = nn.Conv2d(7, 4, 1)

    ref, new, zigs, keep = _masked_and_pruned(wrong_width)
    assert node_values(new, (X,)).keys() >= {"conv1", "conv2", "relu_1"} and "conv3" not in node_values(new, (X,))
    assert first_divergence(ref, new, (X,), zigs, keep, 1e-5) == "conv3 (call_module conv3): the pruned model failed here"


class _Shift(nn.Module):
    """State in a buffer only: no parameter to take the device from."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        return x + self.shift


def test_run_eval_runs_on_the_device_of_a_buffer_only_module():
    model = _Shift().to("meta")
    out = run_eval(model, (torch.zeros(3),))
    assert out.device.type == "meta" and model.training  # the mode given back
