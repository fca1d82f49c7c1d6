"""The rewrite pass: physically remove the channels of dropped ZIGs.

Our ZIG analysis decides what goes; each layer's surgery in the op table (`op_rules.OPS`: torch-pruning's
low-level pruning functions for standard layers, our own slicing where torch-pruning's bookkeeping does
not fit, such as grouped convolutions losing whole groups) removes them, and any other parameter or
buffer (a layer scale) is sliced along its dim. The result keeps the user's own classes. Where the graph
hard-codes a channel count (a split size, a channel slice, a view shape), `patch_literals` returns a
GraphModule whose arguments follow the new widths, by the literal patch of each op.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from . import op_rules
from .channel_layout import ChannelLayout
from .registry import Removal
from .zig_inference import ZIGSet


def remove_channels(model: nn.Module, removal: dict[tuple[str, str, int], np.ndarray]) -> None:
    """Apply the removal in place: (module path, parameter, dim) -> indices to drop."""
    by_module: dict[str, Removal] = defaultdict(dict)
    for (module, name, dim), drop in removal.items():
        if len(drop):
            by_module[module][(name, dim)] = drop
    for path, r in by_module.items():
        m = model.get_submodule(path) if path else model
        handled: set[tuple[str, int]] = set()
        surgery = op_rules.OPS.surgery_for(m)
        if surgery is not None:
            with torch.no_grad():
                handled = surgery(m, r)
        for (name, dim), drop in r.items():
            if (name, dim) not in handled:
                op_rules.slice_tensor_attr(m, name, dim, drop)


def prune_copy(model: nn.Module, zigs: ZIGSet, keep_comp: np.ndarray) -> nn.Module:
    """A deep copy of `model` with every dropped ZIG's channels removed."""
    small = copy.deepcopy(model)
    for path, ids in zigs.facts.group_norms.items():  # whole groups go: the analysis unions a group's channels
        m = small.get_submodule(path)
        per_group = m.num_channels // m.num_groups
        m.num_channels = int(keep_comp[zigs.labels[ids]].sum())
        m.num_groups = m.num_channels // per_group
    remove_channels(small, zigs.dropped_indices(keep_comp))
    _retie(small, zigs.facts.aliases)
    return small


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Each layer sharing a tensor sliced its own copy of it (the same rows, unions made sure): point every
    further name back at the first name's tensor, so the pruned model shares it as the original did."""
    for alias, first in aliases.items():
        owner_path, _, name = alias.rpartition(".")
        source_path, _, source_name = first.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        source = model.get_submodule(source_path) if source_path else model
        tensor = getattr(source, source_name)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, name, tensor)
        else:
            owner.register_buffer(name, tensor, persistent=name not in owner._non_persistent_buffers_set)


def patch_literals(gm: fx.GraphModule, small: nn.Module, zigs: ZIGSet, keep_comp: np.ndarray) -> fx.GraphModule | None:
    """A GraphModule over `small` whose hard-coded channel counts follow the pruning; None if none change."""
    graph = copy.deepcopy(gm.graph)

    def kept(lay: ChannelLayout) -> np.ndarray:
        return keep_comp[zigs.labels[lay.ids]]

    changed = False
    for node in graph.nodes:
        if node.name not in zigs.facts.literal_channel_args or node.op not in ("call_function", "call_method"):
            continue
        op = op_rules.OPS.for_node(node, None)
        if op is not None and op.patch is not None:
            changed |= op.patch(node, zigs.facts.layouts, kept)
    if not changed:
        return None
    return fx.GraphModule(small, graph, type(small).__name__)
