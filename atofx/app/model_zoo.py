"""Resolve a model name to `(nn.Module, example input)` for the CLI, the tests and the benchmarks.

A name is either a torchvision classification model (`resnet18`, built with `weights=None`, so
nothing is downloaded) or `package.module:factory`, a zero-argument callable in the user's code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from atofx.core.analysis import EXAMPLE_ADVICE
from atofx.errors import AtofxError, ModelNotFoundError, ShapeError, TraceError

__all__ = [
    "ModelNotFoundError",
    "ZooModel",
    "default_input_size",
    "is_transformer",
    "load",
    "parse_input_size",
    "torchvision_cnns",
    "torchvision_models",
]

_TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")


@dataclass
class ZooModel:
    """A model ready for `atofx.compile(model, example)`."""

    name: str
    model: nn.Module
    example: torch.Tensor


@cache
def torchvision_models() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def is_transformer(name: str) -> bool:
    """ViT, Swin and MaxViT: token-mixing models whose token/embedding dims atofx may pin."""
    return name.startswith(_TRANSFORMER_PREFIXES)


def torchvision_cnns() -> list[str]:
    """Every torchvision classification model except the ViT/Swin/MaxViT families."""
    return [m for m in torchvision_models() if not is_transformer(m)]


def default_input_size(name: str) -> tuple[int, int, int]:
    """The (C, H, W) a torchvision model is built for: 299x299 for inception_v3, else 224x224."""
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def parse_input_size(text: str) -> tuple[int, ...]:
    """Parse `3x32x32` (or `3,32,32`) into a shape without the batch dim."""
    parts = [p for p in re.split(r"[x,×\s]+", text.strip().lower()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims:
        raise AtofxError(f"cannot read input size {text!r}: write the shape without the batch dim, like 3x224x224.")
    if any(d <= 0 for d in dims):
        raise AtofxError(f"input size {text!r} has a dimension of {min(dims)}: every dimension must be at least 1, "
                         "like 3x224x224.")
    return dims


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    kwargs: dict[str, object] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        # The auxiliary classifiers only run in training mode and change the output type;
        # init_weights=False skips their slow truncated-normal init (the weights are random anyway).
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kwargs)


def _import_factory(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelNotFoundError(f"cannot read model {spec!r}: write package.module:factory.")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        # `python -m atofx` puts the current folder on sys.path; the `atofx` script does not, yet the README
        # says to run it from the folder that holds the module
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"cannot import module {module_name!r} for model {spec!r} ({exc}). "
            "Run atofx from the folder that holds it, or put that folder on PYTHONPATH."
        ) from exc
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            hint = difflib.get_close_matches(part, names, n=3)
            raise ModelNotFoundError(
                f"module {module_name!r} has no attribute {attr!r}"
                + (f"; did you mean {', '.join(hint)}?" if hint else ".")
            )
        target = getattr(target, part)
    return target


def _call_factory(spec: str, factory: Callable[[], object]) -> object:
    """`factory()`; an exception of the user's code becomes one line that names the factory."""
    try:
        return factory()
    except AtofxError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        module_name, _, attr = spec.partition(":")
        raise ModelNotFoundError(
            f"{spec} raised {type(exc).__name__}" + (f": {lines[0][:300]}" if lines else "")
            + f". Fix the factory; python -c 'import {module_name}; {module_name}.{attr}()' shows where."
        ) from exc


def _load_factory(spec: str, input_size: tuple[int, ...] | None) -> tuple[nn.Module, torch.Tensor | None]:
    factory = _import_factory(spec)
    if isinstance(factory, nn.Module):
        result: object = factory
    elif callable(factory):
        try:
            inspect.signature(factory).bind()
        except TypeError as exc:
            raise ModelNotFoundError(
                f"{spec} needs arguments ({exc}); atofx calls it with none. Give defaults to its arguments, or "
                "add a function without arguments that calls it with yours (def model(): return factory(...))."
            ) from None
        except ValueError:  # no signature to read (a builtin): call it and see
            pass
        result = _call_factory(spec, factory)
    else:
        raise ModelNotFoundError(f"{spec!r} is a {type(factory).__name__}, not a callable that returns an nn.Module.")
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result  # a factory may return (model, example_input)
    if not isinstance(result, nn.Module):
        raise ModelNotFoundError(f"{spec}() returned a {type(result).__name__}; it must return an nn.Module.")
    if input_size is not None or not isinstance(example, torch.Tensor):
        example = None
    return result, example


def unknown_model(name: str, others: Sequence[str] = (), offer: str = "") -> ModelNotFoundError:
    """The error for a model name atofx cannot build: the closest of `others` and torchvision's names, then `offer`
    (what the user may give instead)."""
    close = difflib.get_close_matches(name, [*others, *torchvision_models()], n=3, cutoff=0.5)
    return ModelNotFoundError(f"unknown model {name!r}: " + (f"did you mean {', '.join(close)}? " if close else "")
                              + offer)


def misfit(exc: ShapeError, advice: str) -> ShapeError:
    """`exc` for a command-line user, who passes no example inputs: the API's advice replaced by `advice`."""
    return ShapeError(f"{str(exc).removesuffix(' ' + EXAMPLE_ADVICE)} {advice}")


def untraceable(exc: TraceError, named: str) -> TraceError:
    """`exc` for a command-line user, who named the model as `named` and cannot pass atofx.compile's keywords
    (leaf_modules, concrete_args) that its advice offers."""
    what = str(exc).split(" Fix:")[0].rstrip(".")
    return TraceError(f"{what}. {named} must trace with torch.fx: make its factory return a model without branches "
                      "on tensor values, or use the Python API, where atofx.compile(model, leaf_modules=[...]) keeps "
                      "such a layer opaque.")


def load(name: str, input_size: tuple[int, ...] | None = None, batch: int = 1, seed: int = 0) -> ZooModel:
    """Build model `name` (a torchvision name or `package.module:factory`) and a random example batch.

    `input_size` is the shape without the batch dim; by default the torchvision size, and for a
    factory 3x224x224 unless the factory returns `(model, example_input)` itself.
    """
    torch.manual_seed(seed)
    example: torch.Tensor | None = None
    if ":" in name:
        model, example = _load_factory(name, input_size)
    elif name in torchvision_models():
        model = _build_torchvision(name)
    else:
        raise unknown_model(name, offer="Give a torchvision classification model name (python -c 'import torchvision; "
                            "print(torchvision.models.list_models())') or your own as package.module:factory.")
    if example is None:
        size = input_size or (default_input_size(name) if ":" not in name else (3, 224, 224))
        example = torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))
    return ZooModel(name, model, example)
