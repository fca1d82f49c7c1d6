"""Batches: moving them to the device, splitting (inputs, targets), and checking the first batch of an epoch
against the analysed example inputs and the model's output width, so a wrong batch fails with a clear message."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from atofx.core.nested import leaves, map_tensors, shape_of
from atofx.errors import DataError, ShapeError


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on `device`, copied without waiting where the device allows."""
    return map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def split_batch(batch: Any) -> tuple[tuple, Tensor]:
    """(model inputs, targets) from a `(inputs, targets)` batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ShapeError("each batch must be an (inputs, targets) pair; wrap your dataset to yield that.")
    x, y = batch
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def loader_length(loader: Any) -> int:
    """Batches per epoch of a training loader; refused when it has no length or no batch."""
    try:
        n = len(loader)
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            len(dataset)
    except TypeError as exc:
        raise DataError(
            "the training loader has no length (an IterableDataset or a generator): ATO needs a map-style dataset "
            "(__len__ and __getitem__) in a DataLoader, to draw the controller's subset and to resume by epoch."
        ) from exc
    if n == 0:
        raise DataError("the training loader yielded no batch; check the dataset and batch_size/drop_last.")
    return n


def main_output(out: Any) -> Any:
    """The logits of a model output: the tensor itself, a tuple's first entry, a dict's 'logits'/'out' or first."""
    if isinstance(out, (tuple, list)) and out:
        return main_output(out[0])
    if isinstance(out, dict) and out:
        key = next((k for k in ("logits", "out") if k in out), next(iter(out)))
        return main_output(out[key])
    return out


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() or t.is_complex() else "integer"


def check_inputs(example: tuple | None, inputs: tuple) -> list[str]:
    """Refuse batch inputs whose structure, rank or dtype differ from the analysed example inputs.

    Returns the inputs whose sizes (batch dim aside) or precision differ: allowed if the model runs
    on them (another resolution), reported if it does not.
    """
    if example is None:
        return []
    want = [leaf for i, x in enumerate(example) for leaf in leaves(x, f"input {i}")]
    got = [leaf for i, x in enumerate(inputs) for leaf in leaves(x, f"input {i}")]
    if [p for p, _ in want] != [p for p, _ in got]:
        raise ShapeError(
            f"the batch inputs ({', '.join(p for p, _ in got)}) do not match the model's example inputs "
            f"({', '.join(p for p, _ in want)}): each batch must be (inputs, targets) with inputs laid out like "
            "the example inputs given to atofx.compile.")
    resized = []
    for (path, e), (_, g) in zip(want, got, strict=True):
        if not isinstance(e, Tensor) or not isinstance(g, Tensor):
            continue
        if _kind(e) != _kind(g):
            raise ShapeError(
                f"batch {path} is {shape_of(g)} but the model expects {_kind(e)} values like its example "
                f"{shape_of(e)}: convert the batch (x.float() for images, e.g. torchvision's ToTensor).")
        if g.dim() != e.dim():
            raise ShapeError(
                f"batch {path} has shape {tuple(g.shape)} but the model expects {e.dim()} dims like its example "
                f"{tuple(e.shape)} (batch dim first): reshape the batch or pass matching example inputs.")
        if tuple(g.shape[1:]) != tuple(e.shape[1:]) or g.dtype != e.dtype:
            resized.append(f"batch {path} is {shape_of(g)} but the model was analysed with {shape_of(e)} "
                           "(batch dim aside)")
    return resized


def checked_forward(model: nn.Module, inputs: tuple, example: tuple | None) -> Any:
    """`model(*inputs)` for the first batch of an epoch: a batch that does not fit raises ShapeError."""
    resized = check_inputs(example, inputs)
    if not resized:
        return model(*inputs)
    try:
        return model(*inputs)
    except (RuntimeError, ValueError, IndexError) as exc:
        cause = str(exc).strip().splitlines()
        raise ShapeError(f"{'; '.join(resized)}, and the model fails on it ({type(exc).__name__}: "
                         f"{cause[0] if cause else ''}). Make the batches match the model's input.") from None


def check_targets(out: Any, targets: Any, loss_fn: Any) -> None:
    """With a cross-entropy loss: labels are class indices within the output width, or class probabilities.

    `out` is the model's output or the example output's meta tensors (shapes only). One host sync,
    on the first batch of an epoch only.
    """
    if loss_fn is nn.functional.cross_entropy:
        ignore = -100
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        ignore = loss_fn.ignore_index
    else:
        return
    logits = main_output(out)
    if logits is not out:  # cross-entropy (the default loss) takes one tensor
        pick = f"out[{next(iter(out))!r}]" if isinstance(out, dict) else "out[0]"
        raise ShapeError(f"the model returns a {type(out).__name__}, and cross-entropy takes one tensor: pass a "
                         f"loss_fn that picks the logits, e.g. lambda out, y: F.cross_entropy({pick}, y).")
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor) or logits.dim() < 2:
        return
    classes = logits.shape[1]
    expected = f"integer class indices of shape (batch,{' ...' if logits.dim() > 2 else ''}) or class " \
               f"probabilities of shape (batch, {classes}{', ...' if logits.dim() > 2 else ''})"
    if targets.is_floating_point():
        if targets.dim() != logits.dim() or targets.shape[1] != classes:
            raise ShapeError(f"the labels are {shape_of(targets)}; cross-entropy on the model's {classes} outputs "
                             f"expects {expected}: convert class labels with y.long().")
        return
    if _kind(targets) != "integer" or targets.dim() != logits.dim() - 1:
        raise ShapeError(f"the labels are {shape_of(targets)}; cross-entropy on the model's {classes} outputs "
                         f"expects {expected}.")
    if targets.dtype not in (torch.int64, torch.uint8):  # what cross_entropy accepts as class indices
        raise ShapeError(f"the labels are {shape_of(targets)}; cross-entropy takes class indices as int64: convert "
                         "them with y.long() (numpy's int32 labels arrive as int32).")
    bad = (targets != ignore) & ((targets < 0) | (targets >= classes))
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ShapeError(
            f"label {value} is out of range for the model's {classes} outputs (classes 0..{classes - 1}): give the "
            "model as many outputs as the dataset has classes (num_classes), or fix the labels.")


def hits(out: Any, targets: Tensor) -> Tensor:
    """Correct top-1 predictions in a batch (soft labels: their argmax is the class)."""
    pred = main_output(out).detach().argmax(dim=1 if main_output(out).dim() > 1 else -1)
    if targets.is_floating_point() and targets.dim() > 1:
        targets = targets.argmax(dim=1)
    return (pred == targets).sum()
