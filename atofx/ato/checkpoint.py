"""Training checkpoints: written atomically with a checksum, read with weights_only=True, the last good one kept."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atofx.core.files import atomic_save, load_failure, safe_load
from atofx.core.serialization import tensor_checksum
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


def checksum(payload: dict[str, Any]) -> str:
    """SHA-256 over every tensor (`tensor_checksum`, as atofx.save writes) and every other value of `payload`.

    torch.load does not check the zip's CRCs: without it a flipped byte would resume with wrong weights.
    """
    tensors: dict[str, torch.Tensor] = {}
    plain: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensors[where] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}/{k!r}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}/{i}")
        else:
            plain.append(f"{where}={value!r}")

    walk({k: v for k, v in payload.items() if k != "checksum"}, "")
    return hashlib.sha256("\n".join([tensor_checksum(tensors), *plain]).encode()).hexdigest()


def fingerprint(model: torch.nn.Module, config: dict[str, Any], epochs: int, n_batches: int, ranks: int) -> dict[str, Any]:
    """What a checkpoint records of the run that wrote it, for a resume to be checked against: the model's tensor
    shapes (hashed: `hash()` differs per process), ATO's options, the schedule and the number of ranks."""
    shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return {"model": digest, "config": json.dumps(config, sort_keys=True), "epochs": epochs,
            "batches_per_epoch": n_batches, "ranks": ranks}


def write(folder: Path, payload: dict[str, Any]) -> Path:
    """Write `folder/checkpoint.pt` through a temporary file; the previous one becomes checkpoint.prev.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_save(payload | {"checksum": checksum(payload)}, folder / CHECKPOINT, previous=folder / PREVIOUS)


class _Damaged(Exception):
    """A checkpoint that loads but whose contents no longer match the checksum written with them."""


def _read(path: Path) -> dict[str, Any]:
    """One checkpoint, checked against its checksum (files written before checksums load unchecked)."""
    # a file that carries code is not damage (no disk error writes a call to os.system): it is refused, the user decides
    advice = f"Delete it (or the folder {path.parent}) to start afresh."
    if path.name == CHECKPOINT and (path.parent / PREVIOUS).exists():
        advice = f"Delete it to resume from {PREVIOUS}, or delete the folder {path.parent} to start afresh."
    saved = safe_load(path, f"carries code or objects that are not plain tensors and numbers; it was refused without "
                            f"running it. {advice}")
    if not isinstance(saved, dict):
        raise _Damaged(f"it holds a {type(saved).__name__}, not a checkpoint")
    if "checksum" in saved and saved.pop("checksum") != checksum(saved):
        raise _Damaged("its contents do not match the checksum written with them")
    return saved  # as it was written


def _why(exc: Exception) -> str:
    """Why a checkpoint could not be used: its first sentence (torch adds a paragraph on what may have happened)."""
    return str(exc) if isinstance(exc, _Damaged) else load_failure(exc).split(". ")[0].rstrip(".")


def read_latest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The newest readable checkpoint in `folder` and a note if one was damaged (truncated, or bytes changed).

    A file that carries code is refused (UnsafeCheckpointError), not passed over.
    """
    damaged: list[str] = []
    for name in (CHECKPOINT, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            saved = _read(path)
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or corrupt: fall back to the previous good one
            damaged.append(f"{path} is damaged ({_why(exc)})")
            continue
        resumed = f"resuming from the previous checkpoint, {name} (epoch {saved.get('epoch')})"
        return saved, f"{damaged[0]}; {resumed}" if damaged else None
    if not damaged:
        return None, None
    return None, "; ".join(damaged) + ": no checkpoint can be read, so training starts afresh from epoch 1"


def check_compatible(saved: dict[str, Any], fingerprint: dict[str, Any], folder: Path) -> None:
    """Refuse to resume from a checkpoint written for a different model or configuration, or number of processes."""
    old = saved.get("fingerprint", {})
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if set(diff) <= {"ranks", "batches_per_epoch"}:  # shards, and so batches, differ with the ranks
        check_ranks(saved, fingerprint.get("ranks"), folder)
    if diff:
        raise ConfigError(
            f"the checkpoint in {folder} was written for a different run (differs in: {', '.join(diff)}). "
            "Use a new checkpoint_dir, or delete that folder to start afresh (on the command line: another --out)."
        )


def check_ranks(saved: dict[str, Any], ranks: Any, folder: Path) -> None:
    """Refuse a checkpoint written by another number of processes, saying how to resume it (each process resumes
    its own random streams and share of the data)."""
    written = saved.get("fingerprint", {}).get("ranks")
    if not isinstance(written, int) or written == ranks:
        return

    def count(n: Any) -> str:
        return "one process" if n == 1 else f"{n} processes"

    how = "as one process, without torchrun" if written == 1 else \
        f"with torchrun --nproc_per_node {written} and the same arguments"
    raise ConfigError(f"the checkpoint in {folder} was written by {count(written)} and this run has {count(ranks)}; "
                      f"each process resumes its own random streams and share of the data. Resume it {how}, or delete "
                      f"{folder} to start afresh.")
