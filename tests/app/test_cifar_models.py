"""The CIFAR models: shapes and sizes of the reference implementations, and each one compiles and prunes exactly."""

from __future__ import annotations

import pytest
import torch
from atofx.passes.equivalence import relative_difference
from torch import nn

import atofx
from atofx.app.cifar_models import CIFAR_MODELS, MobileNetV2Cifar

# parameters at 10 classes: the CIFAR ResNet-18/34 of common CIFAR code (kuangliu/pytorch-cifar), torchvision's
# MobileNetV2 layout with a 10-class head, He et al.'s ResNet-56 (0.85M)
PARAMS = {"resnet18_cifar": 11_173_962, "resnet34_cifar": 21_282_122, "mobilenetv2_cifar": 2_236_682,
          "resnet56": 855_770}


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_forward_shape_and_size(name):
    model = CIFAR_MODELS[name](num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    ten = CIFAR_MODELS[name](num_classes=10, in_channels=3)
    if name in PARAMS:
        assert sum(p.numel() for p in ten.parameters()) == PARAMS[name]


def test_cifar_variants_keep_32x32_resolution_early():
    resnet = CIFAR_MODELS["resnet18_cifar"]()
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules())
    widths = [layer[0].conv1.out_channels for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]
    assert widths == [64, 128, 256, 512]
    mobile = MobileNetV2Cifar()
    with torch.no_grad():
        assert mobile.features(torch.zeros(1, 3, 32, 32)).shape == (1, 1280, 4, 4)  # total stride 8


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet34_cifar", "mobilenetv2_cifar", "resnet20"])
def test_random_mask_prunes_equivalently(name):
    torch.manual_seed(0)
    model = CIFAR_MODELS[name](num_classes=10)
    for m in model.modules():  # non-trivial BN statistics, so a wrong slice shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    ato = atofx.compile(model, x)
    assert ato.zigs.prunable
    mask = ato.random_mask(keep=0.6, seed=1)
    small = ato.prune(mask)  # raises EquivalenceError itself if the outputs differ
    ato.apply_mask(mask)
    with torch.no_grad():
        assert relative_difference(model.eval()(x), small.eval()(x)) <= 1e-5
    assert atofx.count_flops(small, x) < 0.8 * atofx.count_flops(model, x)
    assert atofx.count_flops(small, x) == pytest.approx(ato.flops(mask), rel=0.01)
