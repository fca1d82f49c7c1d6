"""What a Torch-Pruning user reaches for in `ato.train`, and the warnings a short schedule deserves."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.model import schedule_warning
from atofx.trainer import ATOConfig, Phases


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.fixture
def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_two_epochs_of_ato_warn_that_the_controller_has_no_time(loader):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    with pytest.warns(atofx.AtofxWarning, match=r"with 2 epochs the controller learns the mask in 1 epoch"):
        ato.train(loader, 2, target_flops=0.6, progress=False)


def test_a_static_run_or_a_long_schedule_does_not_warn(loader):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", atofx.AtofxWarning)
        ato.train(loader, 2, target_flops=0.6, method="static", progress=False)
    assert schedule_warning(Phases.of(ATOConfig(), 30), controller_batches=10, passes=1) is None
    assert schedule_warning(Phases.of(ATOConfig(), 30), controller_batches=2, passes=1) is not None  # 24 steps
