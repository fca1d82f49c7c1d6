"""Every error atofx raises on purpose; each message says what to do next."""

from __future__ import annotations


class AtofxError(Exception):
    """Base class: catch this to handle anything atofx refuses to do."""


class TraceError(AtofxError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class ShapeError(AtofxError):
    """Example inputs or a batch do not fit the model."""


class ConfigError(AtofxError):
    """An argument is out of its range: target_flops, epochs, method, device, ..."""


class DataError(AtofxError):
    """A data loader cannot be used for training: empty, or without a length and indexing."""


class DatasetError(DataError):
    """A dataset is missing, incomplete or could not be downloaded."""


class ModelNotFoundError(AtofxError):
    """A model name that is neither a torchvision classification model nor an importable factory."""


class NoPrunableSpaceError(AtofxError):
    """The analysis found no channel space that can be pruned."""


class EquivalenceError(AtofxError):
    """The pruned model does not reproduce the masked model's outputs."""


class SurgeryError(AtofxError):
    """The rewrite pass cannot remove the chosen channels from a layer (an analysis bug: please report it)."""


class OpTableError(AtofxError):
    """The op table declares an op twice or inconsistently (an error in an added entry)."""


class UnsafeCheckpointError(AtofxError):
    """A checkpoint or saved model carries code; it was refused without running it."""


class MaskError(AtofxError):
    """A mask does not fit the model's channel spaces."""


class AtofxWarning(UserWarning):
    """Something runs but probably not as the user hopes (the command line prints it as `atofx: warning:`)."""


class ScheduleWarning(AtofxWarning):
    """The training schedule leaves ATO's controller too little to learn its mask from. `diagnosis` says why, apart
    from the advice, which each interface words in its own terms (keywords in Python, flags on the command line)."""

    def __init__(self, diagnosis: str, advice: str) -> None:
        super().__init__(f"{diagnosis} {advice}")
        self.diagnosis = diagnosis
