"""Training checkpoints: written atomically, read with weights_only=True, the last good one kept."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atofx.core.files import atomic_save, safe_load
from atofx.errors import ConfigError, UnsafeCheckpointError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.as_tensor(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(folder: Path, payload: dict[str, Any]) -> Path:
    """Write `folder/checkpoint.pt` through a temporary file; the previous one becomes checkpoint.prev.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_save(payload, folder / CHECKPOINT, previous=folder / PREVIOUS)


def _read(path: Path) -> dict[str, Any]:
    return safe_load(path, "carries code or non-tensor objects; it was refused without running it. "
                           "Delete it (or the whole checkpoint folder) to start afresh.")


def read_latest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The newest readable checkpoint in `folder` and a note if the newest one was damaged."""
    note = None
    for name in (CHECKPOINT, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            return _read(path), note
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or corrupt: fall back to the previous good one
            note = f"{path} is damaged ({type(exc).__name__}); resuming from the previous checkpoint"
    return None, note


def check_compatible(saved: dict[str, Any], fingerprint: dict[str, Any], folder: Path) -> None:
    """Refuse to resume from a checkpoint written for a different model or configuration."""
    old = saved.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        raise ConfigError(
            f"the checkpoint in {folder} was written for a different run (differs in: {', '.join(diff)}). "
            "Use a new checkpoint_dir, or delete that folder to start afresh."
        )
