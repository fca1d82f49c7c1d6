"""When a user's learning-rate scheduler steps: after every batch or after every epoch.

PyTorch's OneCycleLR and CyclicLR count batches (their docs step them after each batch); every other scheduler
here steps once an epoch (ReduceLROnPlateau on a loss). A OneCycleLR sized for neither would run a schedule the
user did not ask for (stepped per epoch with `total_steps = epochs * batches` it never leaves its warm-up), so it
is refused.
"""

from __future__ import annotations

from typing import Any

from torch.optim import lr_scheduler

from atofx.errors import ConfigError


def when_to_step(scheduler: Any, epochs: int, batches: int) -> str:
    """When `scheduler` steps: "batch" (after every training batch), "epoch", "metric" (ReduceLROnPlateau: once an
    epoch, on a loss) or "never" (no scheduler)."""
    if scheduler is None:
        return "never"
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        return "metric"
    if isinstance(scheduler, lr_scheduler.CyclicLR):
        return "batch"
    if isinstance(scheduler, lr_scheduler.OneCycleLR):
        if scheduler.total_steps == epochs * batches:
            return "batch"
        if scheduler.total_steps == epochs:
            return "epoch"
        raise ConfigError(f"the OneCycleLR scheduler has total_steps={scheduler.total_steps}, which fits neither "
                          f"stepping: for {epochs} epochs of {batches} batches give total_steps={epochs * batches} "
                          f"(or epochs={epochs}, steps_per_epoch={batches}) to step it after every batch, or "
                          f"total_steps={epochs} to step it once an epoch.")
    return "epoch"
