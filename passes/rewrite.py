"""The rewrite pass: physically remove the channels of dropped ZIGs.

Our ZIG analysis decides what goes; torch-pruning's low-level pruning functions do the
surgery on standard layers, and a few layers whose bookkeeping torch-pruning does not cover
(grouped convolutions losing whole groups, GroupNorm with one channel per group, bare
parameters such as a layer scale) are sliced here. The result keeps the user's own classes.
Where the graph hard-codes a channel count (a split size, a channel slice, a view shape),
`patch_literals` returns a GraphModule whose arguments follow the new widths.
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .channel_layout import ChannelLayout
from .zig_inference import ZIGSet

Removal = dict[tuple[str, int], np.ndarray]  # (parameter name, dim) -> indices to drop


def _keep(size: int, drop: np.ndarray) -> torch.Tensor:
    mask = np.ones(size, dtype=bool)
    mask[drop] = False
    return torch.as_tensor(np.flatnonzero(mask))


def slice_tensor_attr(owner: nn.Module, name: str, dim: int, drop: np.ndarray) -> None:
    """Remove indices `drop` along `dim` of a parameter or buffer, keeping its kind."""
    old = getattr(owner, name)
    data = old.detach().index_select(dim, _keep(old.shape[dim], drop).to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(data, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(name, data, persistent=name not in owner._non_persistent_buffers_set)


def _ids(drop: np.ndarray | None) -> list[int]:
    return [] if drop is None else [int(i) for i in drop]


def _conv(m: nn.Module, r: Removal) -> set[tuple[str, int]]:
    out_dim, in_dim = (1, 0) if m.transposed else (0, 1)
    out, inp = r.get(("weight", out_dim)), r.get(("weight", in_dim))
    if m.groups == 1:
        if out is not None and len(out):
            tp.prune_conv_out_channels(m, _ids(out))
        if inp is not None and len(inp):
            tp.prune_conv_in_channels(m, _ids(inp))
        return {("weight", 0), ("weight", 1), ("bias", 0)}
    if m.transposed or (inp is not None and len(inp)):
        raise ValueError(f"cannot remove input channels inside the groups of {m}")
    if out is not None and len(out):
        per_group_out, per_group_in = m.out_channels // m.groups, m.in_channels // m.groups
        if len(out) % per_group_out:
            raise ValueError(f"dropping {len(out)} channels would split a group of {m}")
        slice_tensor_attr(m, "weight", 0, out)
        if m.bias is not None:
            slice_tensor_attr(m, "bias", 0, out)
        m.groups -= len(out) // per_group_out
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.groups * per_group_in
    return {("weight", 0), ("weight", 1), ("bias", 0)}


def _out_only(fn: Callable[[nn.Module, list[int]], object], names: tuple[str, ...]):
    def prune(m: nn.Module, r: Removal) -> set[tuple[str, int]]:
        drops = [r[(n, 0)] for n in names if (n, 0) in r]
        if drops and len(drops[0]):
            fn(m, _ids(drops[0]))
        return {(n, 0) for n in names}

    return prune


def _linear(m: nn.Linear, r: Removal) -> set[tuple[str, int]]:
    out, inp = r.get(("weight", 0)), r.get(("weight", 1))
    if out is not None and len(out):
        tp.prune_linear_out_channels(m, _ids(out))
    if inp is not None and len(inp):
        tp.prune_linear_in_channels(m, _ids(inp))
    return {("weight", 0), ("weight", 1), ("bias", 0)}


def _group_norm(m: nn.GroupNorm, r: Removal) -> set[tuple[str, int]]:
    drop = next((r[k] for k in (("weight", 0), ("bias", 0)) if k in r), None)
    if drop is not None and len(drop):  # num_channels and num_groups are set by prune_copy, affine or not
        for name in ("weight", "bias"):
            if getattr(m, name, None) is not None:
                slice_tensor_attr(m, name, 0, drop)
    return {("weight", 0), ("bias", 0)}


def _recurrent(m: nn.RNNBase, r: Removal) -> set[tuple[str, int]]:
    """Input features of an RNN/GRU/LSTM: columns of the first layer's input weights, in both directions."""
    names = [n for n in ("weight_ih_l0", "weight_ih_l0_reverse") if (n, 1) in r]
    for name in names:  # RNNBase.__setattr__ keeps its flat weight list in step
        slice_tensor_attr(m, name, 1, r[(name, 1)])
    if names:
        m.input_size = m.weight_ih_l0.shape[1]
    return {(n, 1) for n in names}


