"""ONNX export of a (pruned) model, checked against PyTorch before the file is kept.

A pruned model is an ordinary `nn.Module` (or the GraphModule `atofx.load` rebuilds), so torch's own exporter
handles it; this module adds a batch dimension that stays dynamic, a clear error when the exporter's packages
are missing, and a check of the exported graph's outputs with onnx's reference evaluator.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atofx.core.files import require_folder_of
from atofx.core.nested import as_tuple, on_device_of
from atofx.errors import AtofxError, ShapeError

ONNX_PACKAGES = "pip install onnx onnxscript (or pip install -e '.[onnx]' in a clone)"
TOLERANCE = 1e-4  # relative max-abs difference allowed between ONNX and PyTorch outputs
ANSI_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # the exporter colours its messages for a terminal


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message without terminal colour codes (its type's name if empty)."""
    text = ANSI_CODES.sub("", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  torch's ONNX exporter builds its graph with it
    except ImportError as exc:
        raise AtofxError(f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
                         f"{ONNX_PACKAGES}.") from None
    return onnx


def export_onnx(model: nn.Module, path: str | Path, example_inputs: Any, check: bool = True) -> float | None:
    """Write `model` in eval mode as ONNX to `path`, with a dynamic batch dim on every input.

    With `check`, runs the file with onnx's reference evaluator on the example inputs and raises AtofxError if its
    outputs differ from PyTorch's by more than 1e-4 (relative max-abs); returns that difference (None unchecked).
    Every submodule's train/eval mode is what it was before the call.
    """
    onnx = _require_onnx()
    require_folder_of(Path(path).expanduser())  # else the exporter fails on a temporary file of its own
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _export_checked(onnx, model.eval(), Path(path), example_inputs, check)
    finally:
        for m, training in modes:
            m.training = training


def _export_checked(onnx: Any, model: nn.Module, path: Path, example_inputs: Any, check: bool) -> float | None:
    inputs = on_device_of(model, as_tuple(example_inputs))
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    _check_runs(model, inputs)  # before the exporter, whose failure would only say that tracing failed
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=names, output_names=["output"],
                              dynamic_shapes=tuple({0: batch} for _ in inputs), verbose=False)
    except Exception as exc:  # the exporter fails in many ways; its first line says which op
        raise AtofxError(f"torch.onnx.export failed: {first_line(exc)[:300]}") from exc
    if not check:
        return None
    from onnx.reference import ReferenceEvaluator

    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded)
    with torch.no_grad():
        expected = model(*inputs)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    got = ReferenceEvaluator(loaded).run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs,
                                                                                            strict=True)})[0]
    diff = float((torch.as_tensor(got) - expected.cpu()).abs().max() / expected.abs().max().clamp_min(1e-12))
    if diff > TOLERANCE:
        raise AtofxError(f"the ONNX file {path} differs from the PyTorch model by {diff:.1e} (relative max-abs); "
                         "please report it with the model.")
    return diff


def _check_runs(model: nn.Module, inputs: tuple) -> None:
    """Run the model once on the example inputs: a misfit (say 3 channels for a 1-channel model) is a ShapeError
    naming the shapes and the model's own error, not a failure deep inside torch.export."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # conv/linear shape errors are RuntimeErrors; a model's own checks raise anything
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        raise ShapeError(f"the example input of shape {shapes} does not fit the model: {first_line(exc)[:300]}") \
            from exc
