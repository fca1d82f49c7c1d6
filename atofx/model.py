"""`compile()` and `ATOModel`: the traced model with its channel spaces."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from atofx.errors import AtofxError, ShapeError
from atofx.passes.dependency import ChannelDependencyPass, ChannelFacts
from atofx.passes.flops import FlopsModel, FlopsProp
from atofx.passes.tracing import LeafSpec, trace
from atofx.passes.zig_inference import ChannelSpace, ZIGSet, infer_zigs


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class _EvalNoGrad:
    """Run a model in eval mode without autograd, restoring its training flags afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for m, mode in self.modes.items():
            m.training = mode


class ATOModel:
    """A model traced by atofx: its graph, its ZIGs and channel spaces."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule):
        self.model = model
        self.graph_module = graph_module
        self.example_inputs: tuple | None = None
        self._facts: ChannelFacts | None = None
        self._zigs: ZIGSet | None = None
        self._flops: FlopsModel | None = None

    # ------------------------------------------------------------------ analysis
    def analyze(self, example_inputs: Any) -> ATOModel:
        """Propagate shapes from `example_inputs` and infer the ZIGs."""
        inputs = _as_tuple(example_inputs)
        with _EvalNoGrad(self.graph_module):
            try:
                ShapeProp(self.graph_module).propagate(*inputs)
            except Exception as exc:
                shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                                   for x in inputs)
                raise ShapeError(
                    f"the model failed on the example inputs ({shapes}): {type(exc).__name__}: {exc}. "
                    "Pass example_inputs shaped like one real batch (a tuple with one entry per forward argument)."
                ) from exc
        self.example_inputs = inputs
        self._facts = ChannelDependencyPass(self.graph_module).run()
        self._zigs = infer_zigs(self._facts)
        self._flops = None
        return self

    @property
    def zigs(self) -> ZIGSet:
        if self._zigs is None:
            raise AtofxError(
                "the model has not been analysed yet: pass example_inputs to atofx.compile(), "
                "or call ato.analyze(batch_inputs)."
            )
        return self._zigs

    @property
    def spaces(self) -> list[ChannelSpace]:
        """Every channel space, prunable and pinned, in graph order."""
        return self.zigs.spaces

    @property
    def flops_model(self) -> FlopsModel:
        """The differentiable FLOPs model P(keep), built on first use."""
        if self._flops is None:
            zigs = self.zigs
            with _EvalNoGrad(self.graph_module):
                FlopsProp(self.graph_module).propagate(*self.example_inputs)
            self._flops = FlopsModel(self.graph_module, zigs)
        return self._flops

    # ------------------------------------------------------------------ presentation
    def report(self) -> str:
        """A table: space, width, producers, consumers, share of FLOPs, pinned and why."""
        from atofx.report import spaces_table

        return spaces_table(self)

    def visualize(self, path: str | Path) -> Path:
        """Draw the graph, one colour per space; returns the file written (.dot without graphviz)."""
        from atofx.visualize import draw_spaces

        return draw_spaces(self, Path(path))


def compile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> ATOModel:
    """Trace `model` with torch.fx and, given example inputs, infer its zero-invariant groups."""
    if not isinstance(model, nn.Module):
        raise AtofxError(f"atofx.compile expects an nn.Module, got {type(model).__name__}.")
    ato = ATOModel(model, trace(model, leaf_modules, concrete_args))
    if example_inputs is not None:
        ato.analyze(example_inputs)
    return ato
