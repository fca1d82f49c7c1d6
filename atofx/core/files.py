"""Files atofx writes and reads: written atomically, read with torch.load(weights_only=True), code refused."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from atofx.errors import AtofxError, UnsafeCheckpointError

# pickle opcodes that import or call something: the weights-only reader refusing one of these means code
_CODE_OPCODES = {op[0] for op in (pickle.GLOBAL, pickle.STACK_GLOBAL, pickle.INST, pickle.OBJ, pickle.REDUCE,
                                  pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.BUILD)}
_CODE_MESSAGE = re.compile(r"global|reduce|can only create new object|can only build|persistent", re.IGNORECASE)


_TORCH_ADVICE = ("Weights only load failed", "Check the documentation of torch.load")  # torch's words, not the reason


def _reader_text(exc: BaseException) -> str:
    """What torch's weights-only reader itself said, without the advice torch puts around it (before the reader's
    "WeightsUnpickler error:", or in paragraphs of its own around a blocked module's, as torch 2.14 words it)."""
    text = str(exc).split("WeightsUnpickler error:")[-1]
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(_TORCH_ADVICE))


def carries_code(exc: pickle.UnpicklingError) -> bool:
    """Whether torch.load(weights_only=True) refused a file for what it would import or call, not for damage.

    Every refusal mentions `weights_only`; a damaged or foreign file fails on an opcode that runs nothing.
    """
    msg = str(exc)
    operand = re.search(r"Unsupported operand (\d+)", msg)
    if operand is not None:
        return int(operand.group(1)) in _CODE_OPCODES
    return _CODE_MESSAGE.search(_reader_text(exc)) is not None


# failures to reach a file, which say nothing about what is in it: they propagate as Python raised them
ACCESS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def load_failure(exc: BaseException) -> str:
    """Why torch.load refused a file, in one line: the weights-only reader's own reason, without the advice torch
    wraps around it (which suggests `weights_only=False`, the load atofx exists not to make)."""
    line = next((s.strip() for s in _reader_text(exc).splitlines() if s.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def safe_load(path: str | Path, refused: str) -> Any:
    """torch.load(weights_only=True) on the CPU; a file that carries code raises UnsafeCheckpointError, its message
    `refused` (what the user can do) after the path. Any other failure propagates as torch raised it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if carries_code(exc):
            raise UnsafeCheckpointError(f"{path} {refused} ({load_failure(exc)})") from exc
        raise


def require_folder_of(path: Path) -> None:
    """AtofxError unless the folder `path` goes in exists: said before any work, not by the writer at the end."""
    if not path.parent.is_dir():
        raise AtofxError(f"cannot write {path}: the folder {path.parent} does not exist; create it first, or give "
                         "another path.")


def make_folder(path: Path, hint: str) -> None:
    """`path` and its parents as folders, or AtofxError: why not, then `hint` (what the user can do instead)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only place, a path through a file
        reason = "a file of that name exists" if path.is_file() else (exc.strerror or type(exc).__name__).lower()
        raise AtofxError(f"cannot make the folder {path}: {reason}; {hint}.") from exc


def atomic_save(payload: Any, path: Path, previous: Path | None = None) -> Path:
    """torch.save through a temporary file, so `path` is always whole; the old `path` becomes `previous` if given."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    if previous is not None and path.exists():
        path.replace(previous)
    tmp.replace(path)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file, so an interrupt never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
