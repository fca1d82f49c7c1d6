"""atofx: Auto-Train-Once structural pruning as a torch.fx compiler pass.

The names below are imported on first use (PEP 562), so `atofx --help` and the command line's argument errors
answer without importing torch; `import atofx` then `atofx.compile(...)` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from atofx.errors import (
    AtofxError,
    AtofxWarning,
    ConfigError,
    DataError,
    DatasetError,
    EquivalenceError,
    MaskError,
    ModelNotFoundError,
    NoPrunableSpaceError,
    ShapeError,
    TraceError,
    UnsafeCheckpointError,
)
from atofx.version import __version__

if TYPE_CHECKING:
    from atofx.ato.config import ATOConfig
    from atofx.ato.model import ATOModel, compile
    from atofx.core.counting import count_flops, count_macs, count_params
    from atofx.core.mask import Mask
    from atofx.core.serialization import load, save
    from atofx.passes.zig_inference import ChannelSpace

_LAZY = {
    "count_flops": "atofx.core.counting", "count_macs": "atofx.core.counting", "count_params": "atofx.core.counting",
    "Mask": "atofx.core.mask", "ATOModel": "atofx.ato.model", "compile": "atofx.ato.model",
    "ChannelSpace": "atofx.passes.zig_inference", "load": "atofx.core.serialization", "save": "atofx.core.serialization",
    "ATOConfig": "atofx.ato.config",
}


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (`atofx.core`), when it is first used."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATOConfig",
    "ATOModel",
    "AtofxError",
    "AtofxWarning",
    "ConfigError",
    "DataError",
    "DatasetError",
    "ChannelSpace",
    "EquivalenceError",
    "MaskError",
    "ModelNotFoundError",
    "NoPrunableSpaceError",
    "ShapeError",
    "TraceError",
    "UnsafeCheckpointError",
    "Mask",
    "compile",
    "count_flops",
    "count_macs",
    "count_params",
    "load",
    "save",
    "__version__",
]