_NORM_STATE = ("weight", "bias", "running_mean", "running_var")

SURGERY: dict[type, Callable[[nn.Module, Removal], set[tuple[str, int]]]] = {
    nn.modules.conv._ConvNd: _conv,
    nn.Linear: _linear,
    nn.modules.batchnorm._BatchNorm: _out_only(tp.prune_batchnorm_out_channels, _NORM_STATE),
    nn.modules.instancenorm._InstanceNorm: _out_only(tp.prune_instancenorm_out_channels, _NORM_STATE),
    nn.GroupNorm: _group_norm,
    nn.PReLU: _out_only(tp.prune_prelu_out_channels, ("weight",)),
    nn.RNNBase: _recurrent,
}


def _surgery_for(m: nn.Module):
    for cls in type(m).__mro__:
        if cls in SURGERY:
            return SURGERY[cls]
    return None


def remove_channels(model: nn.Module, removal: dict[tuple[str, str, int], np.ndarray]) -> None:
    """Apply the removal in place: (module path, parameter, dim) -> indices to drop."""
    by_module: dict[str, Removal] = defaultdict(dict)
    for (module, name, dim), drop in removal.items():
        if len(drop):
            by_module[module][(name, dim)] = drop
    for path, r in by_module.items():
        m = model.get_submodule(path) if path else model
        handled: set[tuple[str, int]] = set()
        surgery = _surgery_for(m)
        if surgery is not None:
            with torch.no_grad():
                handled = surgery(m, r)
        for (name, dim), drop in r.items():
            if (name, dim) not in handled:
                slice_tensor_attr(m, name, dim, drop)


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


_FUNCTIONAL_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _patch_groups(node: fx.Node, lay: object, kept: Callable[[ChannelLayout], np.ndarray]) -> bool:
    """A functional grouped conv's literal `groups` becomes the number of whole groups kept."""
    old = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(lay, ChannelLayout) or not isinstance(old, int) or old <= 1:
        return False
    new = int(kept(lay).sum()) // (lay.width // old)
    if new == old:
        return False
    node.update_arg(6, new) if len(node.args) > 6 else node.update_kwarg("groups", new)
    return True


def _patch_num_groups(node: fx.Node, lay: object, kept: Callable[[ChannelLayout], np.ndarray]) -> bool:
    """F.group_norm's literal `num_groups` becomes the number of whole groups kept."""
    old = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups")
    if not isinstance(lay, ChannelLayout) or not isinstance(old, int):
        return False
    new = int(kept(lay).sum()) // (lay.width // old)
    if new == old:
        return False
    node.update_arg(1, new) if len(node.args) > 1 else node.update_kwarg("num_groups", new)
    return True


def _patch_roll(node: fx.Node, lay: object, kept: Callable[[ChannelLayout], np.ndarray]) -> bool:
    """A roll over channels by s moves the last s channels to the front: after pruning, by those of them kept."""
    shifts = node.args[1] if len(node.args) > 1 else node.kwargs.get("shifts")
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if not isinstance(lay, ChannelLayout) or dims is None:
        return False
    as_list = isinstance(shifts, (tuple, list))
    shifts_l, dims_l = (list(shifts), list(dims)) if as_list else ([shifts], [dims])
    nd = len(node.args[0].meta["tensor_meta"].shape)
    k = kept(lay)
    new = [int(k[lay.width - int(sh) % lay.width:].sum()) if (d + nd if d < 0 else d) == lay.dim else sh
           for sh, d in zip(shifts_l, dims_l, strict=True)]
    if new == shifts_l:
        return False
    value = type(shifts)(new) if as_list else new[0]
    node.update_arg(1, value) if len(node.args) > 1 else node.update_kwarg("shifts", value)
    return True


