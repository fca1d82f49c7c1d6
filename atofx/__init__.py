"""atofx: Auto-Train-Once structural pruning as a torch.fx compiler pass."""

from atofx.errors import (
    AtofxError,
    EquivalenceError,
    MaskError,
    NoPrunableSpaceError,
    ShapeError,
    TraceError,
    UnsafeCheckpointError,
)
from atofx.model import ATOModel, compile
from atofx.passes.zig_inference import ChannelSpace

__all__ = [
    "ATOModel",
    "AtofxError",
    "ChannelSpace",
    "EquivalenceError",
    "MaskError",
    "NoPrunableSpaceError",
    "ShapeError",
    "TraceError",
    "UnsafeCheckpointError",
    "compile",
]
__version__ = "0.1.0"
