"""Where ATO's training overhead on digits goes (README, "Training overhead", the 2026-12-01 VM).

Four kinds of epoch: plain `train_epoch` on an eager copy of ResNet-20, plain `train_epoch` on the model ATO
steps (the traced GraphModule), and ATO's loop without and with the projection; the ATO side is
`bench_overhead`'s (`half_dropped_trainer`). Unlike that tool, whole epochs run one after another in rounds on one
thread (the first round warms up). Prints each kind's median epoch and its median ratio to the eager plain epoch.

    python tools/bench_overhead_probe.py
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from bench_overhead import half_dropped_trainer
from torch import nn
from torch.utils.data import DataLoader

from atofx.app.cifar_models import resnet20
from atofx.app.datasets import digits
from atofx.ato.loop import train_one_epoch
from atofx.ato.plain_training import default_optimizer, train_epoch

ROUNDS = 12
CPU = torch.device("cpu")

torch.set_num_threads(1)
torch.manual_seed(0)
model = resnet20(10, 1)
eager = copy.deepcopy(model)
eager_opt, _ = default_optimizer(eager, 10)
trainer, opt = half_dropped_trainer(model, (1, 1, 8, 8))  # bench_overhead's ATO side
loader = DataLoader(digits(0)[0], batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
loss = nn.functional.cross_entropy


def ato_loop(epoch: int, frozen: bool) -> None:
    trainer.state.epoch, trainer.state.frozen = epoch, frozen
    train_one_epoch(trainer, loader, opt, loss)


kinds = {
    "plain, eager model": lambda: train_epoch(eager, loader, eager_opt, loss, CPU),
    "plain, ATO's GraphModule": lambda: train_epoch(trainer.model, loader, opt, loss, CPU),
    "ATO loop, warm-up (no projection)": lambda: ato_loop(0, False),
    "ATO loop, after the window": lambda: ato_loop(trainer.phases.end, True),
}
times: dict[str, list[float]] = {k: [] for k in kinds}
for r in range(ROUNDS):
    for name, epoch in kinds.items():
        started = time.perf_counter()
        epoch()
        if r:
            times[name].append(time.perf_counter() - started)
base = times["plain, eager model"]
for name, t in times.items():
    ratio = statistics.median(a / b for a, b in zip(t, base, strict=True))
    print(f"{name:36s} {statistics.median(t):.3f} s  ratio {ratio:.3f}")
