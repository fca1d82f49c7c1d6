"""The controller's FLOPs regulariser: zero under budget, log above it, gradient pushes down only."""

import math

import pytest
import torch

import atofx
from atofx.ato.flops_regularizer import controller_loss, flops_regularizer

TOTAL = 1000.0


def test_zero_at_and_below_target():
    for p in (100.0, 499.0, 500.0):
        assert flops_regularizer(torch.tensor(p), 0.5, TOTAL).item() == 0.0


def test_log_ratio_above_target():
    r = flops_regularizer(torch.tensor(800.0, dtype=torch.float64), 0.5, TOTAL)
    assert r.item() == pytest.approx(math.log(800 / 500))


def test_gradient_sign():
    above = torch.tensor(800.0, requires_grad=True)
    flops_regularizer(above, 0.5, TOTAL).backward()
    assert above.grad.item() == pytest.approx(1 / 800)  # positive: lowering FLOPs lowers the loss
    below = torch.tensor(300.0, requires_grad=True)
    flops_regularizer(below, 0.5, TOTAL).backward()
    assert below.grad.item() == 0.0


def test_controller_loss_adds_gamma_times_regulariser():
    task = torch.tensor(2.0)
    p = torch.tensor(800.0)
    expected = 2.0 + 4.0 * math.log(800 / 500)
    assert controller_loss(task, p, 0.5, TOTAL).item() == pytest.approx(expected, rel=1e-6)
    assert controller_loss(task, p, 0.5, TOTAL, gamma=0.0).item() == 2.0
    assert controller_loss(task, torch.tensor(400.0), 0.5, TOTAL).item() == 2.0


def test_gradient_through_the_flops_model_reaches_the_mask():
    keep = torch.ones(8, requires_grad=True)
    p = keep.sum() * 100.0  # a toy linear P(keep), total 800
    flops_regularizer(p, 0.25, 800.0).backward()
    assert (keep.grad > 0).all()


@pytest.mark.parametrize(("target", "total"), [(0.0, TOTAL), (1.5, TOTAL), (0.5, 0.0)])
def test_rejects_bad_budget(target, total):
    with pytest.raises(atofx.ConfigError):
        flops_regularizer(torch.tensor(1.0), target, total)
