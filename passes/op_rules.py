"""The op table: one `Op` entry per op, holding all atofx knows about it (see `registry.py`).

For each op this module holds its propagation rule (how channel positions flow from its inputs to its
outputs: the rule returns the output layout and reports unions, pins, parameter slices and FLOPs
scaling through the `RuleContext`), and where the op needs them, its surgery, its literal patch and
its shape shortcut, each written next to its rule; `OPS` at the end declares them together. An op not
in the table pins every channel it touches (see `ChannelDependencyPass`). Supporting an op is one
`Op` entry here and one test case in tests/passes/test_op_rules.py.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

from atofx.errors import SurgeryError

from .channel_layout import ChannelLayout, concat, reshape_groups
from .registry import Kept, Method, Op, OpTable, Removal, ShapeShortcut, Surgery
from .rule_context import RuleContext, output_shapes, tensor_shape


def _ndim(ctx: RuleContext, value: Any) -> int:
    shape = ctx.shape(value)
    return len(shape) if shape is not None else 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _require_zero(ctx: RuleContext, lay: ChannelLayout, consumer: str) -> None:
    """A consumer that sums over channels needs dropped channels to be exactly zero."""
    bad = ~lay.zero
    if bad.any():
        ctx.pin(lay.ids[bad], f"channel is not zero when its group is zeroed (a non-zero-preserving op before {consumer})")


def _pinned_passthrough(ctx: RuleContext, lay: ChannelLayout, reason: str) -> ChannelLayout:
    ctx.pin(lay.ids, reason)
    return lay.with_zero(False)


# ---------------------------------------------------------------- elementwise


def unary(zero_preserving: bool | Callable[[RuleContext], bool]) -> Callable[[RuleContext], Any]:
    """Elementwise op on its first argument; `zero_preserving` says whether f(0) == 0."""

    def propagate(ctx: RuleContext) -> Any:
        lay = ctx.layout(ctx.arg(0, "input"))
        if lay is None:
            return None
        out_nd, in_nd = len(ctx.out_shape or ()), _ndim(ctx, ctx.arg(0, "input"))
        keeps = zero_preserving(ctx) if callable(zero_preserving) else zero_preserving
        out = lay.at(lay.dim + out_nd - in_nd)
        return out if keeps else out.with_zero(False)

    return propagate


def _hardtanh_keeps_zero(ctx: RuleContext) -> bool:
    m = ctx.module
    if m is not None:
        return m.min_val <= 0 <= m.max_val
    lo, hi = ctx.arg(1, "min_val", -1.0), ctx.arg(2, "max_val", 1.0)
    return not isinstance(lo, fx.Node) and not isinstance(hi, fx.Node) and lo <= 0 <= hi


def _clamp_keeps_zero(ctx: RuleContext) -> bool:
    lo, hi = ctx.arg(1, "min"), ctx.arg(2, "max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return False
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def _threshold_keeps_zero(ctx: RuleContext) -> bool:
    m = ctx.module
    return m.threshold < 0 or m.value == 0


def prelu(ctx: RuleContext) -> Any:
    lay = ctx.layout(ctx.arg(0, "input"))
    if lay is None:
        return None
    if ctx.module.num_parameters > 1:
        if lay.dim != 1:
            return _pinned_passthrough(ctx, lay, "PReLU weight is not on the tracked channel dim")
        ctx.param_slice(str(ctx.node.target), "weight", 0, lay.ids, "in")
    return lay


class _Operand(NamedTuple):
    value: Any
    layout: ChannelLayout | None
    shape: torch.Size | None


def binary(kind: str) -> Callable[[RuleContext], Any]:
    """add / sub / mul / div with broadcasting; `kind` is one of those four words."""

    def propagate(ctx: RuleContext) -> Any:
        out_shape = ctx.out_shape
        if out_shape is None:
            return _sequence_op(ctx, kind)
        operands = [ctx.arg(0, "input"), ctx.arg(1, "other")]
        ops = [_Operand(v, ctx.layout(v), ctx.shape(v)) for v in operands]
        nd = len(out_shape)
        tracked = [(i, o) for i, o in enumerate(ops) if o.layout is not None]
        if not tracked:
            return None
        dims = {o.layout.dim + nd - len(o.shape) for _, o in tracked}
        if len(dims) > 1:
            reason = f"{kind} combines tensors whose channels lie on different dims"
            ctx.pin_inputs(reason)
            return ctx.fresh_like_output(reason)
        (dim,) = dims
        width = out_shape[dim]
        full = [(i, o) for i, o in tracked if o.layout.width == width]
        for _, o in tracked:
            if o.layout.width != width:
                ctx.pin(o.layout.ids, f"a single channel broadcast across {width} channels by {kind}")
        if not full:
            return None
        lead = full[0][1].layout
        for _, o in full[1:]:
            ctx.facts.union(lead.ids, o.layout.ids)
        zeros = [o.layout.zero for _, o in full]
        if kind == "mul":
            zero = np.logical_or.reduce(zeros)
        else:
            zero = np.logical_and.reduce(zeros) if kind in ("add", "sub") else zeros[0].copy()
        if kind == "div" and any(i == 1 for i, _ in tracked):
            ctx.pin(lead.ids, "a channel used as a divisor")
            zero = np.zeros_like(zero)
        for i, o in enumerate(ops):
            if o.layout is not None and o.layout.width == width:
                continue
            zero = _untracked_operand(ctx, kind, i, o, dim, nd, width, lead, zero)
        return ChannelLayout(dim, lead.ids, np.asarray(zero, dtype=bool))

    return propagate


def _as_sequence(ctx: RuleContext, value: Any) -> list | None:
    """Layouts of a tuple-valued node or of a Python tuple/list of nodes; None for anything else."""
    if isinstance(value, fx.Node):
        found = ctx.facts.layouts.get(value.name)
        return list(found) if isinstance(found, (tuple, list)) else None
    if isinstance(value, (tuple, list)):
        return [ctx.layout(v) for v in value]
    return None


def _sequence_op(ctx: RuleContext, kind: str) -> Any:
    """`+` on tuples (e.g. `parts[1:] + parts[:1]`) concatenates them; other sequence arithmetic pins."""
    seqs = [_as_sequence(ctx, ctx.arg(i, n)) for i, n in ((0, "input"), (1, "other"))]
    if kind == "add" and all(x is not None for x in seqs):
        return tuple(seqs[0] + seqs[1])
    ctx.pin_inputs(f"{kind} on a sequence of tensors")
    return None


def _untracked_operand(
    ctx: RuleContext, kind: str, index: int, o: _Operand, dim: int, nd: int, width: int,
    lead: ChannelLayout, zero: np.ndarray,
) -> np.ndarray:
    """Effect of a scalar, constant or parameter operand on the tracked channels."""
    if kind == "div" and index == 0:  # something divided by the channel
        ctx.pin(lead.ids, "a channel used as a divisor")
        return np.zeros_like(zero)
    if o.shape is None:  # a Python number or size arithmetic
        nonzero = isinstance(o.value, fx.Node) or o.value != 0
        return np.zeros_like(zero) if kind in ("add", "sub") and nonzero else zero
    own_dim = dim - (nd - len(o.shape))
    per_channel = own_dim >= 0 and o.shape[own_dim] == width and width > 1
    if not per_channel:
        return np.zeros_like(zero) if kind in ("add", "sub") else zero
    attr = ctx.attr_path(o.value)
    if attr is None:
        ctx.pin(lead.ids, f"{kind} with a computed per-channel tensor that cannot be sliced")
        return np.zeros_like(zero)
    owner, name, is_param = attr
    if kind == "div":
        ctx.param_slice(owner, name, own_dim, lead.ids, "in")
        return zero
    ctx.param_slice(owner, name, own_dim, lead.ids, "out" if is_param else "in")
    if kind == "mul":
        return np.ones_like(zero) if is_param else zero
    return zero if is_param else np.zeros_like(zero)


# ---------------------------------------------------------------- surgery helpers


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


def _tp() -> Any:
    """torch-pruning, imported at the first surgery: with timm installed its import takes 0.5 s warm and up to 3.6 s
    cold, which every process's first `atofx.compile` would otherwise pay."""
    import torch_pruning

    return torch_pruning


