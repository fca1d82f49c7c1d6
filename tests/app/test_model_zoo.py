"""Every torchvision classification model compiles; CNNs have prunable spaces; pinned spaces say why.

The default run checks a representative slice at small inputs; `python -m pytest -m zoo_full`
checks every model and the zero-invariance of one ZIG per prunable space.
"""

from __future__ import annotations

import gc

import pytest
import torch

import atofx
from atofx.app import model_zoo
from atofx.app.model_zoo import is_transformer
from tests.checks import assert_zero_invariant

SLICE = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x0_5",
    "regnet_x_400mf", "resnext50_32x4d", "squeezenet1_1", "googlenet", "convnext_tiny", "mnasnet0_5",
    "vgg11_bn", "alexnet", "inception_v3", "vit_b_32", "swin_t", "maxvit_t",
]
# The zero-invariance check costs one forward pass (plus bookkeeping) per prunable space; on the default
# slice it runs where that stays cheap on 2 CPU cores (the rest are checked by the zoo_full sweep).
SLICE_ZERO_INVARIANCE = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "mnasnet0_5",
    "vgg11_bn", "alexnet", "regnet_x_400mf", "resnext50_32x4d",
]


def test_models_exist():
    """The slice names stay valid as torchvision evolves."""
    assert set(SLICE) <= set(model_zoo.torchvision_models())


def _input_size(name: str) -> tuple[int, int, int]:
    """The smallest cheap input each architecture accepts."""
    if is_transformer(name):
        return model_zoo.default_input_size(name)  # ViT and MaxViT are built for a fixed image size
    if name == "inception_v3":
        return (3, 80, 80)  # its stem needs at least 75x75
    return (3, 64, 64)


def _check(name: str, zero_invariance: bool) -> None:
    zoo = model_zoo.load(name, _input_size(name))
    ato = atofx.compile(zoo.model, zoo.example)
    spaces = ato.spaces
    assert spaces, f"{name}: no channel spaces"
    for s in spaces:
        if s.pinned:
            assert s.reason, f"{name}: space {s.name} is pinned without a reason"
    if not is_transformer(name):
        assert ato.zigs.prunable, f"{name}: no prunable space; pinned: " + "; ".join(
            f"{s.name}: {s.reason}" for s in spaces)
    if zero_invariance and ato.zigs.prunable:
        assert assert_zero_invariant(ato, zigs_per_space=1) == len(ato.zigs.prunable)
    del ato, zoo
    gc.collect()


@pytest.mark.parametrize("name", SLICE)
def test_slice_compiles(name: str):
    with torch.no_grad():
        _check(name, zero_invariance=name in SLICE_ZERO_INVARIANCE)


@pytest.mark.zoo_full
@pytest.mark.parametrize("name", model_zoo.torchvision_models())
def test_every_model_compiles_zero_invariant(name: str):
    with torch.no_grad():
        _check(name, zero_invariance=True)
