"""The small core helpers: nested tensors, eval mode for a moment, files written atomically and read safely."""

from __future__ import annotations

import collections

import pytest
import torch
from atofx.passes.values import evaluating
from torch import nn

import atofx
from atofx.core.files import atomic_save, safe_load
from atofx.core.nested import describe, leaves, map_tensors, on_device_of

Pair = collections.namedtuple("Pair", "a b")


def test_map_tensors_keeps_every_container_kind():
    x = {"p": Pair(torch.ones(2), [torch.zeros(1), 3]), "q": (torch.ones(1),)}
    y = map_tensors(lambda t: t + 1, x)
    assert isinstance(y["p"], Pair) and isinstance(y["p"].b, list) and isinstance(y["q"], tuple)
    assert y["p"].a.tolist() == [2.0, 2.0] and y["p"].b[1] == 3
    assert [p for p, _ in leaves(x, "in")] == ["in['p'][0]", "in['p'][1][0]", "in['p'][1][1]", "in['q'][0]"]
    assert describe((torch.zeros(2, 3), 1)) == "((2, 3) float32, int)"


def test_on_device_of_moves_inputs_to_the_models_first_parameter_or_buffer():
    x = (torch.ones(1, 2), {"k": torch.zeros(1)}, 3)
    for module in (nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)):  # a parameter; buffers only
        moved = on_device_of(module.to("meta"), x)
        assert moved[0].is_meta and moved[1]["k"].is_meta and moved[2] == 3
    assert on_device_of(nn.ReLU(), x) is x  # nothing to follow


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


def test_flops_follow_a_model_moved_off_the_example_inputs_device():
    """A model compiled with CPU example inputs and then moved (by training on a GPU; here to the meta device,
    which the CPU-only CI has) still gets its FLOPs model and its count: the inputs follow the model."""
    example = (torch.randn(2, 1, 6, 6),)
    reference = atofx.compile(_conv_net(), example)
    ato = atofx.compile(_conv_net(), example)
    ato.model.to("meta")
    ato.graph_module.to("meta")
    assert ato.flops_model.total == reference.flops_model.total > 0
    assert atofx.count_flops(ato.model, example) == atofx.count_flops(reference.model, example)


def test_evaluating_restores_each_layers_flag_even_after_an_error():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
    model[1].eval()  # a mixed state: only the layers that trained train again
    with pytest.raises(RuntimeError), evaluating(model):
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False]


def test_atomic_save_keeps_the_previous_file_and_safe_load_refuses_code(tmp_path):
    path, previous = tmp_path / "a.pt", tmp_path / "a.prev.pt"
    atomic_save({"v": torch.ones(1)}, path, previous)
    atomic_save({"v": torch.zeros(1)}, path, previous)
    assert safe_load(path, "x")["v"].item() == 0.0 and safe_load(previous, "x")["v"].item() == 1.0
    assert not list(tmp_path.glob("*.tmp"))
    torch.save({"code": Pair(1, 2)}, tmp_path / "code.pt")  # a class from this module: code to import
    with pytest.raises(atofx.UnsafeCheckpointError, match="code.pt refused, do this"):
        safe_load(tmp_path / "code.pt", "refused, do this")