def _out_only(fn: str, names: tuple[str, ...]) -> Surgery:
    """A surgery by torch-pruning's out-channel function `fn`, for layers whose state is per channel."""

    def prune(m: nn.Module, r: Removal) -> set[tuple[str, int]]:
        drops = [r[(n, 0)] for n in names if (n, 0) in r]
        if drops and len(drops[0]):
            getattr(_tp(), fn)(m, _ids(drops[0]))
        return {(n, 0) for n in names}

    return prune


def _literal(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _set_literal(node: fx.Node, index: int, name: str, value: Any) -> None:
    node.update_arg(index, value) if len(node.args) > index else node.update_kwarg(name, value)


# ---------------------------------------------------------------- layers with weights


def _weight_ref(ctx: RuleContext, weight_arg: Any, bias_arg: Any) -> tuple[str, str, str | None] | None:
    """(owner, weight name, bias name) for a module or a functional call on get_attr params."""
    if ctx.module is not None:
        bias = "bias" if getattr(ctx.module, "bias", None) is not None else None
        return str(ctx.node.target), "weight", bias
    w = ctx.attr_path(weight_arg)
    if w is None:
        return None
    b = ctx.attr_path(bias_arg) if bias_arg is not None else None
    if bias_arg is not None and (b is None or b[0] != w[0]):
        return None
    return w[0], w[1], b[1] if b else None


def conv(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if ctx.module is not None:
        weight_shape, groups = ctx.module.weight.shape, ctx.module.groups
        ref = _weight_ref(ctx, None, None)
    else:
        weight_shape = ctx.shape(ctx.arg(1, "weight"))
        groups = ctx.arg(6, "groups", 1)
        ref = _weight_ref(ctx, ctx.arg(1, "weight"), ctx.arg(2, "bias"))
        in_shape = ctx.shape(x)
        if isinstance(groups, fx.Node) and in_shape is not None and weight_shape is not None:
            groups = int(in_shape[1]) // int(weight_shape[1])  # computed from the input: it follows the pruning
        elif isinstance(groups, int) and groups > 1:
            ctx.literal_channels("groups")
    out_shape = ctx.out_shape
    if out_shape is None or weight_shape is None or isinstance(groups, fx.Node):
        return ctx.fresh_like_output("convolution with unknown shapes")
    cout = int(weight_shape[0])
    if lay is not None and lay.dim != 1:
        ctx.pin(lay.ids, "convolution over the tracked dim")
        lay = None
    if ref is None:
        ctx.pin_inputs("convolution with a computed weight")
        return ctx.fresh(1, cout, pinned="convolution with a computed weight")
    owner, weight, bias = ref
    if groups == 1:
        if lay is not None:
            _require_zero(ctx, lay, f"conv '{owner}'")
            ctx.param_slice(owner, weight, 1, lay.ids, "in")
        out = ctx.fresh(1, cout)
        ctx.counts_flops("in*out", x)
    else:
        if lay is None:
            return ctx.fresh(1, cout, pinned="grouped convolution over an untracked input")
        by_group = lay.ids.reshape(groups, -1)
        ctx.facts.union(by_group[:, :1], by_group)
        out = ChannelLayout(1, np.repeat(by_group[:, 0], cout // groups), np.ones(cout, dtype=bool))
        ctx.counts_flops("out", x)
    ctx.param_slice(owner, weight, 0, out.ids, "out")
    if bias:
        ctx.param_slice(owner, bias, 0, out.ids, "out")
    return out


def conv_transpose(ctx: RuleContext) -> Any:
    m = ctx.module
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if m.groups != 1:
        reason = "grouped transposed convolution"
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    owner = str(ctx.node.target)
    if lay is not None:
        if lay.dim != 1:
            ctx.pin(lay.ids, "convolution over the tracked dim")
        else:
            _require_zero(ctx, lay, f"conv '{owner}'")
            ctx.param_slice(owner, "weight", 0, lay.ids, "in")
    out = ctx.fresh(1, m.out_channels)
    ctx.param_slice(owner, "weight", 1, out.ids, "out")
    if m.bias is not None:
        ctx.param_slice(owner, "bias", 0, out.ids, "out")
    ctx.counts_flops("in*out", x)
    return out


_CONV_ATTRS = ("in_channels", "out_channels", "groups")


def conv_surgery(m: nn.Module, r: Removal) -> set[tuple[str, int]]:
    """Conv and transposed conv layers: torch-pruning's functions without groups; whole groups sliced here."""
    out_dim, in_dim = (1, 0) if m.transposed else (0, 1)
    out, inp = r.get(("weight", out_dim)), r.get(("weight", in_dim))
    if m.groups == 1:
        tp = _tp()
        if out is not None and len(out):
            tp.prune_conv_out_channels(m, _ids(out))
        if inp is not None and len(inp):
            tp.prune_conv_in_channels(m, _ids(inp))
        return {("weight", 0), ("weight", 1), ("bias", 0)}
    if m.transposed or (inp is not None and len(inp)):
        raise SurgeryError(f"cannot remove input channels inside the groups of {m}: an atofx analysis error. Keep the "
                           "layer out of pruning with atofx.compile(..., leaf_modules=[...]) and report it.")
    if out is not None and len(out):
        per_group_out, per_group_in = m.out_channels // m.groups, m.in_channels // m.groups
        if len(out) % per_group_out:
            raise SurgeryError(f"dropping {len(out)} channels would split a group of {m}: an atofx analysis error. "
                               "Keep the layer out of pruning with atofx.compile(..., leaf_modules=[...]) and report it.")
        slice_tensor_attr(m, "weight", 0, out)
        if m.bias is not None:
            slice_tensor_attr(m, "bias", 0, out)
        m.groups -= len(out) // per_group_out
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.groups * per_group_in
    return {("weight", 0), ("weight", 1), ("bias", 0)}


def _conv_sizes(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> list[int] | None:
    if m.padding_mode != "zeros" or x.dim() != m.weight.dim() or x.shape[1] != m.in_channels:
        return None
    spatial = x.shape[2:]
    if m.padding == "same":
        return list(spatial)
    padding = (0,) * len(spatial) if m.padding == "valid" else m.padding
    sizes = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(spatial, padding, m.dilation, m.kernel_size, m.stride, strict=True)
    ]
    return sizes if min(sizes) > 0 else None


def conv_output_shape(m: nn.Module, x: torch.Tensor) -> list[int] | None:
    sizes = _conv_sizes(m, x)  # type: ignore[arg-type]
    return None if sizes is None else [x.shape[0], m.out_channels, *sizes]


def _patch_group_count(node: fx.Node, layouts: dict[str, Any], kept: Kept, at: int, name: str) -> bool:
    """A literal count of channel groups (argument `at`, keyword `name`) becomes the number of whole groups kept."""
    lay, old = layouts.get(node.args[0].name), _literal(node, at, name)
    if not isinstance(lay, ChannelLayout) or not isinstance(old, int) or old <= 1:
        return False  # absent or 1: one group, which stays one group
    new = int(kept(lay).sum()) // (lay.width // old)
    if new == old:
        return False
    _set_literal(node, at, name, new)
    return True


def _patch_groups(node: fx.Node, layouts: dict[str, Any], kept: Kept) -> bool:
    """A functional grouped conv's literal `groups` becomes the number of whole groups kept."""
    return _patch_group_count(node, layouts, kept, 6, "groups")


def linear(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay, in_nd = ctx.layout(x), _ndim(ctx, x)
    if ctx.module is not None:
        ref, out_features = _weight_ref(ctx, None, None), ctx.module.out_features
    else:
        ref = _weight_ref(ctx, ctx.arg(1, "weight"), ctx.arg(2, "bias"))
        out_features = int(ctx.out_shape[-1]) if ctx.out_shape is not None else 0
    if ref is None:
        ctx.pin_inputs("linear with a computed weight")
        return ctx.fresh_like_output("linear with a computed weight")
    owner, weight, bias = ref
    if lay is not None and lay.dim != in_nd - 1:
        ctx.counts_flops("out", x)
        return lay if bias is None else lay.with_zero(False)
    if lay is not None:
        _require_zero(ctx, lay, f"linear '{owner}'")
        ctx.param_slice(owner, weight, 1, lay.ids, "in")
    out = ctx.fresh(max(in_nd - 1, 0), out_features)
    ctx.param_slice(owner, weight, 0, out.ids, "out")
    if bias:
        ctx.param_slice(owner, bias, 0, out.ids, "out")
    ctx.counts_flops("in*out", x)
    return out


def linear_surgery(m: nn.Linear, r: Removal) -> set[tuple[str, int]]:
    out, inp = r.get(("weight", 0)), r.get(("weight", 1))
    tp = _tp()
    if out is not None and len(out):
        tp.prune_linear_out_channels(m, _ids(out))
    if inp is not None and len(inp):
        tp.prune_linear_in_channels(m, _ids(inp))
    return {("weight", 0), ("weight", 1), ("bias", 0)}


def linear_output_shape(m: nn.Module, x: torch.Tensor) -> list[int] | None:
    return [*x.shape[:-1], m.out_features] if x.dim() >= 1 and x.shape[-1] == m.in_features else None


_Ref = tuple[str, bool]  # (attribute name, is a parameter)


def _per_channel_norm(ctx: RuleContext, affine: tuple[_Ref | None, _Ref | None],
                      stat_names: tuple[str | None, str | None], owner: str, zero_if_plain: bool) -> Any:
    """Per-channel statistics and affine parameters; a parameter weight/bias is part of the ZIG."""
    lay = ctx.layout(ctx.arg(0, "input"))
    if lay is None:
        return None
    if lay.dim != 1:
        return _pinned_passthrough(ctx, lay, "normalisation over a dim that is not the tracked channel dim")
    weight, bias = affine
    for ref in affine:
        if ref is not None:
            ctx.param_slice(owner, ref[0], 0, lay.ids, "out" if ref[1] else "in")
    for name in stat_names:
        if name is not None:
            ctx.param_slice(owner, name, 0, lay.ids, "in")
    if weight is not None and weight[1] and (bias is None or bias[1]):
        return lay.with_zero(True)  # zeroing weight (and bias) zeroes the channel
    if bias is not None and not bias[1]:
        return lay.with_zero(False)
    return lay if zero_if_plain else lay.with_zero(False)


_NORM_ARGS = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))


def batch_norm(ctx: RuleContext) -> Any:
    m = ctx.module
    if m is not None:
        affine = (("weight", True), ("bias", True)) if m.affine else (None, None)
        stats = ("running_mean", "running_var") if m.running_mean is not None else (None, None)
        # without running statistics the batch's own statistics normalise: a zero channel stays zero
        return _per_channel_norm(ctx, affine, stats, str(ctx.node.target), m.running_mean is None)
    uses_batch_stats = ctx.arg(1, "running_mean") is None or ctx.arg(5, "training", False) is True
    return _functional_norm(ctx, _NORM_ARGS, zero_if_plain=uses_batch_stats)


def instance_norm(ctx: RuleContext) -> Any:
    uses_input_stats = ctx.arg(1, "running_mean") is None or ctx.arg(5, "use_input_stats", True) is True
    return _functional_norm(ctx, _NORM_ARGS, zero_if_plain=uses_input_stats)


_NORM_STATE = ("weight", "bias", "running_mean", "running_var")
_batch_norm_surgery = _out_only("prune_batchnorm_out_channels", _NORM_STATE)


def instance_norm_surgery(m: nn.Module, r: Removal) -> set[tuple[str, int]]:
    """torch-pruning's function sets the width and cuts the affine parameters; the running statistics, which it
    leaves whole, are cut as plain buffers by the rewrite pass."""
    drops = [r[(n, 0)] for n in _NORM_STATE if (n, 0) in r]
    if drops and len(drops[0]):
        _tp().prune_instancenorm_out_channels(m, _ids(drops[0]))
    return {("weight", 0), ("bias", 0)}


def batch_norm_output_shape(*ranks: int) -> ShapeShortcut:
    """An eval-mode batch norm on inputs of these ranks returns its input's shape."""

    def shape(m: nn.Module, x: torch.Tensor) -> list[int] | None:
        if not m.training and x.dim() in ranks and x.shape[1] == m.num_features and m.weight is not None:
            return list(x.shape)
        return None

    return shape


def _functional_norm(ctx: RuleContext, args: tuple[tuple[int, str], ...], zero_if_plain: bool) -> Any:
    """F.batch_norm / F.instance_norm: statistics and affine parameters must be attributes of one module."""
    lay = ctx.layout(ctx.arg(0, "input"))
    if lay is None:
        return None
    values = [ctx.arg(i, n) for i, n in args]
    refs = [ctx.attr_path(v) for v in values]
    if any(v is not None and r is None for v, r in zip(values, refs, strict=True)):
        return _pinned_passthrough(ctx, lay, "normalisation with computed statistics or parameters")
    owners = {r[0] for r in refs if r is not None}
    if len(owners) > 1:
        return _pinned_passthrough(ctx, lay, "normalisation with parameters of several modules")
    owner = owners.pop() if owners else ""
    affine = tuple((r[1], r[2]) if r else None for r in refs[2:])
    return _per_channel_norm(ctx, affine, tuple(r[1] if r else None for r in refs[:2]), owner, zero_if_plain)


def group_norm(ctx: RuleContext) -> Any:
    lay = ctx.layout(ctx.arg(0, "input"))
    if lay is None:
        return None
    if ctx.module is not None:
        groups, owner = ctx.module.num_groups, str(ctx.node.target)
        affine = (("weight", True), ("bias", True)) if ctx.module.affine else (None, None)
    else:
        groups = ctx.arg(1, "num_groups")
        values = [ctx.arg(2, "weight"), ctx.arg(3, "bias")]
        refs = [ctx.attr_path(v) for v in values]
        if any(v is not None and r is None for v, r in zip(values, refs, strict=True)) or len(
                {r[0] for r in refs if r}) > 1:
            return _pinned_passthrough(ctx, lay, "GroupNorm with computed parameters or parameters of several modules")
        owner = next((r[0] for r in refs if r), "")
        affine = tuple((r[1], r[2]) if r else None for r in refs)
    if lay.dim != 1 or isinstance(groups, fx.Node) or lay.width % groups or groups == 1:
        return _pinned_passthrough(ctx, lay, "GroupNorm normalises across all channels or untracked groups")
    by_group = lay.ids.reshape(groups, -1)  # a group's channels share statistics: they go as one
    ctx.facts.union(by_group[:, :1], by_group)
    if ctx.module is not None:  # its widths follow the channels kept, weights or not; a second call goes in step
        ctx.facts.union(ctx.facts.group_norms.setdefault(owner, lay.ids), lay.ids)
    else:
        ctx.literal_channels("num_groups")
    out = _per_channel_norm(ctx, affine, (None, None), owner, zero_if_plain=True)
    return out.with_zero(np.repeat(out.zero.reshape(groups, -1).all(axis=1), lay.width // groups))


def group_norm_surgery(m: nn.GroupNorm, r: Removal) -> set[tuple[str, int]]:
    """Weight and bias sliced; num_channels and num_groups are set by `rewrite.prune_copy`, affine or not."""
    drop = next((r[k] for k in (("weight", 0), ("bias", 0)) if k in r), None)
    if drop is not None and len(drop):
        for name in ("weight", "bias"):
            if getattr(m, name, None) is not None:
                slice_tensor_attr(m, name, 0, drop)
    return {("weight", 0), ("bias", 0)}


def _patch_num_groups(node: fx.Node, layouts: dict[str, Any], kept: Kept) -> bool:
    """F.group_norm's literal `num_groups` becomes the number of whole groups kept."""
    return _patch_group_count(node, layouts, kept, 1, "num_groups")


def layer_norm(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    if ctx.module is not None:
        n_norm, has_bias = len(ctx.module.normalized_shape), getattr(ctx.module, "bias", None) is not None
    else:
        shape = ctx.arg(1, "normalized_shape")
        if isinstance(shape, fx.Node):
            return _pinned_passthrough(ctx, lay, "LayerNorm over a shape known only at run time")
        n_norm, has_bias = len(shape), ctx.arg(3, "bias") is not None
    if lay.dim >= _ndim(ctx, x) - n_norm:
        return _pinned_passthrough(ctx, lay, "LayerNorm normalises over the channel dim")
    return lay.with_zero(False) if has_bias else lay


def softmax(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if dim is None or _norm_dim(dim, _ndim(ctx, x)) == lay.dim:
        return _pinned_passthrough(ctx, lay, "softmax over the channel dim")
    return lay.with_zero(False)


def normalize(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    if _norm_dim(ctx.arg(2, "dim", 1), _ndim(ctx, x)) == lay.dim:
        return _pinned_passthrough(ctx, lay, "normalize() over the channel dim")
    return lay


# ---------------------------------------------------------------- spatial ops


def spatial(n_spatial: int | None, zero_preserving: bool = True) -> Callable[[RuleContext], Any]:
    """Pooling, interpolation and spatial padding: work on the last dims, keep channels."""

    def propagate(ctx: RuleContext) -> Any:
        x = ctx.arg(0, "input")
        lay = ctx.layout(x)
        if lay is None:
            return None
        nd = _ndim(ctx, x)
        k = n_spatial if n_spatial is not None else max(nd - 2, 1)
        if lay.dim >= nd - k:
            ctx.pin(lay.ids, "pooling or resampling over the channel dim")
            return ctx.fresh_like_output("pooling or resampling over the channel dim")
        keeps = zero_preserving
        if ctx.module is not None and hasattr(ctx.module, "value"):  # ConstantPadNd
            keeps = ctx.module.value == 0
        return lay if keeps else lay.with_zero(False)

    return propagate


def pad(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    amounts, mode, value = ctx.arg(1, "pad"), ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
    value = 0 if value is None else value
    if any(isinstance(a, fx.Node) for a in amounts) or isinstance(value, fx.Node):
        return _pinned_passthrough(ctx, lay, "padding by amounts only known at run time")
    nd = _ndim(ctx, x)
    pos = nd - 1 - lay.dim
    left, right = (amounts[2 * pos], amounts[2 * pos + 1]) if 2 * pos + 1 < len(amounts) else (0, 0)
    keeps = mode != "constant" or value == 0
    if left == 0 and right == 0:
        return lay if keeps else lay.with_zero(False)
    if mode != "constant" or left < 0 or right < 0:
        reason = f"{mode} padding or cropping of the channel dim"
        ctx.pin(lay.ids, reason)
        return ctx.fresh_like_output(reason)
    core = lay if keeps else lay.with_zero(False)  # other dims padded with a non-zero value
    parts = [ctx.fresh(lay.dim, n, pinned="channel padding", zero=value == 0) for n in (left, right)]
    return concat([parts[0], core, parts[1]], lay.dim)


# ---------------------------------------------------------------- shape ops


_TENSOR_ALIASES = {"data"}  # tensor attributes that are the same tensor
_RESULT_FIELDS = {"values": 0, "indices": 1}  # torch.return_types of max/min: (values, indices)


def shape_query(ctx: RuleContext) -> Any:
    """size(), dim(), .shape: no tensor out, nothing to track; a tensor attribute (.data, .T) is followed or pinned;
    `.values` / `.indices` of a (values, indices) result (`x.max(1).values`) is that member."""
    src = ctx.arg(0, "input")
    attr = ctx.node.args[1] if ctx.node.target is getattr and len(ctx.node.args) > 1 else None
    members = ctx.facts.layouts.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(members, (tuple, list)) and attr in _RESULT_FIELDS and len(members) == 2:
        return members[_RESULT_FIELDS[attr]]
    lay = ctx.layout(src)
    if ctx.out_shape is None and lay is not None:  # a number or a shape, not a tensor
        _count_channels(ctx, lay, attr)
    if ctx.out_shape is None or lay is None:
        return None
    if attr in _TENSOR_ALIASES:
        return lay
    reason = f"tensor attribute .{attr}" if attr else f"{ctx.node.target} returning a tensor"
    ctx.pin_inputs(reason)
    return ctx.fresh_like_output(reason)


def _count_channels(ctx: RuleContext, lay: ChannelLayout, attr: Any) -> None:
    """`x.size(1)`, `x.numel()`: the number of x's channels; `x.shape`, `x.size()`: a shape, counting them at the
    channel dim; `x.dim()`, `x.ndim`: none."""
    target, nd = ctx.node.target, _ndim(ctx, ctx.arg(0, "input"))
    if target == "numel":
        ctx.counts(lay.ids)
    elif target == "size" or attr == "shape":
        dim = ctx.arg(1, "dim") if target == "size" else None
        if dim is None:
            ctx.counts(tuple(lay.ids if d == lay.dim else None for d in range(nd)))
        else:
            ctx.counts(lay.ids if not isinstance(dim, int) or _norm_dim(dim, nd) == lay.dim else None)
    else:
        ctx.counts(None)


def _reshape_layout(ctx: RuleContext, lay: ChannelLayout, src: tuple[int, ...], dst: tuple[int, ...],
                    fixed: frozenset[int] = frozenset()) -> Any:
    """Follow the tracked dim through a reshape; `fixed` are output dims the code gives as literal sizes."""
    groups = reshape_groups(src, dst)
    if groups is None:
        return _pinned_passthrough(ctx, lay, "reshape that cannot be followed")
    match = next(((i, o) for i, o in groups if lay.dim in i), None)
    if match is None:
        return _pinned_passthrough(ctx, lay, "reshape that cannot be followed")
    in_dims, out_dims = match
    in_sizes = [src[d] for d in in_dims]
    out_sizes = [dst[d] for d in out_dims]
    if not out_sizes:
        return _pinned_passthrough(ctx, lay, "reshape removes the channel dim")
    axis = lay.dim - in_dims.start
    view = [1] * len(in_sizes)
    view[axis] = lay.width
    ids = np.broadcast_to(lay.ids.reshape(view), in_sizes).reshape(out_sizes)
    zero = np.broadcast_to(lay.zero.reshape(view), in_sizes).reshape(out_sizes)
    varying = [a for a in range(len(out_sizes)) if out_sizes[a] > 1 and not _constant_along(ids, a)]
    if not varying:
        keep = next((a for a in range(len(out_sizes)) if out_sizes[a] == lay.width), 0)
        varying = [keep]
    last = varying[-1]
    free = [a for a in range(len(out_sizes)) if out_dims.start + a not in fixed]
    if free and any(out_dims.start + a in fixed for a in varying):
        # a literal size (the groups of a channel shuffle) cannot shrink: only a computed part may
        last = free[-1]
        varying = sorted({*varying, last})
    moved_ids = np.moveaxis(ids, last, -1).reshape(-1, out_sizes[last])
    moved_zero = np.moveaxis(zero, last, -1).reshape(-1, out_sizes[last])
    if len(varying) > 1:  # a channel dim split in several: only the innermost part may shrink
        ctx.facts.union(moved_ids[:1], moved_ids)
    return ChannelLayout(out_dims.start + last, moved_ids[0].copy(), moved_zero.all(axis=0))


def _constant_along(arr: np.ndarray, axis: int) -> bool:
    first = np.take(arr, [0], axis=axis)
    return bool((arr == first).all())


def reshape(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    src, dst = ctx.shape(x), ctx.out_shape
    if lay is None or src is None or dst is None:
        return None
    fixed: frozenset[int] = frozenset()
    view = ctx.node.target in ("view", "reshape") or ctx.node.target is torch.reshape
    if view:
        args = list(ctx.node.args[1:]) if ctx.node.op == "call_method" else [ctx.arg(1, "shape")]
        if len(args) == 1 and isinstance(args[0], (tuple, list)):
            args = list(args[0])
        if len(args) == len(dst):
            fixed = frozenset(d for d, a in enumerate(args) if isinstance(a, int) and a > 1)
        literals = [a for a in args if isinstance(a, int) and a not in (-1, 1)]
        if any(a % lay.width == 0 or lay.width % max(a, 1) == 0 for a in literals):
            ctx.literal_channels("shape arguments")
    else:
        fixed = _unflattened_literals(ctx, len(src))
    out = _reshape_layout(ctx, lay, tuple(src), tuple(dst), fixed)
    if not view and isinstance(out, ChannelLayout) and out.dim in fixed:  # a view's literal is patched, these not
        ctx.pin(lay.ids, "unflatten to sizes written as numbers, the channel count among them")
    return out


def _unflattened_literals(ctx: RuleContext, ndim: int) -> frozenset[int]:
    """The output dims an unflatten (`nn.Unflatten(1, (6, 4, 4))`, `x.unflatten(1, (6, -1))`) gives literal sizes."""
    if isinstance(ctx.module, nn.Unflatten):
        dim, sizes = ctx.module.dim, ctx.module.unflattened_size
    elif ctx.node.target == "unflatten":
        dim, sizes = ctx.arg(1, "dim"), ctx.arg(2, "sizes")
    else:
        return frozenset()
    if not isinstance(dim, int) or not isinstance(sizes, (tuple, list)):
        return frozenset()
    start = _norm_dim(dim, ndim)
    return frozenset(start + i for i, size in enumerate(sizes) if isinstance(size, int) and size > 1)


def _patch_shape(node: fx.Node, layouts: dict[str, Any], kept: Kept) -> bool:
    """A view's or reshape's literal size at the output's tracked dim becomes the number of channels kept.

    The size is found by its position, not by its value: in an SK block's `view(n, 2, c, 1, 1)` with c = 2 the
    branch count and the channel count are the same number, and only the channel count may change.
    """
    out = layouts.get(node.name)
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


def permute(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    nd = _ndim(ctx, x)
    target = ctx.node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name == "permute":
        dims = ctx.node.args[1:] if ctx.node.op == "call_method" else ctx.arg(1, "dims")
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        order = [_norm_dim(d, nd) for d in dims]
        return lay.at(order.index(lay.dim))
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = _norm_dim(ctx.arg(1, "dim0"), nd), _norm_dim(ctx.arg(2, "dim1"), nd)
        return lay.at(b if lay.dim == a else a if lay.dim == b else lay.dim)
    if name in ("movedim", "moveaxis"):
        src, dst = ([_norm_dim(d, nd) for d in (v if isinstance(v, (list, tuple)) else [v])]
                    for v in (ctx.arg(1, "source"), ctx.arg(2, "destination")))
        order = [-1] * nd  # order[j]: the input dim that becomes output dim j
        for a, b in zip(src, dst, strict=True):
            order[b] = a
        rest = iter(d for d in range(nd) if d not in src)
        order = [o if o >= 0 else next(rest) for o in order]
        return lay.at(order.index(lay.dim))
    return _pinned_passthrough(ctx, lay, f"unknown permutation {name}")


def squeeze_unsqueeze(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay, src, dst = ctx.layout(x), ctx.shape(x), ctx.out_shape
    if lay is None or src is None or dst is None:
        return None
    return _reshape_layout(ctx, lay, tuple(src), tuple(dst))


def expand(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay, src, dst = ctx.layout(x), ctx.shape(x), ctx.out_shape
    if lay is None or src is None or dst is None:
        return None
    dim = lay.dim + len(dst) - len(src)
    if dst[dim] != lay.width:
        reason = "expand or repeat along the channel dim"
        ctx.pin(lay.ids, reason)
        return ctx.fresh(dim, int(dst[dim]), pinned=reason, zero=False)
    return lay.at(dim)


def max_min(ctx: RuleContext) -> Any:
    """`x.max(dim)` / `torch.min(x, dim, keepdim)`: (values, indices) over one dim, a max over channels pinned
    (it depends on the width); `x.max()` over every dim pins too; `torch.max(a, b)`, elementwise, is not followed."""
    x, dim = ctx.arg(0, "input"), ctx.arg(1, "dim")
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    if isinstance(dim, fx.Node):
        reason = f"elementwise {name}() of two tensors"
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    lay = ctx.layout(x)
    if lay is None:
        return None
    nd = _ndim(ctx, x)
    if dim is None or _norm_dim(dim, nd) == lay.dim:
        ctx.pin(lay.ids, f"{name}() over the channel dim")
        return None if dim is None else (None, None)
    out = lay.at(lay.dim if ctx.arg(2, "keepdim", False) else lay.dim - (_norm_dim(dim, nd) < lay.dim))
    return out, out.with_zero(False)  # the max of an all-zero channel is zero; its index need not be


def new_tensor(ctx: RuleContext) -> Any:
    """`x.new_empty(size)` and its kin (drop-path's `x.new_empty((n, 1, 1, 1)).bernoulli_(p)`): a fresh tensor that
    takes only x's dtype and device, so it carries none of x's channels."""
    return None


_REDUCE_KEEPS = {"sum"}


def reduce(name: str) -> Callable[[RuleContext], Any]:
    """mean / sum / amax / ... over some dims."""

    def propagate(ctx: RuleContext) -> Any:
        x = ctx.arg(0, "input")
        lay = ctx.layout(x)
        if lay is None:
            return None
        nd = _ndim(ctx, x)
        dims = ctx.arg(1, "dim")
        keepdim = ctx.arg(2, "keepdim", False)
        if dims is None or dims == [] or dims == ():
            dims = list(range(nd))
        dims = [_norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if lay.dim in dims:
            if name in _REDUCE_KEEPS:
                _require_zero(ctx, lay, f"{name}() over channels")
            else:
                ctx.pin(lay.ids, f"{name}() over the channel dim")
            return None
        new_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
        return lay.at(new_dim)

    return propagate


class _Shaped(NamedTuple):
    """A member of a tuple-valued node, known only by its shape."""

    shape: torch.Size


def _shape_of(ctx: RuleContext, value: Any) -> torch.Size:
    return value.shape if isinstance(value, _Shaped) else ctx.shape(value)


def cat(ctx: RuleContext) -> Any:
    tensors = ctx.arg(0, "tensors")
    nd = len(ctx.out_shape or ())
    if nd == 0:
        return None
    dim = _norm_dim(ctx.arg(1, "dim", 0), nd)
    if isinstance(tensors, fx.Node):  # a tuple-valued node, e.g. a slice of split() outputs
        found, shapes = ctx.facts.layouts.get(tensors.name), output_shapes(tensors)
        if not isinstance(found, (tuple, list)) or shapes is None:
            reason = "concatenation of a tensor sequence that cannot be followed"
            ctx.pin_inputs(reason)
            return ctx.fresh_like_output(reason)
        lays = list(found)
        tensors = [_Shaped(s) for s in shapes]
    else:
        lays = [ctx.layout(t) for t in tensors]
    tracked = [x for x in lays if x is not None]
    if not tracked:
        return None
    if all(x.dim == dim for x in tracked):
        parts = [
            lay if lay is not None else ctx.fresh(dim, int(_shape_of(ctx, t)[dim]), pinned="concatenated untracked tensor",
                                                  zero=False)
            for t, lay in zip(tensors, lays, strict=True)
        ]
        return concat(parts, dim)
    other = {x.dim for x in tracked}
    if len(other) == 1 and all(x is not None for x in lays):
        lead = tracked[0]
        if all(x.width == lead.width for x in tracked):
            for x in tracked[1:]:
                ctx.facts.union(lead.ids, x.ids)
            return ChannelLayout(lead.dim, lead.ids, np.logical_and.reduce([x.zero for x in tracked]))
    reason = "concatenation that mixes channel dims"
    ctx.pin_inputs(reason)
    return ctx.fresh_like_output(reason)


def split(ctx: RuleContext) -> Any:
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    shapes = output_shapes(ctx.node)
    if lay is None or shapes is None:
        return None
    nd = _ndim(ctx, x)
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    dim = _norm_dim(ctx.arg(2, "dim", 0), nd)
    if dim != lay.dim:
        return tuple(lay for _ in shapes)
    widths = [int(s[dim]) for s in shapes]
    offsets = np.cumsum([0, *widths])
    parts = [lay.sliced(slice(int(a), int(b))) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    equal = name == "chunk" or isinstance(ctx.arg(1, "split_size_or_sections"), int)
    if name != "chunk":
        ctx.literal_channels("split sizes")
    if equal and len(set(widths)) > 1:
        return tuple(_pinned_passthrough(ctx, p, "chunks of unequal size") for p in parts)
    if equal:  # equal chunks stay equal after pruning only if they lose the same positions
        for p in parts[1:]:
            ctx.facts.union(parts[0].ids, p.ids)
    return tuple(parts)


def _patch_split(node: fx.Node, layouts: dict[str, Any], kept: Kept) -> bool:
    """split()'s literal sizes become the channels each part keeps."""
    sizes = [int(kept(p).sum()) for p in layouts.get(node.name) if isinstance(p, ChannelLayout)]
    old = _literal(node, 1, "split_size_or_sections")
    new = sizes[0] if isinstance(old, int) else sizes
    if new == old:
        return False
    _set_literal(node, 1, "split_size_or_sections", new)
    return True


def _index_items(index: Any, nd: int) -> list[Any]:
    """The items of a tensor index with its Ellipsis spelled out as full slices (`x[..., :8]` on 4 dims is
    `x[:, :, :, :8]`), so an item's position counts the dims before it (a None adds a dim, taking none)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        fill = nd - (len(items) - 1 - sum(i is None for i in items))
        items[at:at + 1] = [slice(None)] * fill
    return items


def _item_at(items: list[Any], dim: int) -> int | None:
    """The position in `items` of the item that indexes the input's `dim` (None items index no input dim)."""
    taking = [i for i, item in enumerate(items) if item is not None]
    return taking[dim] if dim < len(taking) else None


def getitem(ctx: RuleContext) -> Any:
    src, index = ctx.node.args
    shape = ctx.facts.channel_counts.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(shape, tuple):  # a dim of a shape (`x.shape[1]`; any, at a position known only at run time)
        ctx.counts(shape[index] if isinstance(index, (int, slice)) else tuple(shape))
        return None
    lays = ctx.facts.layouts.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(lays, (tuple, list)):
        if isinstance(index, int):
            return lays[index]
        if isinstance(index, slice) and all(isinstance(v, (int, type(None))) for v in (index.start, index.stop,
                                                                                          index.step)):
            return tuple(lays[index])
        ctx.pin_inputs("indexing a sequence of tensors at a position known only at run time")
        return ctx.fresh_like_output("indexing a sequence of tensors at a position known only at run time")
    lay = ctx.layout(src)
    if lay is None:
        return None
    items = _index_items(index, _ndim(ctx, src))
    in_dim = out_dim = 0
    result = lay
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == lay.dim:
            if isinstance(item, slice) and item == slice(None):
                result = lay.at(out_dim)
            elif isinstance(item, slice) and all(isinstance(v, (int, type(None))) for v in (item.start, item.stop,
                                                                                               item.step)):
                ctx.literal_channels("channel slice")
                result = lay.sliced(item).at(out_dim)
            else:
                ctx.pin(lay.ids, "indexing that selects single channels")
                return None
        elif isinstance(item, fx.Node) or not isinstance(item, (int, slice)):
            ctx.pin(lay.ids, "advanced indexing")
            return None
        if isinstance(item, slice):
            out_dim += 1
        in_dim += 1
    if in_dim <= lay.dim:
        result = lay.at(lay.dim - in_dim + out_dim)
    return result


def _patch_slice(node: fx.Node, layouts: dict[str, Any], kept: Kept) -> bool:
    """A literal channel slice `x[:, a:b]` (or `x[..., a:b]`) becomes the slice of the channels kept in it; a
    strided one (`x[:, ::2]`), the list of their positions, as the kept channels need not be evenly spaced."""
    src, index = node.args
    lay = layouts.get(src.name)
    shape = tensor_shape(src)
    if not isinstance(lay, ChannelLayout) or shape is None:
        return False
    items = _index_items(index, len(shape))
    at = _item_at(items, lay.dim)
    if at is None or not isinstance(items[at], slice):
        return False
    s = items[at]
    start, stop, step = s.indices(lay.width)
    k = kept(lay)
    new: slice | list[int] = slice(int(k[:start].sum()), int(k[:stop].sum()))
    if step != 1:  # the kept channels of a strided slice need not be evenly spaced: read them by position
        chosen = np.arange(start, stop, step)
        new = (np.cumsum(k) - 1)[chosen[k[chosen]]].tolist()
    elif new == slice(s.start, s.stop):
        return False
    items[at] = new
    node.update_arg(1, tuple(items) if isinstance(index, tuple) else items[0])
    return True


def roll(ctx: RuleContext) -> Any:
    """A roll over channels is a fixed rotation: followed, its shift rewritten to the channels kept."""
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    nd = _ndim(ctx, x)
    shifts, dims = ctx.arg(1, "shifts"), ctx.arg(2, "dims")
    shifts = list(shifts) if isinstance(shifts, (tuple, list)) else [shifts]
    dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
    if dims == [None] or any(isinstance(v, fx.Node) for v in (*shifts, *dims)) or len(shifts) != len(dims):
        return _pinned_passthrough(ctx, lay, "roll over a flattened tensor or by a computed shift")
    on_channels = [int(sh) for sh, d in zip(shifts, dims, strict=True) if _norm_dim(int(d), nd) == lay.dim]
    if len(on_channels) > 1:
        return _pinned_passthrough(ctx, lay, "roll over the channel dim twice")
    shift = sum(on_channels)
    if shift == 0:
        return lay
    ctx.literal_channels("roll shift")
    return ChannelLayout(lay.dim, np.roll(lay.ids, shift), np.roll(lay.zero, shift))


def _patch_roll(node: fx.Node, layouts: dict[str, Any], kept: Kept) -> bool:
    """A roll over channels by s moves the last s channels to the front: after pruning, by those of them kept."""
    lay, shifts, dims = layouts.get(node.args[0].name), _literal(node, 1, "shifts"), _literal(node, 2, "dims")
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
    _set_literal(node, 1, "shifts", type(shifts)(new) if as_list else new[0])
    return True


def stack(ctx: RuleContext) -> Any:
    """Stacked tensors (branch outputs) keep their channels side by side: each channel goes in every branch."""
    tensors = ctx.arg(0, "tensors")
    out_nd = len(ctx.out_shape or ())
    if not isinstance(tensors, (tuple, list)) or not out_nd:
        ctx.pin_inputs("stack of a tensor sequence that cannot be followed")
        return ctx.fresh_like_output("stack of a tensor sequence that cannot be followed")
    lays = [ctx.layout(t) for t in tensors]
    tracked = [x for x in lays if x is not None]
    if not tracked:
        return None
    at = _norm_dim(ctx.arg(1, "dim", 0), out_nd)
    if any(x is None for x in lays) or len({(x.dim, x.width) for x in tracked}) > 1:
        reason = "stack of tensors whose channels cannot be pruned together"
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    lead = tracked[0]
    for x in tracked[1:]:
        ctx.facts.union(lead.ids, x.ids)
    zero = np.logical_and.reduce([x.zero for x in tracked])
    return ChannelLayout(lead.dim + (at <= lead.dim), lead.ids, zero)


def pixel_shuffle(ctx: RuleContext) -> Any:
    """PixelShuffle(r): each r*r block of input channels becomes one output channel; PixelUnshuffle the
    reverse. Whole blocks go together, so both stay exact."""
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    if lay is None:
        return None
    m = ctx.module
    target = type(m) if m is not None else ctx.node.target
    unshuffle = target in (nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle)
    r = (m.downscale_factor if unshuffle else m.upscale_factor) if m is not None else ctx.arg(
        1, "downscale_factor" if unshuffle else "upscale_factor")
    if isinstance(r, fx.Node) or lay.dim != _ndim(ctx, x) - 3 or (not unshuffle and lay.width % (r * r)):
        return _pinned_passthrough(ctx, lay, "pixel shuffle over channels that cannot be followed")
    if unshuffle:
        return ChannelLayout(lay.dim, np.repeat(lay.ids, r * r), np.repeat(lay.zero, r * r))
    blocks = lay.ids.reshape(-1, r * r)
    ctx.facts.union(blocks[:, :1], blocks)
    return ChannelLayout(lay.dim, blocks[:, 0].copy(), lay.zero.reshape(-1, r * r).all(axis=1))


def recurrent(ctx: RuleContext) -> Any:
    """RNN / GRU / LSTM: the input features (a conv's channels in a CRNN) are read by the first layer's
    input weights, as a linear layer reads them; the hidden units are not followed (pinned)."""
    m = ctx.module
    x = ctx.arg(0, "input")
    lay = ctx.layout(x)
    reason = "hidden units of a recurrent layer"
    out = ctx.fresh_like_output(reason)
    if lay is None:
        return out
    owner = str(ctx.node.target)
    if lay.dim != _ndim(ctx, x) - 1 or getattr(m, "proj_size", 0):
        ctx.pin(lay.ids, "recurrent layer over a dim that is not its input features")
        return out
    _require_zero(ctx, lay, f"recurrent layer '{owner}'")
    for suffix in ("", "_reverse")[: 1 + m.bidirectional]:
        ctx.param_slice(owner, f"weight_ih_l0{suffix}", 1, lay.ids, "in")
    # only the input projection of the first layer scales with the features kept
    later = (m.num_layers - 1) * (m.hidden_size * (1 + m.bidirectional) + m.hidden_size)
    ctx.counts_flops("in*out", x, share=m.input_size / (m.input_size + m.hidden_size + later))
    return out


def recurrent_surgery(m: nn.RNNBase, r: Removal) -> set[tuple[str, int]]:
    """Input features of an RNN/GRU/LSTM: columns of the first layer's input weights, in both directions."""
    names = [n for n in ("weight_ih_l0", "weight_ih_l0_reverse") if (n, 1) in r]
    for name in names:  # RNNBase.__setattr__ keeps its flat weight list in step
        slice_tensor_attr(m, name, 1, r[(name, 1)])
    if names:
        m.input_size = m.weight_ih_l0.shape[1]
    return {(n, 1) for n in names}


def _contracted(ctx: RuleContext, a: ChannelLayout, b: ChannelLayout) -> None:
    """A channel summed over by a matrix product (attention's key channels): its terms go with the channel;
    they vanish only when one of the two factors is zero."""
    ctx.facts.union(a.ids, b.ids)
    bad = ~(a.zero | b.zero)
    if bad.any():
        ctx.pin(a.ids[bad], "channel summed over by a matrix product is not zero when its group is zeroed")


def matmul(ctx: RuleContext) -> Any:
    """A @ B over the last two dims: A's rows and B's columns pass through (attention values); the contracted
    dim couples A's and B's channels (attention keys); batch dims act as in a product."""
    a, b = ctx.arg(0, "input"), ctx.arg(1, "other" if ctx.node.target is not torch.bmm else "mat2")
    la, lb, sa, sb, out = ctx.layout(a), ctx.layout(b), ctx.shape(a), ctx.shape(b), ctx.out_shape
    if la is None and lb is None:
        return None
    if sa is None or sb is None or out is None or len(sa) < 2 or len(sb) < 2:
        reason = "matrix product of vectors or of unknown shapes"
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    nd = len(out)
    role_a = None if la is None else ("row" if la.dim == len(sa) - 2 else "k" if la.dim == len(sa) - 1 else "batch")
    role_b = None if lb is None else ("col" if lb.dim == len(sb) - 1 else "k" if lb.dim == len(sb) - 2 else "batch")
    if role_a == "k" and role_b == "k":
        _contracted(ctx, la, lb)
        ctx.facts.contractions.append(ctx.name)
        ctx.counts_flops("in*out", a)
        return None
    if role_a == "batch" or role_b == "batch":
        dims = {x.dim + nd - len(s) for x, s in ((la, sa), (lb, sb)) if x is not None}
        widths = {x.width for x in (la, lb) if x is not None}
        if len(dims) == 1 and len(widths) == 1 and (la is None or lb is None or role_a == role_b):
            lead = la if la is not None else lb
            if la is not None and lb is not None:
                ctx.facts.union(la.ids, lb.ids)
                zero = la.zero | lb.zero
            else:
                other_shape, dim = (sb, lead.dim + nd - len(sa)) if la is not None else (sa, lead.dim + nd - len(sb))
                own = dim - (nd - len(other_shape))
                if own >= 0 and other_shape[own] != 1:  # the other factor varies along it untracked
                    return _pinned_passthrough(ctx, lead, "matrix product with an untracked per-channel factor")
                zero = lead.zero
            ctx.counts_flops("out", a)
            return ChannelLayout(dims.pop(), lead.ids, zero)
        reason = "matrix product whose batch dims mix channels"
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    if role_a == "k" or role_b == "k":  # one factor's channels summed against fixed positions of the other
        reason = "channel summed over by a matrix product with an untracked factor"
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    if role_a == "row" and role_b == "col":
        ctx.pin(lb.ids, "matrix product that follows its rows' channels, not its columns'")
    ctx.counts_flops("out", a)
    lead = la if la is not None else lb
    return ChannelLayout(nd - 2 if lead is la else nd - 1, lead.ids, lead.zero.copy())


def channel_shuffle(ctx: RuleContext) -> Any:
    lay = ctx.layout(ctx.arg(0, "input"))
    if lay is None:
        return None
    groups = ctx.module.groups if ctx.module is not None else ctx.arg(1, "groups")
    if lay.dim != 1 or lay.width % groups:
        return _pinned_passthrough(ctx, lay, "channel shuffle that cannot be followed")
    by_group = lay.ids.reshape(groups, -1)
    ctx.facts.union(by_group[:1], by_group)
    zero = lay.zero.reshape(groups, -1).all(axis=0)
    return ChannelLayout(1, np.repeat(by_group[0], groups), np.repeat(zero, groups))


# ---------------------------------------------------------------- the table

_identity = unary(True)
_keeps_zero_modules = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_loses_zero_modules = (nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Softplus)
_keeps_zero_functions = (
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, torch.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, torch.tanh, F.tanh, F.softsign, F.softshrink, F.hardshrink, F.tanhshrink, torch.neg,
    operator.neg, torch.abs, torch.sqrt, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torchvision.ops.stochastic_depth,
)
_loses_zero_functions = (torch.sigmoid, F.sigmoid, F.hardsigmoid, F.logsigmoid, F.softplus, torch.exp, torch.cos)
# in-place functional forms (torch.relu_(x)): the same op on the same tensor
_keeps_zero_functions_ = (torch.relu_, F.leaky_relu_, F.elu_, torch.selu_, torch.tanh_)
_loses_zero_functions_ = (torch.sigmoid_, torch.exp_)
_keeps_zero_methods = (
    "relu", "relu_", "tanh", "tanh_", "neg", "abs", "sqrt", "contiguous", "clone", "detach", "float",
    "half", "double", "bfloat16", "to", "type_as", "cpu", "cuda",
)
_loses_zero_methods = ("sigmoid", "sigmoid_", "exp", "exp_", "bernoulli_")  # bernoulli_(p): random 0/1 everywhere
_new_tensor_methods = ("new_empty", "new_zeros", "new_ones", "new_full")

OPS = OpTable([
    # elementwise
    Op(_keeps_zero_modules + _keeps_zero_functions, "elementwise", _identity),
    Op(_loses_zero_modules + _loses_zero_functions, "elementwise, f(0) != 0", unary(False)),
    Op(_keeps_zero_functions_, "elementwise, in place", _identity),
    Op(_loses_zero_functions_, "elementwise, in place, f(0) != 0", unary(False)),
    Op((F.hardtanh_,), "elementwise, in place", unary(_hardtanh_keeps_zero)),
    Op((torch.clamp_,), "elementwise, in place", unary(_clamp_keeps_zero)),
    Op(tuple(Method(m) for m in _keeps_zero_methods), "elementwise", _identity),
    Op(tuple(Method(m) for m in _loses_zero_methods), "elementwise, f(0) != 0", unary(False)),
    Op((nn.Hardtanh, F.hardtanh), "elementwise", unary(_hardtanh_keeps_zero)),
    Op((nn.Threshold,), "elementwise", unary(_threshold_keeps_zero)),
    Op((torch.clamp, Method("clamp"), Method("clamp_")), "elementwise", unary(_clamp_keeps_zero)),
    Op((nn.PReLU,), "elementwise, per-channel weight", prelu, surgery=_out_only("prune_prelu_out_channels", ("weight",)),
       saved_attrs=("num_parameters",)),
    Op((operator.add, operator.iadd, torch.add, Method("add"), Method("add_")), "add", binary("add")),
    Op((operator.sub, operator.isub, torch.sub, Method("sub"), Method("sub_")), "sub", binary("sub")),
    Op((operator.mul, operator.imul, torch.mul, Method("mul"), Method("mul_")), "mul", binary("mul")),
    Op((operator.truediv, torch.div, Method("div"), Method("div_")), "div", binary("div")),
    # layers with weights
    Op((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv", conv, surgery=conv_surgery, output_shape=conv_output_shape,
       saved_attrs=_CONV_ATTRS),
    Op((F.conv1d, F.conv2d, F.conv3d), "conv", conv, patch=_patch_groups, takes_sizes=True),  # groups=x.shape[1]
    Op((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv-transpose", conv_transpose,
       surgery=conv_surgery, saved_attrs=_CONV_ATTRS),
    Op((nn.Linear,), "linear", linear, surgery=linear_surgery, output_shape=linear_output_shape,
       saved_attrs=("in_features", "out_features")),
    Op((F.linear,), "linear", linear),
    # normalisation
    *(Op((cls,), "batch-norm", batch_norm, surgery=_batch_norm_surgery, output_shape=batch_norm_output_shape(*ranks),
         saved_attrs=("num_features",))
      for cls, ranks in ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)))),
    Op((nn.SyncBatchNorm,), "batch-norm", batch_norm, surgery=_batch_norm_surgery, saved_attrs=("num_features",)),
    Op((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), "batch-norm", batch_norm,
       surgery=instance_norm_surgery, saved_attrs=("num_features",)),
    Op((F.batch_norm,), "batch-norm", batch_norm),
    Op((F.instance_norm,), "instance-norm", instance_norm),
    Op((nn.GroupNorm,), "group-norm", group_norm, surgery=group_norm_surgery, saved_attrs=("num_channels", "num_groups")),
    Op((F.group_norm,), "group-norm", group_norm, patch=_patch_num_groups),
    Op((nn.LayerNorm, F.layer_norm), "layer-norm", layer_norm),
    Op((nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, Method("softmax"), Method("log_softmax")),
       "softmax", softmax),
    Op((F.normalize,), "normalize", normalize),
    # spatial
    Op((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d, F.max_pool1d, F.avg_pool1d,
        F.adaptive_avg_pool1d, F.adaptive_max_pool1d), "pool", spatial(1)),
    Op((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, F.max_pool2d, F.avg_pool2d,
        F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d), "pool", spatial(2)),
    Op((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d, F.avg_pool3d,
        F.adaptive_avg_pool3d, F.adaptive_max_pool3d), "pool", spatial(3)),
    Op((F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), "interpolate", spatial(None)),
    Op((nn.ZeroPad1d, nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d), "spatial padding", spatial(1)),
    Op((nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), "spatial padding", spatial(2)),
    Op((nn.ZeroPad3d, nn.ConstantPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d), "spatial padding", spatial(3)),
    Op((F.pad,), "pad", pad),
    # shape
    Op((torch.reshape, Method("view"), Method("reshape")), "reshape", reshape, patch=_patch_shape, takes_sizes=True),
    Op((torch.flatten, nn.Flatten, nn.Unflatten, Method("flatten"), Method("unflatten"), Method("view_as"),
        Method("reshape_as")), "reshape", reshape),
    Op((torch.permute, torch.transpose, torch.swapaxes, torch.movedim, Method("permute"), Method("transpose"),
        Method("swapaxes"), Method("movedim")), "permute", permute),
    Op((torch.squeeze, torch.unsqueeze, Method("squeeze"), Method("unsqueeze")), "squeeze", squeeze_unsqueeze),
    Op((Method("expand"), Method("expand_as")), "expand", expand, takes_sizes=True),
    *(Op((getattr(torch, name), Method(name)), f"reduce {name}", reduce(name))
      for name in ("mean", "sum", "amax", "amin", "std", "var")),
    Op((torch.cat, torch.concat, torch.concatenate), "cat", cat),
    Op((torch.split, Method("split")), "split", split, patch=_patch_split),
    Op((torch.chunk, Method("chunk")), "split", split),
    Op((operator.getitem,), "getitem", getitem, patch=_patch_slice),
    Op((torch.roll, Method("roll")), "roll", roll, patch=_patch_roll),
    Op((torch.stack,), "stack", stack),
    Op((nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle), "pixel shuffle", pixel_shuffle),
    Op((nn.ChannelShuffle, torch.channel_shuffle), "channel shuffle", channel_shuffle),
    Op((Method("size"), Method("dim"), Method("numel"), getattr), "shape query", shape_query),
    Op(tuple(Method(m) for m in _new_tensor_methods), "new tensor", new_tensor, takes_sizes=True),
    Op((torch.max, torch.min, Method("max"), Method("min")), "reduce max/min", max_min),
    # sequences and products
    Op((nn.RNN, nn.GRU, nn.LSTM), "recurrent", recurrent, surgery=recurrent_surgery, saved_attrs=("input_size",)),
    Op((torch.matmul, operator.matmul, torch.bmm, Method("matmul"), Method("bmm")), "matmul", matmul),
    # no rule (their channels are pinned), but a saved graph may call them
    Op((torch.einsum, F.scaled_dot_product_attention, operator.floordiv, operator.pow, operator.mod), "saved only"),
])
