"""`Analysis`: a model traced and analysed, with everything the passes found (graph, ZIGs, FLOPs model, example
inputs) and what can be done with that alone: masks, pinning, FLOPs of a mask, pruning.

Training (`atofx.ato`) takes an `Analysis`; `ATOModel`, the analysis that trains itself, builds on this class.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from atofx.core.mask import Mask
from atofx.core.nested import as_tuple, describe, map_tensors, on_device_of
from atofx.core.pruning import pruned, zero_dropped
from atofx.errors import AtofxError, ConfigError, ShapeError
from atofx.passes.dependency import ChannelDependencyPass, ChannelFacts
from atofx.passes.flops import FlopsModel, FlopsProp
from atofx.passes.shape_prop import NodeFailed, ShapeProp
from atofx.passes.tracing import LeafSpec, mode_branches, trace_graph
from atofx.passes.values import evaluating
from atofx.passes.zig_inference import ChannelSpace, ZIGSet, infer_zigs

A = TypeVar("A", bound="Analysis")


def _node_kind(root: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))


# the Python API's advice when the model fails on its example inputs (the command line words its own)
EXAMPLE_ADVICE = "Pass example_inputs shaped like one real batch (a tuple with one entry per forward argument)."

class Analysis:
    """A model traced by atofx: its graph, and once analysed its ZIGs, channel spaces and FLOPs model."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule | fx.Graph,
                 trace_options: dict[str, Any] | None = None):
        """`graph_module`: `model` traced, as a GraphModule or as a bare Graph (its GraphModule is built on first use)."""
        self.model = model
        is_module = isinstance(graph_module, fx.GraphModule)
        self.graph: fx.Graph = graph_module.graph if is_module else graph_module
        self._graph_module: fx.GraphModule | None = graph_module if is_module else None
        self.trace_options = trace_options or {}
        self.mask: Mask | None = None
        self.example_inputs: tuple | None = None
        self.example_output: Any = None
        self._facts: ChannelFacts | None = None
        self._zigs: ZIGSet | None = None
        self._flops: FlopsModel | None = None
        self.traced_in_train_mode = model.training  # the branch on `training` fx recorded, where the forward has one

    @classmethod
    def traced(cls: type[A], model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
               leaf_modules: Iterable[LeafSpec] = (), concrete_args: dict[str, Any] | None = None) -> A:
        """Trace `model` with torch.fx and, given example inputs, analyse it (`atofx.compile`)."""
        if not isinstance(model, nn.Module):
            raise AtofxError(f"atofx.compile expects an nn.Module, got {type(model).__name__}.")
        options = {"leaf_modules": tuple(leaf_modules), "concrete_args": concrete_args}
        if example_inputs is not None:  # lets code that branches on input shapes trace, specialised to them
            options["example_inputs"] = as_tuple(example_inputs)
        analysis = cls(model, trace_graph(model, **options), options)
        if example_inputs is not None:
            analysis.analyze(example_inputs)
        return analysis

    @property
    def graph_module(self) -> fx.GraphModule:
        """The traced model as a GraphModule (generating its code costs more than the analysis needs)."""
        if self._graph_module is None:
            self._graph_module = fx.GraphModule(self.model, self.graph, type(self.model).__name__)
        return self._graph_module

    def _root(self) -> nn.Module:
        """What the graph's targets are paths in: the GraphModule once there is one, else the traced model."""
        return self._graph_module if self._graph_module is not None else self.model

    @property
    def mode_branches(self) -> tuple[str, ...]:
        """The modules ("" the model itself) whose Python branch on `training` makes the graph one mode's only."""
        return mode_branches(self.graph)

    @property
    def analysed(self) -> bool:
        """Whether the ZIGs have been inferred (example inputs given)."""
        return self._zigs is not None

    # ------------------------------------------------------------------ analysis
    def analyze(self: A, example_inputs: Any) -> A:
        """Propagate shapes from `example_inputs` and infer the ZIGs."""
        inputs = self._fill_concrete(as_tuple(example_inputs))
        root = self._root()
        with evaluating(root):
            try:
                try:
                    output = ShapeProp(root, self.graph, shape_only=True).propagate(*inputs)
                except NodeFailed:  # zeros in place of conv outputs upset it, or the inputs are wrong: run for real
                    output = ShapeProp(root, self.graph).propagate(*inputs)
            except NodeFailed as failed:
                shapes = ", ".join(describe(x) for x in inputs)
                cause = str(failed.exc).strip().splitlines()
                raise ShapeError(
                    f"the model failed on the example inputs ({shapes}) at node '{failed.node.name}' "
                    f"({_node_kind(root, failed.node)}): {type(failed.exc).__name__}: "
                    f"{cause[0] if cause else ''}. {EXAMPLE_ADVICE}"
                ) from failed.exc
        self.example_inputs = inputs
        # shapes only: what batches' labels are checked against
        self.example_output = map_tensors(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), output)
        self._facts = ChannelDependencyPass(root, self.graph, leaf_modules=self.trace_options.get("leaf_modules", ())).run()
        self._zigs = infer_zigs(self._facts)
        self._flops = None
        return self

    def _fill_concrete(self, inputs: tuple) -> tuple:
        """fx keeps a placeholder for each concrete arg: give it its value, the user's inputs fill the rest."""
        concrete = self.trace_options.get("concrete_args") or {}
        if not concrete:
            return inputs
        n_placeholders = sum(n.op == "placeholder" for n in self.graph.nodes)
        names = list(inspect.signature(self.model.forward).parameters)  # fx may rename placeholders
        if len(inputs) >= n_placeholders or len(names) != n_placeholders:
            return inputs
        given = iter(inputs)
        return tuple(concrete[name] if name in concrete else next(given, None) for name in names)

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
            with evaluating(self.graph_module):
                FlopsProp(self.graph_module).propagate(*on_device_of(self.graph_module, self.example_inputs))
            self._flops = FlopsModel(self.graph_module, zigs)
        return self._flops

    # ------------------------------------------------------------------ masks and pruning
    def random_mask(self, keep: float = 0.5, seed: int = 0) -> Mask:
        """Keep a random `keep` share of every prunable space (never all of a space dropped)."""
        return Mask.random(self.zigs, keep, seed)

    def spaces_of(self, target: Any) -> list[ChannelSpace]:
        """The channel spaces a target names: a ChannelSpace, a space index or name, or a layer (module or its
        path, like "fc" or "layer1.0.conv1": the spaces it writes; a container: those its layers write)."""
        spaces = self.zigs.spaces
        if isinstance(target, ChannelSpace):
            return [spaces[target.index]]
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < len(spaces):
                raise ConfigError(f"space index {target} is out of range: the model has spaces 0..{len(spaces) - 1} "
                                  "(ato.report() lists them).")
            return [spaces[target]]
        if isinstance(target, nn.Module):
            path = next((name for name, m in self.model.named_modules() if m is target), None)
            if path is None:
                raise ConfigError(f"the {type(target).__name__} given is not a layer of this model; pass one of its "
                                  "modules or a module path like 'fc'.")
            target = path
        if not isinstance(target, str):
            raise ConfigError(f"cannot pin a {type(target).__name__}: give a module, a module path, a space index "
                              "or a ChannelSpace.")
        found = [s for s in spaces if s.name == target]
        found += [s for s in spaces if s not in found
                  and any(p == target or p.startswith(target + ".") for p in s.producers)]
        if not found:
            names = [n for n, _ in self.model.named_modules() if n] + [s.name for s in spaces]
            close = difflib.get_close_matches(target, names, n=3)
            raise ConfigError(f"no layer or channel space {target!r} in the model"
                              + (f"; did you mean {', '.join(close)}?" if close else "; ato.report() lists the spaces."))
        return found

    def pin(self, *targets: Any, reason: str = "pinned by the user") -> list[ChannelSpace]:
        """Never prune the spaces these targets name (see `spaces_of`); they stay pinned for later masks and runs.

        Torch-Pruning's `ignored_layers`: `ato.pin(model.fc)` keeps every output channel of `fc`.
        """
        pinned = [s for t in targets for s in self.spaces_of(t)]
        for s in pinned:
            if not s.pinned:
                s.pinned, s.reason = True, reason
        self._flops = None
        return pinned

    def mask_from_scores(self, scores: dict[int, torch.Tensor], keep: float = 0.5, round_to: int = 1) -> Mask:
        """Keep the best-scored `keep` share of every prunable space; `scores`: one value per ZIG, by space index."""
        return Mask.from_scores(self.zigs, scores, keep, round_to)

    def min_keep(self, max_pruned: float | dict[Any, float] | None) -> dict[int, int]:
        """Fewest ZIGs kept per space index from `max_pruned` (a share for every space, or per target)."""
        if max_pruned is None:
            return {}
        shares = {s.index: max_pruned for s in self.zigs.prunable} if isinstance(max_pruned, (int, float)) else \
            {s.index: share for t, share in dict(max_pruned).items() for s in self.spaces_of(t)}
        out = {}
        for index, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"max_pruned is the share of a space's channels that may go and must be in [0, 1], "
                                  f"got {share} for space {index}.")
            out[index] = max(1, math.ceil((1.0 - share) * self.zigs.spaces[index].width - 1e-9))
        return out

    def flops(self, mask: Mask | None = None) -> float:
        """FLOPs the model would have with `mask` applied (the dense count without one)."""
        keep = mask.as_float() if mask is not None else {}
        return float(self.flops_model(keep))

    def apply_mask(self, mask: Mask) -> None:
        """Zero, in place in the user's model, the parameters of every dropped ZIG."""
        mask.validate(self.zigs)
        zero_dropped(self.model, self.zigs, mask.component_keep(self.zigs))

    def prune(self, mask: Mask | None = None, check: bool = True) -> nn.Module:
        """A physically smaller copy of the model with the dropped channels removed.

        With `check`, the pruned model must reproduce the masked model on the example inputs
        (eval mode, relative max-abs difference <= 1e-5) or `EquivalenceError` names the first
        layer that differs. The returned module keeps the user's classes unless a hard-coded
        channel count in the graph had to change, in which case it is a GraphModule.
        """
        mask = mask if mask is not None else self.mask
        if mask is None:
            raise AtofxError("no mask to prune with: pass one (ato.random_mask(...)) or call ato.train(...) first.")
        return pruned(self.model, self.graph_module, self.zigs, mask, self.example_inputs, self.trace_options, check,
                      self.traced_in_train_mode)