def _patch_shape(node: fx.Node, out: object, kept: Callable[[ChannelLayout], np.ndarray]) -> bool:
    """A view's or reshape's literal size at the output's tracked dim becomes the number of channels kept.

    The size is found by its position, not by its value: in an SK block's `view(n, 2, c, 1, 1)` with c = 2 the
    branch count and the channel count are the same number, and only the channel count may change.
    """
    if not isinstance(out, ChannelLayout):
        return False
    as_tuple = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1]) if as_tuple else list(node.args[1:])
    nd = len(node.meta["tensor_meta"].shape)
    if len(sizes) != nd or not isinstance(sizes[out.dim], int) or sizes[out.dim] != out.width:
        return False  # a -1 or a computed size follows by itself
    new = int(kept(out).sum())
    if new == out.width:
        return False
    sizes[out.dim] = new
    node.update_arg(1, type(node.args[1])(sizes)) if as_tuple else node.update_arg(1 + out.dim, new)
    return True


def patch_literals(gm: fx.GraphModule, small: nn.Module, zigs: ZIGSet, keep_comp: np.ndarray) -> fx.GraphModule | None:
    """A GraphModule over `small` whose hard-coded channel counts follow the pruning; None if none change."""
    graph = copy.deepcopy(gm.graph)
    layouts = zigs.facts.layouts
    changed = False

    def kept(lay: ChannelLayout) -> np.ndarray:
        return keep_comp[zigs.labels[lay.ids]]

    for node in graph.nodes:
        if node.name not in zigs.facts.literal_channel_args:
            continue
        out = layouts.get(node.name)
        if node.op in ("call_function", "call_method") and str(getattr(node.target, "__name__", node.target)) == "split":
            parts = [p for p in out if isinstance(p, ChannelLayout)]
            sizes = [int(kept(p).sum()) for p in parts]
            old = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
            new = sizes[0] if isinstance(old, int) else sizes
            if new != old:
                node.update_arg(1, new) if len(node.args) > 1 else node.update_kwarg("split_size_or_sections", new)
                changed = True
        elif node.target is operator.getitem:
            src, index = node.args
            lay = layouts.get(src.name)
            if not isinstance(lay, ChannelLayout):
                continue
            k = kept(lay)
            items = list(index) if isinstance(index, tuple) else [index]
            pos = lay.dim
            if pos < len(items) and isinstance(items[pos], slice):
                s = items[pos]
                start, stop, step = s.indices(lay.width)
                if step != 1:
                    continue
                new = slice(int(k[:start].sum()), int(k[:stop].sum()))
                if new != slice(s.start, s.stop):
                    items[pos] = new
                    node.update_arg(1, tuple(items) if isinstance(index, tuple) else items[0])
                    changed = True
        elif node.target in _FUNCTIONAL_CONVS:
            changed |= _patch_groups(node, layouts.get(node.args[0].name), kept)
        elif node.target is F.group_norm:
            changed |= _patch_num_groups(node, layouts.get(node.args[0].name), kept)
        elif node.target in (torch.roll, "roll"):
            changed |= _patch_roll(node, layouts.get(node.args[0].name), kept)
        elif (node.op == "call_method" and node.target in ("view", "reshape")) or node.target is torch.reshape:
            changed |= _patch_shape(node, out, kept)
    if not changed:
        return None
    return fx.GraphModule(small, graph, type(small).__name__)
