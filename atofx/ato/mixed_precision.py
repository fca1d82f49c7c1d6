"""How the training loop runs its arithmetic: autocast (bf16, or fp16 with a grad scaler) and channels_last."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from atofx.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepPrecision:
    """Autocast dtype (None: full precision) and memory format of one training run."""

    amp: str | None = None
    channels_last: bool = False

    @classmethod
    def of(cls, amp: str | None, channels_last: bool = False) -> StepPrecision:
        if amp is not None and amp not in AMP_DTYPES:
            raise ConfigError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}.")
        return cls(amp, channels_last)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AMP_DTYPES[self.amp])

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling against underflow; bf16 has float32's range and does not."""
        return torch.amp.GradScaler(device.type) if self.amp == "fp16" else None

    def prepare_model(self, model: nn.Module) -> None:
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    def prepare_inputs(self, inputs: tuple) -> tuple:
        """4-d float inputs in channels_last when the model is; everything else as it is."""
        if not self.channels_last:
            return inputs
        return tuple(_channels_last(x) for x in inputs)


def _channels_last(x: Any) -> Any:
    if isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x
