"""The op registry: one entry per op holds everything atofx knows about it.

An `Op` names its targets (module classes, functions, `Method` names) and declares, side by side:
its propagation rule (how channels flow through it, for the dependency pass), its surgery (how the
rewrite pass removes channels from a layer of that class), its literal patch (how the rewrite pass
rewrites a channel count the graph hard-codes in a call), its shape shortcut (its output shape from
the input's, for shape propagation) and what saving records of it (the width attributes of a layer; a
function target may be called by a saved graph). `OpTable` indexes the entries for the passes that read
them; the table itself is `op_rules.OPS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from atofx.errors import OpTableError

from .channel_layout import ChannelLayout
from .rule_context import RuleContext

Removal = dict[tuple[str, int], np.ndarray]  # (parameter name, dim) -> indices to drop
Rule = Callable[[RuleContext], Any]
Surgery = Callable[[nn.Module, Removal], set[tuple[str, int]]]  # returns the (parameter, dim) pairs it handled
Kept = Callable[[ChannelLayout], np.ndarray]  # a layout -> which of its positions are kept
LiteralPatch = Callable[[fx.Node, dict[str, Any], Kept], bool]  # (node, layouts by node name, kept) -> changed
ShapeShortcut = Callable[[nn.Module, torch.Tensor], "list[int] | None"]


class Method(NamedTuple):
    """Key for a `call_method` node, e.g. `Method("view")`."""

    name: str


@dataclass(frozen=True)
class Op:
    """Everything atofx knows about one op; every field but `targets` and `kind` is optional.

    rule: returns the output layout and reports unions, pins, slices and FLOPs scaling (none: the op's
      channels are pinned, as for an op not in the table). surgery: a layer class's channel removal, where
      slicing each parameter along its dim would not do (widths to update, torch-pruning's bookkeeping).
      patch: for a function or method, rewrites the channel count it was called with once the rule marked
      it (`ctx.literal_channels`). output_shape: for a plain layer class, its output shape without running
      it. saved_attrs: a layer's integer width attributes, which saving records so a fresh instance can be
      shrunk to fit the file. takes_sizes: its size arguments may be channel counts read off a tensor (`x.view(n,
      x.size(1), -1)`); they follow the pruned widths, where any other use of such a count pins its channels.
    """

    targets: tuple[Any, ...]
    kind: str
    rule: Rule | None = None
    surgery: Surgery | None = None
    patch: LiteralPatch | None = None
    output_shape: ShapeShortcut | None = None
    saved_attrs: tuple[str, ...] = ()
    takes_sizes: bool = False


def _is_layer(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, nn.Module)


def _check(op: Op) -> None:
    """What only makes sense together: a surgery, patch or shortcut needs a rule (the rule decides what goes);
    surgery, shortcut and saved widths are about layers, a patch about a call's arguments."""
    if (op.surgery or op.patch or op.output_shape) and op.rule is None:
        raise OpTableError(f"op '{op.kind}' has a surgery, patch or shape shortcut but no rule; give it a rule.")
    layers = [_is_layer(t) for t in op.targets]
    if (op.surgery or op.output_shape or op.saved_attrs) and not all(layers):
        raise OpTableError(f"op '{op.kind}' declares a surgery, shape shortcut or saved widths for a target that is "
                           "not a layer class; declare functions in an entry of their own.")
    if op.patch and any(layers):
        raise OpTableError(f"op '{op.kind}' declares a literal patch for a layer class; patches rewrite function and "
                           "method calls, so declare the layer in an entry of its own.")


class OpTable:
    """The registry's entries, indexed by target; a target declared twice, or an inconsistent entry, is refused."""

    def __init__(self, entries: Iterable[Op]):
        self.entries: tuple[Op, ...] = tuple(entries)
        self.by_target: dict[Any, Op] = {}
        twice = []
        for op in self.entries:
            _check(op)
            for target in op.targets:
                if target in self.by_target:  # two names of one function (F.channel_shuffle is torch.channel_shuffle)
                    twice.append(f"{target!r} (as '{self.by_target[target].kind}' and as '{op.kind}')")
                self.by_target[target] = op
        if twice:
            raise OpTableError(f"declared twice in the op table: {'; '.join(twice)}. Keep one entry per op.")

    def with_entries(self, *entries: Op) -> OpTable:
        """A new table with `entries` added: how a test or an experiment supports one more op."""
        return OpTable((*self.entries, *entries))

    @property
    def rules(self) -> dict[Any, Op]:
        """Every target that has a propagation rule -> its entry."""
        return {t: op for t, op in self.by_target.items() if op.rule is not None}

    def for_node(self, node: fx.Node, module: nn.Module | None) -> Op | None:
        """The entry that analyses `node`; a layer subclass counts as its base only if it keeps its forward."""
        if node.op == "call_module":
            cls = type(module)
            if cls in self.by_target:
                return self.by_target[cls]
            for base in cls.__mro__[1:]:
                if base in self.by_target and cls.forward is base.forward:
                    return self.by_target[base]
            return None
        if node.op == "call_method":
            return self.by_target.get(Method(str(node.target)))
        if node.op == "call_function":
            try:
                return self.by_target.get(node.target)
            except TypeError:  # an unhashable target
                return None
        return None

    def surgery_for(self, module: nn.Module) -> Surgery | None:
        """The surgery of the first class in the layer's MRO that declares one (a subclass's own forward too)."""
        for cls in type(module).__mro__:
            op = self.by_target.get(cls)
            if op is not None and op.surgery is not None:
                return op.surgery
        return None

    def shape_shortcut(self, cls: type) -> ShapeShortcut | None:
        """The shape shortcut of exactly this class: a subclass may compute something else."""
        op = self.by_target.get(cls)
        return None if op is None else op.output_shape

    def functions(self) -> list[Callable]:
        """Every function target: the functions a saved graph may call."""
        return [t for t in self.by_target if callable(t) and not isinstance(t, type)]

    def saved_attrs(self) -> tuple[str, ...]:
        """Every width attribute a layer entry declares, each once, in declaration order."""
        return tuple(dict.fromkeys(a for op in self.entries for a in op.saved_attrs))
