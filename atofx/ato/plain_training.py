"""Ordinary PyTorch training: the dense reference and the baselines ATO is measured against."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from atofx.ato import distributed
from atofx.ato.batches import split_batch, to_device


def default_optimizer(model: nn.Module, epochs: int, lr: float = 0.1) -> tuple[torch.optim.Optimizer, Any]:
    """SGD (momentum 0.9, nesterov, weight decay 5e-4) with a cosine schedule: the recipe ATO uses too."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                loss_fn: Callable[[Any, Tensor], Tensor], device: torch.device,
                after_step: Callable[[], None] | None = None, before_step: Callable[[], None] | None = None,
                progress: bool = False, desc: str = "") -> float:
    """One epoch of plain training; returns the mean loss. `before_step` runs between backward and the optimiser
    step (a regulariser that edits gradients), `after_step` after the step (a projection). With `progress`, a bar
    over the batches (on a terminal only), with the running loss on the CPU, where reading it costs no wait."""
    model.train()
    total, seen = torch.zeros((), device=device), 0
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True)  # None: a terminal's only
    live_postfix = not bar.disable and device.type == "cpu"
    for step, batch in enumerate(bar):
        inputs, targets = split_batch(to_device(batch, device))
        loss = loss_fn(model(*inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.detach() * len(targets)
        seen += len(targets)
        if live_postfix and step % 20 == 0:
            bar.set_postfix(loss=f"{float(total) / seen:.3f}")
    return float(total) / max(seen, 1)


def train_plain(model: nn.Module, loader: Iterable, epochs: int, device: torch.device, seed: int = 0,
                loss_fn: Callable[[Any, Tensor], Tensor] = nn.functional.cross_entropy,
                progress: bool = False, lr: float = 0.1,
                make_optimizer: Callable[[nn.Module], tuple[torch.optim.Optimizer, Any]] | None = None,
                before_step: Callable[[], None] | None = None) -> nn.Module:
    """Train `model` for `epochs` with the default recipe (or `make_optimizer(model)`'s optimiser and schedule),
    seeded like an ATO run (data-parallel under torchrun); `before_step` as in `train_epoch`. With `progress`, each
    epoch shows a bar over its batches, as ATO's epochs do (rank 0 only)."""
    torch.manual_seed(seed)
    model.to(device)
    distributed.require_sharded(loader, "training")
    opt, sched = make_optimizer(model) if make_optimizer is not None else default_optimizer(model, epochs, lr)
    stepping = distributed.wrap(model, device)
    progress = progress and distributed.current().main
    for epoch in range(epochs):
        distributed.set_epoch(loader, epoch)
        train_epoch(stepping, loader, opt, loss_fn, device, before_step=before_step, progress=progress,
                    desc=f"dense reference, epoch {epoch + 1}/{epochs}")
        distributed.share_buffers(model)
        sched.step()
    return model
