"""A user's learning-rate scheduler steps after every batch (OneCycleLR in batches, CyclicLR) or once an epoch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.ato.lr_schedule import when_to_step


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, epochs=3, steps_per_epoch=4), "batch"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=3), "epoch"),
    (lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2), "batch"),
    (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=3), "epoch"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o), "metric"),
    (lambda o: None, "never"),
])
def test_which_schedulers_step_after_every_batch(make, expected):
    assert when_to_step(make(_optimizer()), 3, 4) == expected


def test_a_one_cycle_sized_for_neither_stepping_is_refused_with_both_sizes():
    one_cycle = lr_scheduler.OneCycleLR(_optimizer(), max_lr=0.1, total_steps=100)
    with pytest.raises(atofx.ConfigError, match=r"total_steps=100.*total_steps=12 .*steps_per_epoch=4.*total_steps=3 "):
        when_to_step(one_cycle, 3, 4)


def _run(make_scheduler) -> tuple[list[float], list[float]]:
    """Three ATO epochs of a small CNN over 4 batches; the learning rate at each epoch's end, and the scheduler's own
    record of it when stepped by hand the same number of times."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atofx.AtofxWarning)
        history = atofx.compile(model, torch.randn(1, 1, 8, 8)).train(
            loader, 3, target_flops=0.6, optimizer=opt, scheduler=make_scheduler(opt), progress=False,
            controller_data=0.5)
    reference_opt = _optimizer()
    reference = make_scheduler(reference_opt)
    expected = []
    for _ in range(3):
        for _ in range(4 if when_to_step(reference, 3, 4) == "batch" else 1):
            reference_opt.step()
            reference.step()
        expected.append(reference_opt.param_groups[0]["lr"])
    return [r["lr"] for r in history], expected


@pytest.mark.parametrize("make", [
    lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, epochs=3, steps_per_epoch=4),
    lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=3),
    lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=3),
])
def test_ato_train_follows_the_schedule_the_scheduler_was_sized_for(make):
    seen, expected = _run(make)
    assert seen == pytest.approx(expected)  # stepped once an epoch, a one-cycle sized in batches would differ


def test_a_mis_sized_one_cycle_is_refused_before_any_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(), pytest.raises(atofx.ConfigError, match="OneCycleLR"):
        warnings.simplefilter("ignore", atofx.AtofxWarning)
        atofx.compile(model, torch.randn(1, 1, 8, 8)).train(
            DataLoader(data, batch_size=16), 3, target_flops=0.6, optimizer=opt, progress=False, controller_data=0.5,
            scheduler=lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
