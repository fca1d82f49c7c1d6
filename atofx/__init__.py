"""atofx: Auto-Train-Once structural pruning as a torch.fx compiler pass."""

from atofx.counting import count_flops, count_params
from atofx.errors import (
    AtofxError,
    AtofxWarning,
    ConfigError,
    DataError,
    EquivalenceError,
    MaskError,
    NoPrunableSpaceError,
    ShapeError,
    TraceError,
    UnsafeCheckpointError,
)
from atofx.mask import Mask
from atofx.model import ATOModel, compile
from atofx.passes.zig_inference import ChannelSpace
from atofx.serialization import load, save
from atofx.trainer import ATOConfig

__all__ = [
    "ATOConfig",
    "ATOModel",
    "AtofxError",
    "AtofxWarning",
    "ConfigError",
    "DataError",
    "ChannelSpace",
    "EquivalenceError",
    "MaskError",
    "NoPrunableSpaceError",
    "ShapeError",
    "TraceError",
    "UnsafeCheckpointError",
    "Mask",
    "compile",
    "count_flops",
    "count_params",
    "load",
    "save",
]
__version__ = "0.1.0"
