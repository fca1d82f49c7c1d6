"""Denormal optimiser state: why it arises (SGD momentum stuck at the smallest denormal), that the flush zeroes
exactly those entries, and that ATO's epoch loop flushes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.ato.config import ATOConfig
from atofx.ato.denormals import flush_denormal_state_
from atofx.ato.loop import train_one_epoch
from atofx.ato.trainer import ATOTrainer

TINY = torch.finfo(torch.float32).tiny


def small_compiled_cnn() -> tuple[nn.Module, atofx.ATOModel]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    return model, atofx.compile(model, (torch.randn(1, 1, 6, 6),))


def denormal(t: torch.Tensor) -> torch.Tensor:
    return (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)


def test_momentum_with_zero_gradient_sticks_at_a_denormal_and_the_flush_ends_it():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    p.grad = torch.ones(4)
    opt.step()
    p.grad = torch.zeros(4)  # a zeroed group: no gradient from now on
    for _ in range(2000):
        opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert denormal(buf).all()  # 0.9 x the smallest denormal rounds back to itself: never zero
    flush_denormal_state_(opt)
    assert torch.equal(buf, torch.zeros(4))
    for _ in range(10):
        opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(4))


def test_flush_zeroes_denormals_only():
    p, q = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = torch.optim.Adam([p, q])
    values = torch.tensor([1e-40, -1e-41, 1e-3, -2.5, 0.0, TINY])
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": values.clone(), "exp_avg_sq": values.abs()}
    opt.state[q] = {"step": torch.tensor(3.0), "exp_avg": torch.tensor([[1e-310, 1e-40], [0.5, -1e-320]],
                                                                          dtype=torch.float64)}
    flush_denormal_state_(opt)
    expected = torch.tensor([0.0, 0.0, 1e-3, -2.5, 0.0, TINY])
    assert torch.equal(opt.state[p]["exp_avg"], expected)
    assert torch.equal(opt.state[p]["exp_avg_sq"], expected.abs())
    assert torch.equal(opt.state[p]["step"], torch.tensor(3.0))
    # float64 has its own threshold: 1e-40 is an ordinary float64
    assert torch.equal(opt.state[q]["exp_avg"], torch.tensor([[0.0, 1e-40], [0.5, 0.0]], dtype=torch.float64))


def test_flush_keeps_float16_state():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    small = torch.tensor([1e-6, -3e-5], dtype=torch.float16)  # float16 denormals, but values a model uses
    opt.state[p]["momentum_buffer"] = small.clone()
    flush_denormal_state_(opt)
    assert torch.equal(opt.state[p]["momentum_buffer"], small)


def test_ato_epoch_flushes_the_optimiser_state():
    model, ato = small_compiled_cnn()
    trainer = ATOTrainer(ato, ATOConfig(target_flops=0.5), 4, torch.device("cpu"))
    idle = nn.Parameter(torch.zeros(3))  # no gradient: SGD leaves its state as planted
    opt = torch.optim.SGD([*model.parameters(), idle], lr=0.1, momentum=0.9)
    opt.state[idle]["momentum_buffer"] = torch.tensor([1e-40, 0.25, -1e-39])
    data = DataLoader(TensorDataset(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))), batch_size=4)
    train_one_epoch(trainer, data, opt, nn.functional.cross_entropy)
    assert torch.equal(opt.state[idle]["momentum_buffer"], torch.tensor([0.0, 0.25, 0.0]))
    assert not any(denormal(v).any() for s in opt.state.values() for v in s.values() if v.dim())


def test_a_custom_loop_flushes_at_end_epoch():
    model, ato = small_compiled_cnn()
    ato.start_training(2, 0.5)
    idle = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([*model.parameters(), idle], lr=0.1, momentum=0.9)
    opt.state[idle]["momentum_buffer"] = torch.tensor([1e-40, 0.5])
    nn.functional.cross_entropy(model(torch.randn(4, 1, 6, 6)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    ato.after_optimizer_step(opt)
    assert torch.equal(opt.state[idle]["momentum_buffer"], torch.tensor([1e-40, 0.5]))  # only once an epoch
    ato.end_epoch(0)
    assert torch.equal(opt.state[idle]["momentum_buffer"], torch.tensor([0.0, 0.5]))
