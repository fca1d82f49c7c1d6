"""passes/op_rules.py: every rule of the op table `OPS` runs on a small model, with checked expectations.

Each case names the table keys it exercises (`cover(...)`); the case asserts those keys really are
in its traced graph, and `test_every_rule_has_a_case` fails when a target with a rule has no case.
Most models are `conv1 -> op -> conv2`: `conv1`'s channel space is the one under test, `conv2` is
its consumer. Every model is checked against invariant 1 (`assert_zero_invariant`).
"""

from __future__ import annotations

import operator
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from atofx.passes.channel_layout import ChannelLayout
from atofx.passes.dependency import ChannelDependencyPass
from atofx.passes.op_rules import OPS
from atofx.passes.registry import Method
from atofx.passes.tracing import trace
from atofx.passes.zig_inference import ChannelSpace, infer_zigs
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import atofx
from atofx.ato.model import ATOModel
from tests.checks import assert_zero_invariant

COVERED: set = set()
RULES = OPS.rules  # every target with a propagation rule -> its entry
NOT_ZERO = "not zero when its group is zeroed"  # the pin reason of a consumer behind a non-zero-preserving op
SHAPES = {1: (2, 4, 8), 2: (2, 4, 6, 6), 3: (1, 4, 4, 4, 4)}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def cover(*keys: Any) -> tuple:
    """Register table keys as exercised by a case; returns them for the in-graph check."""
    COVERED.update(keys)
    return keys


# ---------------------------------------------------------------- helpers


def rule_key(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """The key of `RULES` that `OPS.for_node` uses for `node`, or None."""
    if node.op == "call_module":
        cls = type(modules[str(node.target)])
        return next((c for c in cls.__mro__ if c in RULES and (c is cls or cls.forward is c.forward)), None)
    if node.op == "call_method":
        return Method(str(node.target))
    if node.op == "call_function":
        try:
            return node.target if node.target in RULES else None
        except TypeError:
            return None
    return None


def keys_in(gm: fx.GraphModule) -> set:
    modules = dict(gm.named_modules())
    return {rule_key(n, modules) for n in gm.graph.nodes} - {None}


def example(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def perturb(model: nn.Module) -> nn.Module:
    """Seeded random parameters and statistics, so no bias or running mean is accidentally zero."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5 if name.endswith("var") else torch.randn(b.shape,
                                                                                                          generator=gen))
    return model.eval()


def check(ato: ATOModel, keys: Iterable = (), unknown: bool = False) -> ATOModel:
    missing = [k for k in keys if k not in keys_in(ato.graph_module)]
    assert not missing, f"table keys {missing} are not in the traced graph:\n{ato.graph_module.graph}"
    if not unknown:
        assert not ato.zigs.facts.unknown_ops, ato.zigs.facts.unknown_ops
    assert_zero_invariant(ato, zigs_per_space=64)
    return ato


def analyse(model: nn.Module, shape: tuple[int, ...], keys: Iterable = (), *, unknown: bool = False,
            **compile_kw: Any) -> ATOModel:
    """Compile `model` on a seeded input, check the keys are exercised and invariant 1 holds."""
    return check(atofx.compile(perturb(model), example(shape), **compile_kw), keys, unknown)


def space(ato: ATOModel, producer: str) -> ChannelSpace:
    found = [s for s in ato.spaces if producer in s.producers]
    assert len(found) == 1, [str(s) for s in found]
    return found[0]


def spaces_of(ato: ATOModel, producer: str) -> list[ChannelSpace]:
    return sorted((s for s in ato.spaces if producer in s.producers), key=lambda s: s.width)


def zig_rows(ato: ATOModel, sp: ChannelSpace) -> list[dict[tuple[str, str, int], tuple[int, ...]]]:
    """Per ZIG of `sp`: (module, parameter, dim) -> indices, over out- and in-slices."""
    rows = []
    for z in range(sp.width):
        row: dict[tuple[str, str, int], set[int]] = {}
        for m, n, d, idx in ato.zigs.zig_slices(sp.index, z, ("out", "in")):
            row.setdefault((m, n, d), set()).update(idx.tolist())
        rows.append({k: tuple(sorted(v)) for k, v in row.items()})
    return rows


def mapping(ato: ATOModel, sp: ChannelSpace, src: tuple[str, str, int], dst: tuple[str, str, int]) -> dict:
    """{indices of `src` in a ZIG: indices of `dst` in the same ZIG}, one entry per ZIG."""
    return {row[src]: row.get(dst, ()) for row in zig_rows(ato, sp)}


def OUT(m: str) -> tuple[str, str, int]:  # noqa: N802 - reads like the slice it names
    return (m, "weight", 0)


def IN(m: str) -> tuple[str, str, int]:  # noqa: N802
    return (m, "weight", 1)


def identity(n: int, offset: int = 0) -> dict:
    return {(c,): (c + offset,) for c in range(n)}


def layout_into(ato: ATOModel, target: str) -> ChannelLayout:
    """The layout of the first argument of the module call `target`."""
    node = next(n for n in ato.graph_module.graph.nodes if n.op == "call_module" and n.target == target)
    lay = ato.zigs.facts.layouts[node.args[0].name]
    assert isinstance(lay, ChannelLayout)
    return lay


def assert_pinned(sp: ChannelSpace, reason: str) -> None:
    assert sp.pinned, f"{sp} should be pinned ({reason})"
    assert reason in sp.reason, sp.reason


# ---------------------------------------------------------------- conv1 -> op -> conv2


class Sandwich(nn.Module):
    """conv1 (4 -> 8, 3x3) -> op -> conv2 (8 -> 6, 1x1) in `nd` spatial dims."""

    def __init__(self, op: Any, nd: int = 2):
        super().__init__()
        self.conv1 = CONV[nd](4, 8, 3, padding=1)
        self.op = op
        self.conv2 = CONV[nd](8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.op(self.conv1(x)))


def sw(name: str, make: Callable[[], Any], keeps: bool, keys: Iterable = (), nd: int = 2,
       reason: str = NOT_ZERO) -> Any:
    """A Sandwich case; a module class's own key is implied."""
    keys = tuple(keys)
    if isinstance(make, type) and issubclass(make, nn.Module) and make in RULES:
        keys += (make,)
    return pytest.param(make, nd, cover(*keys, CONV[nd]), keeps, reason, id=name)


def fn(f: Callable) -> Callable[[], Callable]:
    """Factory for a plain-function op."""
    return lambda: f


ELEMENTWISE = [
    # modules whose f(0) == 0
    *(sw(c.__name__, c, True) for c in (nn.ReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                                        nn.Hardswish, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink,
                                        nn.Hardshrink, nn.Identity, nn.Dropout, nn.Dropout2d)),
    sw("LeakyReLU", lambda: nn.LeakyReLU(0.1), True, [nn.LeakyReLU]),
    sw("Dropout1d", nn.Dropout1d, True, nd=1),
    sw("Dropout3d", nn.Dropout3d, True, nd=3),
    sw("GELU-tanh", lambda: nn.GELU("tanh"), True, [nn.GELU]),
    sw("Softplus-beta", lambda: nn.Softplus(beta=2.0), False, [nn.Softplus]),
    *(sw(c.__name__, c, False) for c in (nn.Sigmoid, nn.Hardsigmoid, nn.LogSigmoid, nn.Softplus)),
    sw("Hardtanh", nn.Hardtanh, True),
    sw("Hardtanh-0.1..1", lambda: nn.Hardtanh(0.1, 1.0), False, [nn.Hardtanh]),
    sw("Threshold-value0", lambda: nn.Threshold(0.1, 0.0), True, [nn.Threshold]),
    sw("Threshold-value20", lambda: nn.Threshold(0.1, 20.0), False, [nn.Threshold]),
    sw("Threshold-negative", lambda: nn.Threshold(-0.5, 3.0), True, [nn.Threshold]),
    sw("Threshold-at-0", lambda: nn.Threshold(0.0, 1.0), False, [nn.Threshold]),
    sw("PReLU", nn.PReLU, True),
    sw("PReLU-per-channel", lambda: nn.PReLU(8), True, [nn.PReLU]),
    sw("StochasticDepth", lambda: torchvision.ops.StochasticDepth(0.5, "row"), True,
       [torchvision.ops.stochastic_depth]),
    # functions
    *(sw(f.__name__, fn(f), True, [f]) for f in (F.relu, torch.relu, F.relu6, F.elu, F.selu, torch.selu, F.celu,
                                                 F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.softsign,
                                                 F.softshrink, F.hardshrink, F.tanhshrink, torch.neg, torch.abs)),
    sw("F.leaky_relu", fn(lambda x: F.leaky_relu(x, 0.2)), True, [F.leaky_relu]),
    sw("operator.neg", fn(lambda x: -x), True, [operator.neg]),
    sw("torch.sqrt", fn(lambda x: torch.sqrt(torch.abs(x))), True, [torch.sqrt, torch.abs]),
    sw("F.dropout", fn(lambda x: F.dropout(x, 0.5, training=False)), True, [F.dropout]),
    sw("F.dropout1d", fn(lambda x: F.dropout1d(x, 0.5, training=False)), True, [F.dropout1d], nd=1),
    sw("F.dropout2d", fn(lambda x: F.dropout2d(x, 0.5, training=False)), True, [F.dropout2d]),
    sw("F.dropout3d", fn(lambda x: F.dropout3d(x, 0.5, training=False)), True, [F.dropout3d], nd=3),
    sw("F.hardtanh", fn(F.hardtanh), True, [F.hardtanh]),
    sw("F.hardtanh-0.1..1", fn(lambda x: F.hardtanh(x, 0.1, 1.0)), False, [F.hardtanh]),
    sw("F.hardtanh-kw-negative", fn(lambda x: F.hardtanh(x, min_val=-2.0, max_val=-1.0)), False, [F.hardtanh]),
    *(sw(f.__name__, fn(f), False, [f]) for f in (torch.sigmoid, F.hardsigmoid, F.logsigmoid, F.softplus,
                                                  torch.exp, torch.cos)),
    # functional in-place forms
    *(sw(f.__name__, fn(f), True, [f]) for f in (torch.relu_, F.elu_, torch.selu_, torch.tanh_)),
    sw("F.leaky_relu_", fn(lambda x: F.leaky_relu_(x, 0.1)), True, [F.leaky_relu_]),
    sw("F.hardtanh_", fn(lambda x: F.hardtanh_(x, 0.1, 1.0)), False, [F.hardtanh_]),
    sw("torch.clamp_", fn(lambda x: torch.clamp_(x, -1.0, 1.0)), True, [torch.clamp_]),
    *(sw(f.__name__, fn(f), False, [f]) for f in (torch.sigmoid_, torch.exp_)),
    sw("torch.clamp", fn(lambda x: torch.clamp(x, -1.0, 1.0)), True, [torch.clamp]),
    sw("torch.clamp-min", fn(lambda x: torch.clamp(x, min=0.1)), False, [torch.clamp]),
    sw("torch.clamp-max", fn(lambda x: torch.clamp(x, max=-0.1)), False, [torch.clamp]),
    sw("torch.clamp-tensor-bound", fn(lambda x: torch.clamp(x, min=x.amax((2, 3), keepdim=True) + 1.0)), False,
       [torch.clamp]),
    # methods
    *(sw(f".{m}()", fn(lambda x, m=m: getattr(x, m)()), True, [Method(m)])
      for m in ("relu", "relu_", "tanh", "tanh_", "neg", "abs", "contiguous", "clone", "detach", "cpu")),
    sw(".sqrt()", fn(lambda x: x.abs().sqrt()), True, [Method("sqrt"), Method("abs")]),
    sw(".half().float()", fn(lambda x: x.half().float()), True, [Method("half"), Method("float")]),
    sw(".double()", fn(lambda x: x.double().float()), True, [Method("double")]),
    sw(".bfloat16()", fn(lambda x: x.bfloat16().float()), True, [Method("bfloat16")]),
    sw(".to(dtype)", fn(lambda x: x.to(torch.float64).to(torch.float32)), True, [Method("to")]),
    sw(".type_as()", fn(lambda x: x.type_as(x)), True, [Method("type_as")]),
    *(sw(f".{m}()", fn(lambda x, m=m: getattr(x, m)()), False, [Method(m)])
      for m in ("sigmoid", "sigmoid_", "exp", "exp_")),
    sw(".bernoulli_(0.5)", fn(lambda x: x.bernoulli_(0.5)), False, [Method("bernoulli_")]),
    sw(".clamp(min=-1)", fn(lambda x: x.clamp(min=-1.0)), True, [Method("clamp")]),
    sw(".clamp(0.1, 1)", fn(lambda x: x.clamp(0.1, 1.0)), False, [Method("clamp")]),
    sw(".clamp_(max=1)", fn(lambda x: x.clamp_(max=1.0)), True, [Method("clamp_")]),
    sw(".clamp_(0.1, 1)", fn(lambda x: x.clamp_(0.1, 1.0)), False, [Method("clamp_")]),
]

# a binary op with a scalar: x + c is not zero, x * c and x / c are, c / x divides by zero
SCALAR = [
    sw("x+1", fn(lambda x: x + 1.0), False, [operator.add]),
    sw("1+x", fn(lambda x: 1.0 + x), False, [operator.add]),
    sw("x+0", fn(lambda x: x + 0.0), True, [operator.add]),
    sw("torch.add(x,2)", fn(lambda x: torch.add(x, 2.0)), False, [torch.add]),
    sw(".add(2)", fn(lambda x: x.add(2.0)), False, [Method("add")]),
    sw(".add_(1)", fn(lambda x: x.add_(1.0)), False, [Method("add_")]),
    sw("x-1", fn(lambda x: x - 1.0), False, [operator.sub]),
    sw("1-x", fn(lambda x: 1.0 - x), False, [operator.sub]),
    sw("torch.sub(x,0)", fn(lambda x: torch.sub(x, 0.0)), True, [torch.sub]),
    sw(".sub(1)", fn(lambda x: x.sub(1.0)), False, [Method("sub")]),
    sw(".sub_(1)", fn(lambda x: x.sub_(1.0)), False, [Method("sub_")]),
    sw("x*2", fn(lambda x: x * 2.0), True, [operator.mul]),
    sw("2*x", fn(lambda x: 2.0 * x), True, [operator.mul]),
    sw("torch.mul(x,3)", fn(lambda x: torch.mul(x, 3.0)), True, [torch.mul]),
    sw(".mul(3)", fn(lambda x: x.mul(3.0)), True, [Method("mul")]),
    sw(".mul_(2)", fn(lambda x: x.mul_(2.0)), True, [Method("mul_")]),
    sw("x/2", fn(lambda x: x / 2.0), True, [operator.truediv]),
    sw("2/x", fn(lambda x: 2.0 / x), False, [operator.truediv], reason="divisor"),
    sw("torch.div(x,2)", fn(lambda x: torch.div(x, 2.0)), True, [torch.div]),
    sw(".div(2)", fn(lambda x: x.div(2.0)), True, [Method("div")]),
    sw(".div_(2)", fn(lambda x: x.div_(2.0)), True, [Method("div_")]),
]

SPATIAL = [
    *(sw(c.__name__, lambda c=c: c(2), True, [c], nd=1)
      for c in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)),
    sw("LPPool1d", lambda: nn.LPPool1d(2, 2), True, [nn.LPPool1d], nd=1),
    sw("MaxPool2d", lambda: nn.MaxPool2d(3, 2, 1), True, [nn.MaxPool2d]),
    sw("AvgPool2d", lambda: nn.AvgPool2d(2), True, [nn.AvgPool2d]),
    sw("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d(1), True, [nn.AdaptiveAvgPool2d]),
    sw("AdaptiveMaxPool2d", lambda: nn.AdaptiveMaxPool2d((2, 3)), True, [nn.AdaptiveMaxPool2d]),
    sw("LPPool2d", lambda: nn.LPPool2d(2, 2), True, [nn.LPPool2d]),
    *(sw(c.__name__, lambda c=c: c(2), True, [c], nd=3)
      for c in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)),
    *(sw(f.__name__ if hasattr(f, "__name__") else str(f), fn(lambda x, f=f: f(x, 2)), True, [f], nd=nd)
      for nd, fs in ((1, (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)),
                     (2, (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
                     (3, (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)))
      for f in fs),
    sw("F.lp_pool2d", fn(lambda x: F.lp_pool2d(x, 2, 2)), True, [F.lp_pool2d]),
    # interpolation
    sw("F.interpolate", fn(lambda x: F.interpolate(x, scale_factor=2)), True, [F.interpolate]),
    sw("F.interpolate-linear", fn(lambda x: F.interpolate(x, size=5, mode="linear")), True, [F.interpolate], nd=1),
    sw("Upsample-bilinear", lambda: nn.Upsample(scale_factor=2, mode="bilinear"), True, [nn.Upsample]),
    sw("Upsample-trilinear", lambda: nn.Upsample(scale_factor=2, mode="trilinear"), True, [nn.Upsample], nd=3),
    sw("UpsamplingNearest2d", lambda: nn.UpsamplingNearest2d(scale_factor=2), True, [nn.UpsamplingNearest2d]),
    sw("UpsamplingBilinear2d", lambda: nn.UpsamplingBilinear2d(scale_factor=2), True, [nn.UpsamplingBilinear2d]),
    # spatial padding modules: a constant other than 0 is not zero-preserving
    *(sw(f"{kind}Pad{nd}d", lambda kind=kind, nd=nd: getattr(nn, f"{kind}Pad{nd}d")(1), True,
         [getattr(nn, f"{kind}Pad{nd}d")], nd=nd)
      for nd in (1, 2, 3) for kind in ("Zero", "Reflection", "Replication")),
    *(sw(f"ConstantPad{nd}d({value})", lambda nd=nd, value=value: getattr(nn, f"ConstantPad{nd}d")(1, value),
         value == 0.0, [getattr(nn, f"ConstantPad{nd}d")], nd=nd)
      for nd in (1, 2, 3) for value in (0.0, 0.5)),
    # F.pad of spatial dims only
    sw("F.pad-spatial", fn(lambda x: F.pad(x, (1, 1, 2, 0))), True, [F.pad]),
    sw("F.pad-spatial-value", fn(lambda x: F.pad(x, (1, 1, 1, 1), value=0.5)), False, [F.pad]),
    *(sw(f"F.pad-{mode}", fn(lambda x, mode=mode: F.pad(x, (1, 1, 1, 1), mode=mode)), True, [F.pad])
      for mode in ("reflect", "replicate", "circular")),
    # reductions over spatial dims keep the channel dim
    *(sw(f"torch.{name}-spatial", fn(lambda x, name=name: getattr(torch, name)(x, dim=(2, 3), keepdim=True)), True,
         [getattr(torch, name)]) for name in ("mean", "sum", "amax", "amin", "std", "var")),
    *(sw(f".{name}-spatial", fn(lambda x, name=name: getattr(x, name)(dim=(-2, -1), keepdim=True)), True,
         [Method(name)]) for name in ("mean", "sum", "amax", "amin", "std", "var")),
    sw(".max-spatial", fn(lambda x: x.max(dim=-1, keepdim=True)[0]), True, [Method("max"), operator.getitem]),
    sw(".min-spatial", fn(lambda x: x.min(2, keepdim=True).values), True, [Method("min"), getattr]),
    sw("torch.max-spatial", fn(lambda x: torch.max(x, 3, True).values), True, [torch.max]),
    sw("torch.min-spatial", fn(lambda x: torch.min(x, dim=-2, keepdim=True)[0]), True, [torch.min]),
    # normalisation of each channel on its own
    sw("LayerNorm-spatial", lambda: nn.LayerNorm([6, 6]), False, [nn.LayerNorm]),
    sw("LayerNorm-spatial-nobias", lambda: nn.LayerNorm([6, 6], bias=False), True, [nn.LayerNorm]),
    sw("LayerNorm-spatial-plain", lambda: nn.LayerNorm([6, 6], elementwise_affine=False), True, [nn.LayerNorm]),
    sw("F.layer_norm-spatial", fn(lambda x: F.layer_norm(x, (6,))), True, [F.layer_norm]),
    sw("InstanceNorm1d", lambda: nn.InstanceNorm1d(8), True, [nn.InstanceNorm1d], nd=1),
    sw("InstanceNorm2d", lambda: nn.InstanceNorm2d(8), True, [nn.InstanceNorm2d]),
    sw("InstanceNorm3d", lambda: nn.InstanceNorm3d(8), True, [nn.InstanceNorm3d], nd=3),
    sw("InstanceNorm2d-running", lambda: nn.InstanceNorm2d(8, track_running_stats=True), False, [nn.InstanceNorm2d]),
    sw("F.instance_norm", fn(F.instance_norm), True, [F.instance_norm]),
    sw("BatchNorm2d-plain", lambda: nn.BatchNorm2d(8, affine=False), False, [nn.BatchNorm2d]),
    sw("BatchNorm2d-batch-stats", lambda: nn.BatchNorm2d(8, affine=False, track_running_stats=False), True,
       [nn.BatchNorm2d]),
    sw("F.batch_norm-batch-stats", fn(lambda x: F.batch_norm(x, None, None, training=True)), True, [F.batch_norm]),
    sw("GroupNorm-C-plain", lambda: nn.GroupNorm(8, 8, affine=False), True, [nn.GroupNorm]),
    sw("F.group_norm-C", fn(lambda x: F.group_norm(x, 8)), True, [F.group_norm]),
    sw("F.normalize-spatial", fn(lambda x: F.normalize(x, dim=-1)), True, [F.normalize]),
    # reshapes that come back to the same layout, and size arithmetic
    sw("unflatten", fn(lambda x: x.flatten(2).unflatten(2, (6, 6))), True, [Method("flatten"), Method("unflatten")]),
    sw("Unflatten", lambda: nn.Sequential(nn.Flatten(2), nn.Unflatten(2, (6, 6))), True, [nn.Flatten, nn.Unflatten]),
    sw("view_as", fn(lambda x: x.flatten(1).view_as(x)), True, [Method("view_as")]),
    sw("reshape_as", fn(lambda x: x.flatten(1).reshape_as(x)), True, [Method("reshape_as")]),
    sw("size-arithmetic", fn(lambda x: x.view(x.size(0), x.size(1), -1).view(x.shape)), True,
       [Method("size"), getattr, Method("view")]),
    sw("squeeze-unsqueeze", fn(lambda x: torch.unsqueeze(x, 0).squeeze(0)), True,
       [torch.unsqueeze, Method("squeeze")]),
    sw("unsqueeze-squeeze", fn(lambda x: torch.squeeze(x.unsqueeze(2), 2)), True,
       [Method("unsqueeze"), torch.squeeze]),
    sw("split-spatial", fn(lambda x: torch.cat(x.split(3, dim=2), dim=2)), True,
       [Method("split"), torch.cat]),
    sw("chunk-spatial-add", fn(lambda x: torch.chunk(x, 2, -1)[0] + torch.chunk(x, 2, -1)[1]), True,
       [torch.chunk, operator.add]),
    sw("getitem-spatial-crop", fn(lambda x: x[..., 1:-1, ::2]), True, [operator.getitem]),
    sw("getitem-None", fn(lambda x: x[:, :, None].squeeze(2)), True, [operator.getitem]),
    sw("expand-spatial", fn(lambda x: x.mean((2, 3), keepdim=True).expand(-1, -1, 6, 6)), True, [Method("expand")]),
    sw("data", fn(lambda x: x.data), True, [getattr]),
]


@pytest.mark.parametrize(("make", "nd", "keys", "keeps", "reason"), ELEMENTWISE + SCALAR + SPATIAL)
def test_op_between_convs(make: Callable, nd: int, keys: tuple, keeps: bool, reason: str) -> None:
    """conv1 -> op -> conv2: conv1's space is prunable exactly when the op maps zero to zero."""
    torch.manual_seed(0)
    op = make()
    ato = analyse(Sandwich(op, nd), SHAPES[nd], keys)
    sp = space(ato, "conv1")
    assert sp.width == 8
    assert mapping(ato, sp, OUT("conv1"), IN("conv2")) == identity(8)
    assert "conv2" in sp.consumers
    # the table's zero claim, against the op applied to a zero tensor
    with torch.no_grad():
        reality = bool((op(torch.zeros(ato.graph_module.graph.find_nodes(op="call_module", target="conv1")[0]
                                       .meta["tensor_meta"].shape)) == 0).all())
    assert reality == keeps, "the case's expectation is wrong about f(0)"
    lay = layout_into(ato, "conv2")
    assert bool(lay.zero.all()) == keeps and bool(lay.zero.any()) == keeps, lay.zero
    if keeps:
        assert not sp.pinned, sp.reason
    else:
        assert_pinned(sp, reason)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_groups1(nd: int) -> None:
    ato = analyse(Sandwich(nn.ReLU(), nd), SHAPES[nd], cover(CONV[nd]))
    inp, mid, out = ato.spaces
    assert_pinned(inp, "model input")
    assert inp.width == 4 and inp.consumers == ["conv1"]
    assert not mid.pinned and mid.width == 8 and mid.producers == ["conv1"] and mid.consumers == ["conv2"]
    assert_pinned(out, "model output")
    assert out.width == 6
    row = zig_rows(ato, mid)[3]
    assert row == {OUT("conv1"): (3,), ("conv1", "bias", 0): (3,), IN("conv2"): (3,)}


class GroupedChain(nn.Module):
    """conv1 (4 -> 8) -> grouped conv (8 -> cout, groups) -> pw (cout -> 6)."""

    def __init__(self, groups: int, cout: int, nd: int = 2):
        super().__init__()
        self.conv1 = CONV[nd](4, 8, 1)
        self.g = CONV[nd](8, cout, 3, padding=1, groups=groups)
        self.pw = CONV[nd](cout, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.g(torch.relu(self.conv1(x)))))


@pytest.mark.parametrize(("groups", "cout", "nd"), [(8, 8, 2), (8, 16, 2), (8, 8, 1), (8, 24, 3), (2, 12, 2),
                                                    (4, 4, 2)],
                         ids=["depthwise", "multiplier-2", "depthwise-1d", "multiplier-3-3d", "groups-2", "groups-4"])
def test_grouped_conv_couples_whole_groups(groups: int, cout: int, nd: int) -> None:
    """Each group of a grouped conv is one ZIG: its inputs, the producer's filters and its own filters."""
    ato = analyse(GroupedChain(groups, cout, nd), SHAPES[nd], cover(CONV[nd]))
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.width == groups
    assert sp.producers == ["conv1", "g"] and sp.consumers == ["pw"]
    cin_per, out_per = 8 // groups, cout // groups
    expected = {tuple(range(j * cin_per, (j + 1) * cin_per)): tuple(range(j * out_per, (j + 1) * out_per))
                for j in range(groups)}
    assert mapping(ato, sp, OUT("conv1"), OUT("g")) == expected
    for row in zig_rows(ato, sp):
        assert row[OUT("g")] == row[("g", "bias", 0)] == row[IN("pw")]
        assert IN("g") not in row  # a grouped conv's weight keeps its per-group input width


def test_grouped_conv_on_the_model_input_is_pinned() -> None:
    m = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 6, 1))
    ato = analyse(m, SHAPES[2])
    assert_pinned(space(ato, "0"), "model input")


# ---------------------------------------------------------------- functional conv / linear on get_attr weights


class _FunctionalConv:
    """A conv subclass whose own forward calls the functional op on its parameters."""

    fn: Callable
    scale_weight = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * 2 if self.scale_weight else self.weight
        return self.fn(x, w, self.bias, self.stride, self.padding, self.dilation, groups=self.groups)


class FConv1d(_FunctionalConv, nn.Conv1d):
    fn = staticmethod(F.conv1d)


class FConv2d(_FunctionalConv, nn.Conv2d):
    fn = staticmethod(F.conv2d)


class FConv3d(_FunctionalConv, nn.Conv3d):
    fn = staticmethod(F.conv3d)


class FLinear(nn.Linear):
    scale_weight = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 2 if self.scale_weight else self.weight, self.bias)


@pytest.mark.parametrize(("cls", "nd"), [(FConv1d, 1), (FConv2d, 2), (FConv3d, 3)])
def test_functional_conv_on_module_parameters(cls: type, nd: int) -> None:
    m = nn.Sequential(cls(4, 8, 3, padding=1), nn.ReLU(), cls(8, 8, 3, padding=1, groups=8), cls(8, 6, 1))
    ato = analyse(m, SHAPES[nd], cover(cls.fn))
    assert not any(n.op == "call_module" and n.target in ("0", "2", "3") for n in ato.graph_module.graph.nodes)
    sp = space(ato, "0")
    assert not sp.pinned and sp.width == 8 and sp.producers == ["0", "2"] and sp.consumers == ["3"]
    for row in zig_rows(ato, sp):
        assert row[OUT("0")] == row[("0", "bias", 0)] == row[OUT("2")] == row[("2", "bias", 0)] == row[IN("3")]


def test_functional_conv_with_a_computed_weight_pins() -> None:
    conv = FConv2d(8, 6, 1)
    conv.scale_weight = True
    ato = analyse(nn.Sequential(nn.Conv2d(4, 8, 3), conv), SHAPES[2], [F.conv2d])
    assert_pinned(space(ato, "0"), "convolution with a computed weight")


def test_functional_linear_on_module_parameters() -> None:
    ato = analyse(nn.Sequential(FLinear(5, 8), nn.ReLU(), FLinear(8, 3)), (2, 5), cover(F.linear))
    sp = space(ato, "0")
    assert not sp.pinned and sp.consumers == ["2"]
    assert mapping(ato, sp, OUT("0"), IN("2")) == identity(8)

    lin = FLinear(8, 3)
    lin.scale_weight = True
    ato = analyse(nn.Sequential(nn.Linear(5, 8), lin), (2, 5), [F.linear])
    assert_pinned(space(ato, "0"), "linear with a computed weight")


# ---------------------------------------------------------------- conv-transpose, linear


class UpChain(nn.Module):
    def __init__(self, nd: int, groups: int = 1):
        super().__init__()
        self.conv1 = CONV[nd](4, 8, 3, padding=1)
        self.up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1](8, 6, 2, stride=2,
                                                                                        groups=groups)
        self.conv2 = CONV[nd](6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.up(F.relu(self.conv1(x)))))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_transpose(nd: int) -> None:
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
    ato = analyse(UpChain(nd), SHAPES[nd], cover(cls))
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.consumers == ["up"]
    assert mapping(ato, sp, OUT("conv1"), ("up", "weight", 0)) == identity(8)  # weight is (in, out, k...)
    up = space(ato, "up")
    assert not up.pinned and up.width == 6 and up.consumers == ["conv2"]
    for row in zig_rows(ato, up):
        assert row[("up", "weight", 1)] == row[("up", "bias", 0)] == row[IN("conv2")]


def test_grouped_conv_transpose_pins() -> None:
    ato = analyse(UpChain(2, groups=2), SHAPES[2], [nn.ConvTranspose2d])
    assert_pinned(space(ato, "conv1"), "grouped transposed convolution")
    (up,) = [s for s in ato.spaces if "up" in s.nodes and s.name == "up"]
    assert_pinned(up, "grouped transposed convolution")
    assert up.width == 6 and up.consumers == ["conv2"]


def test_linear_mlp() -> None:
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    ato = analyse(m, (2, 5), cover(nn.Linear))
    inp, hidden, out = ato.spaces
    assert_pinned(inp, "model input")
    assert not hidden.pinned and hidden.width == 8 and hidden.consumers == ["2"]
    assert mapping(ato, hidden, OUT("0"), IN("2")) == identity(8)
    assert_pinned(out, "model output")


@pytest.mark.parametrize("bias", [False, True])
def test_linear_over_a_non_channel_last_dim(bias: bool) -> None:
    """Conv1d output (N, C, L) through Linear(L -> 5): channels pass through; a bias breaks zero."""
    m = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 5, bias=bias), nn.Conv1d(8, 6, 1))
    ato = analyse(m, SHAPES[1], [nn.Linear])
    sp = space(ato, "0")
    assert mapping(ato, sp, OUT("0"), IN("2")) == identity(8)
    assert not any(k[0] == "1" for row in zig_rows(ato, sp) for k in row)  # the linear is no channel consumer
    if bias:
        assert_pinned(sp, NOT_ZERO)
    else:
        assert not sp.pinned


# ---------------------------------------------------------------- flatten / view / reshape feeding a linear


class Head(nn.Module):
    """conv (4 -> 3) on a 2x3 map -> flatten-like op -> Linear(18 -> 5)."""

    def __init__(self, flatten: Any):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.flatten = flatten
        self.fc = nn.Linear(18, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(torch.relu(self.conv(x))))


@pytest.mark.parametrize(("make", "keys"), [
    (lambda: nn.Flatten(), cover(nn.Flatten)),
    (lambda: (lambda x: torch.flatten(x, 1)), cover(torch.flatten)),
    (lambda: (lambda x: x.flatten(1)), cover(Method("flatten"))),
    (lambda: (lambda x: x.view(x.size(0), -1)), cover(Method("view"), Method("size"))),
    (lambda: (lambda x: x.reshape(x.shape[0], -1)), cover(Method("reshape"), getattr, operator.getitem)),
    (lambda: (lambda x: torch.reshape(x, (-1, x.numel() // x.size(0)))), cover(torch.reshape, Method("numel"))),
    (lambda: (lambda x: x.flatten(x.dim() - 3)), cover(Method("dim"))),
], ids=["nn.Flatten", "torch.flatten", ".flatten", ".view(size)", ".reshape(shape)", "torch.reshape(numel)",
        ".flatten(dim())"])
def test_flatten_feeds_a_linear(make: Callable, keys: tuple) -> None:
    """Channel c becomes the block of features [6c, 6c + 6) of the linear's input."""
    ato = analyse(Head(make()), (2, 4, 2, 3), keys)
    sp = space(ato, "conv")
    assert not sp.pinned and sp.width == 3 and sp.consumers == ["fc"]
    assert mapping(ato, sp, OUT("conv"), IN("fc")) == {(c,): tuple(range(6 * c, 6 * c + 6)) for c in range(3)}


# ---------------------------------------------------------------- channel shuffle


class Shuffle(nn.Module):
    def __init__(self, shuffle: Any, concat: bool = False):
        super().__init__()
        self.concat = concat
        self.a = nn.Conv2d(4, 4 if concat else 8, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.shuffle = shuffle
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1) if self.concat else self.a(x)
        return self.conv2(self.shuffle(y))


def view_transpose_view(g: int) -> Callable:
    def shuffle(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    return shuffle


SHUFFLES = [
    pytest.param(lambda: view_transpose_view(2), 2, cover(Method("view"), Method("transpose"), Method("contiguous")),
                 id="view-transpose-view-2"),
    pytest.param(lambda: view_transpose_view(4), 4, (Method("view"), Method("transpose")), id="view-transpose-view-4"),
    pytest.param(lambda: nn.ChannelShuffle(2), 2, cover(nn.ChannelShuffle), id="nn.ChannelShuffle"),
    pytest.param(lambda: (lambda x: F.channel_shuffle(x, 4)), 4, cover(F.channel_shuffle, torch.channel_shuffle),
                 id="F.channel_shuffle"),
]


def _positions_after(shuffle: Callable, channels: Iterable[int]) -> tuple[int, ...]:
    """Where the given input channels land: the shuffle applied to a tensor of channel numbers."""
    out = shuffle(torch.arange(8.0).view(1, 8, 1, 1)).flatten().tolist()
    return tuple(sorted(out.index(c) for c in channels))


@pytest.mark.parametrize(("make", "g", "keys"), SHUFFLES)
def test_channel_shuffle_couples_the_same_index_of_every_group(make: Callable, g: int, keys: tuple) -> None:
    shuffle = make()
    ato = analyse(Shuffle(shuffle), SHAPES[2], keys)
    sp = space(ato, "a")
    per = 8 // g
    assert not sp.pinned and sp.width == per
    expected = {tuple(b + k * per for k in range(g)): _positions_after(shuffle, [b + k * per for k in range(g)])
                for b in range(per)}
    assert mapping(ato, sp, OUT("a"), IN("conv2")) == expected
    if g == 2:  # worked out by hand: output 2b comes from channel b, output 2b + 1 from channel 4 + b
        assert expected == {(b, 4 + b): (2 * b, 2 * b + 1) for b in range(4)}


@pytest.mark.parametrize(("make", "g", "keys"), SHUFFLES[:1] + SHUFFLES[2:3])
def test_channel_shuffle_after_concat_couples_both_branches(make: Callable, g: int, keys: tuple) -> None:
    """ShuffleNetV2: channel k of branch a and channel k of branch b end up side by side."""
    ato = analyse(Shuffle(make(), concat=True), SHAPES[2], keys)
    sp = space(ato, "a")
    assert not sp.pinned and set(sp.producers) == {"a", "b"} and sp.width == 4
    for row in zig_rows(ato, sp):
        (k,) = row[OUT("a")]
        assert row[OUT("b")] == (k,) and row[IN("conv2")] == (2 * k, 2 * k + 1)


# ---------------------------------------------------------------- norms with parameters


class NormChain(nn.Module):
    def __init__(self, norm: nn.Module, nd: int = 2, linear: bool = False):
        super().__init__()
        self.conv1 = nn.Linear(5, 8) if linear else CONV[nd](4, 8, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Linear(8, 6) if linear else CONV[nd](8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm(self.conv1(x))))


class FBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class FGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class FInstanceNorm2d(nn.InstanceNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias)


AFFINE_NORMS = [
    pytest.param(lambda: nn.BatchNorm1d(8), 1, False, cover(nn.BatchNorm1d), True, id="BatchNorm1d"),
    pytest.param(lambda: nn.BatchNorm1d(8), 2, True, (nn.BatchNorm1d,), True, id="BatchNorm1d-2D"),
    pytest.param(lambda: nn.BatchNorm2d(8), 2, False, cover(nn.BatchNorm2d), True, id="BatchNorm2d"),
    pytest.param(lambda: nn.BatchNorm3d(8), 3, False, cover(nn.BatchNorm3d), True, id="BatchNorm3d"),
    pytest.param(lambda: nn.SyncBatchNorm(8), 2, False, cover(nn.SyncBatchNorm), True, id="SyncBatchNorm"),
    pytest.param(lambda: nn.InstanceNorm1d(8, affine=True), 1, False, cover(nn.InstanceNorm1d), False,
                 id="InstanceNorm1d"),
    pytest.param(lambda: nn.InstanceNorm2d(8, affine=True), 2, False, cover(nn.InstanceNorm2d), False,
                 id="InstanceNorm2d"),
    pytest.param(lambda: nn.InstanceNorm3d(8, affine=True, track_running_stats=True), 3, False,
                 cover(nn.InstanceNorm3d), True, id="InstanceNorm3d-running"),
    pytest.param(lambda: FBatchNorm2d(8), 2, False, cover(F.batch_norm), True, id="F.batch_norm"),
    pytest.param(lambda: FInstanceNorm2d(8, affine=True), 2, False, cover(F.instance_norm), False,
                 id="F.instance_norm"),
    pytest.param(lambda: nn.GroupNorm(8, 8), 2, False, cover(nn.GroupNorm), False, id="GroupNorm-C"),
    pytest.param(lambda: FGroupNorm(8, 8), 2, False, cover(F.group_norm), False, id="F.group_norm-C"),
]


@pytest.mark.parametrize(("make", "nd", "linear", "keys", "stats"), AFFINE_NORMS)
def test_affine_norm_joins_the_producer_zig(make: Callable, nd: int, linear: bool, keys: tuple, stats: bool) -> None:
    """gamma/beta are part of the ZIG (role out); running statistics are removed with it (role in)."""
    ato = analyse(NormChain(make(), nd, linear), (2, 5) if linear else SHAPES[nd], keys)
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.width == 8 and sp.producers == ["conv1", "norm"] and sp.consumers == ["conv2"]
    for row in zig_rows(ato, sp):
        (c,) = row[OUT("conv1")]
        assert row[("norm", "weight", 0)] == row[("norm", "bias", 0)] == row[IN("conv2")] == (c,)
        assert (row.get(("norm", "running_mean", 0)) == (c,)) == stats
    outs = {(m, n) for m, n, _, _ in ato.zigs.zig_slices(sp.index, 0, ("out",))}
    assert outs == {("conv1", "weight"), ("conv1", "bias"), ("norm", "weight"), ("norm", "bias")}


@pytest.mark.parametrize(("make", "keys"), [
    (lambda: nn.GroupNorm(1, 8, affine=False), (nn.GroupNorm,)),
    (lambda: FGroupNorm(1, 8), (F.group_norm,)),
], ids=["GroupNorm-1-plain", "F.group_norm-1"])
def test_group_norm_with_one_group_pins(make: Callable, keys: tuple) -> None:
    ato = analyse(NormChain(make()), SHAPES[2], keys)
    assert_pinned(space(ato, "conv1"), "GroupNorm normalises across all channels")


@pytest.mark.parametrize(("make", "keys", "groups"), [
    (lambda: nn.GroupNorm(2, 8), (nn.GroupNorm,), 2),
    (lambda: nn.GroupNorm(4, 8, affine=False), (nn.GroupNorm,), 4),
    (lambda: FGroupNorm(4, 8), (F.group_norm,), 4),
], ids=["GroupNorm-2", "GroupNorm-4-plain", "F.group_norm-4"])
def test_group_norm_prunes_whole_groups(make: Callable, keys: tuple, groups: int) -> None:
    """A group's channels share statistics: one ZIG per group, holding its channels of conv1 and the norm."""
    ato = analyse(NormChain(make()), SHAPES[2], keys)
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.width == groups
    per = 8 // groups
    assert sorted(row[OUT("conv1")] for row in zig_rows(ato, sp)) == [
        tuple(range(g * per, (g + 1) * per)) for g in range(groups)]
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))  # the equivalence check runs inside
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in ato.model.parameters())


class ComputedAffine(nn.Module):
    """A functional norm whose weight and bias are computed (as in conditional normalisation)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.ones(8))
        self.b = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.w * 2, self.b + 1)


@pytest.mark.parametrize(("norm", "keys"), [
    (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (F.instance_norm,)),
    (lambda x, w, b: F.group_norm(x, 8, w, b), (F.group_norm,)),
    (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (F.batch_norm,)),
], ids=["F.instance_norm", "F.group_norm", "F.batch_norm"])
def test_functional_norm_with_computed_parameters_is_not_zero(norm: Callable, keys: tuple) -> None:
    """The computed bias cannot be zeroed with the ZIG, so the channel is not zero and cannot be sliced."""
    ato = analyse(NormChain(ComputedAffine(norm)), SHAPES[2], keys)
    sp = space(ato, "conv1")
    assert_pinned(sp, "computed")
    assert not layout_into(ato, "conv2").zero.any()


def test_norm_over_a_dim_that_is_not_the_channel_pins() -> None:
    """BatchNorm1d on (N, L, C) normalises L; the tracked channel sits on dim 2."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
            self.bn = nn.BatchNorm1d(8)
            self.conv2 = nn.Conv1d(8, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(self.bn(self.conv1(x).transpose(1, 2)).transpose(1, 2))

    ato = analyse(M(), SHAPES[1], [nn.BatchNorm1d])
    assert_pinned(space(ato, "conv1"), "normalisation over a dim that is not the tracked channel dim")


class ConvNeXtBlock(nn.Module):
    """dwconv -> permute -> LayerNorm(C) -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> permute -> + x."""

    def __init__(self, functional_ln: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.functional_ln = functional_ln
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (8,), self.ln.weight, self.ln.bias) if self.functional_ln else self.ln(y)
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(x + y)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.LayerNorm", "F.layer_norm"])
def test_layer_norm_over_channels_pins_the_stream_not_the_mlp(functional: bool) -> None:
    ato = analyse(ConvNeXtBlock(functional), SHAPES[2], cover(F.layer_norm if functional else nn.LayerNorm,
                                                             Method("permute")))
    assert_pinned(space(ato, "stem"), "LayerNorm normalises over the channel dim")
    hidden = space(ato, "fc1")
    assert not hidden.pinned and hidden.width == 16 and hidden.consumers == ["fc2"]
    assert mapping(ato, hidden, OUT("fc1"), IN("fc2")) == identity(16)


# ---------------------------------------------------------------- binary ops between tracked tensors


class TwoBranches(nn.Module):
    def __init__(self, op: Callable, cb: int = 8, pool_b: bool = False):
        super().__init__()
        self.op = op
        self.pool_b = pool_b
        self.ca = nn.Conv2d(4, 8, 3, padding=1)
        self.cb = nn.Conv2d(4, cb, 3, padding=1)
        self.cc = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.cb(x.mean((2, 3), keepdim=True) if self.pool_b else x)
        return self.cc(self.op(self.ca(x), b))


BINARY = [
    *(pytest.param(f, cover(*keys), kind, id=name) for name, f, keys, kind in [
        ("a+b", lambda a, b: a + b, [operator.add], "add"),
        ("torch.add", lambda a, b: torch.add(a, b, alpha=2), [torch.add], "add"),
        (".add", lambda a, b: a.add(b), [Method("add")], "add"),
        (".add_", lambda a, b: a.add_(b), [Method("add_")], "add"),
        ("a-b", lambda a, b: a - b, [operator.sub], "sub"),
        ("torch.sub", lambda a, b: torch.sub(a, b), [torch.sub], "sub"),
        (".sub", lambda a, b: a.sub(b), [Method("sub")], "sub"),
        (".sub_", lambda a, b: a.sub_(b), [Method("sub_")], "sub"),
        ("a*b", lambda a, b: a * b, [operator.mul], "mul"),
        ("torch.mul", lambda a, b: torch.mul(a, b), [torch.mul], "mul"),
        (".mul", lambda a, b: a.mul(b), [Method("mul")], "mul"),
        (".mul_", lambda a, b: a.mul_(b), [Method("mul_")], "mul"),
        ("a/b", lambda a, b: a / b, [operator.truediv], "div"),
        ("torch.div", lambda a, b: torch.div(a, b), [torch.div], "div"),
        (".div", lambda a, b: a.div(b), [Method("div")], "div"),
        (".div_", lambda a, b: a.div_(b), [Method("div_")], "div"),
    ]),
]


@pytest.mark.parametrize(("op", "keys", "kind"), BINARY)
@pytest.mark.parametrize("pool_b", [False, True], ids=["same-shape", "broadcast-HW"])
def test_binary_op_couples_both_operands(op: Callable, keys: tuple, kind: str, pool_b: bool) -> None:
    """a (op) b: channel c of both operands is one ZIG; a channel used as a divisor pins."""
    ato = analyse(TwoBranches(op, pool_b=pool_b), SHAPES[2], keys)
    sp = space(ato, "ca")
    assert sp.width == 8 and set(sp.producers) == {"ca", "cb"} and sp.consumers == ["cc"]
    for row in zig_rows(ato, sp):
        assert row[OUT("ca")] == row[OUT("cb")] == row[IN("cc")]
    if kind == "div":
        assert_pinned(sp, "a channel used as a divisor")
    else:
        assert not sp.pinned, sp.reason


@pytest.mark.parametrize(("op", "prunable"), [(operator.mul, True), (operator.add, False)], ids=["mul", "add"])
def test_single_channel_broadcast(op: Callable, prunable: bool) -> None:
    """Spatial attention: a (N, 8, H, W) op sigmoid(b) with b (N, 1, H, W): b's one channel is pinned."""
    ato = analyse(TwoBranches(lambda a, b: op(a, torch.sigmoid(b)), cb=1), SHAPES[2], [op])
    assert_pinned(space(ato, "cb"), "a single channel broadcast across 8 channels")
    sp = space(ato, "ca")
    if prunable:
        assert not sp.pinned and mapping(ato, sp, OUT("ca"), IN("cc")) == identity(8)
    else:
        assert_pinned(sp, NOT_ZERO)


def test_operands_with_channels_on_different_dims_pin() -> None:
    m = Sandwich(lambda x: x + x.transpose(1, 2))
    ato = analyse(m, (1, 4, 8, 8), [operator.add, Method("transpose")])
    assert_pinned(space(ato, "conv1"), "channels lie on different dims")


def test_max_of_everything_or_of_two_tensors_pins() -> None:
    """`x / x.max()` depends on every channel; `torch.max(a, b)` (elementwise) is not followed."""
    assert_pinned(space(analyse(Sandwich(lambda x: x / x.max()), SHAPES[2], [Method("max")]), "conv1"),
                  "max() over the channel dim")
    ato = analyse(TwoBranches(lambda a, b: torch.max(a, b)), SHAPES[2], [torch.max])
    assert_pinned(space(ato, "ca"), "elementwise max() of two tensors")


class SE(nn.Module):
    """conv -> x * sigmoid(fc2(relu(fc1(pool(x))))) -> conv2, the squeeze-excitation block."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        linear = style != "conv"
        self.fc1 = nn.Linear(8, 2) if linear else nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Linear(2, 8) if linear else nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        if self.style == "conv":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
            y = x * s
        elif self.style == "squeeze":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(torch.squeeze(x.mean((2, 3), keepdim=True), -1).squeeze(-1)))))
            y = torch.unsqueeze(s, -1).unsqueeze(-1).expand_as(x) * x
        else:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
            y = x * s.view(x.size(0), -1, 1, 1).expand(-1, -1, x.shape[2], x.shape[3])
        return self.conv2(y)


@pytest.mark.parametrize(("style", "keys"), [
    ("conv", (operator.mul, F.adaptive_avg_pool2d)),
    ("squeeze", cover(torch.squeeze, Method("squeeze"), torch.unsqueeze, Method("unsqueeze"), Method("expand_as"))),
    ("view", cover(Method("mean"), Method("view"), Method("expand"))),
])
def test_squeeze_excitation(style: str, keys: tuple) -> None:
    """The excitation output is coupled with the channels it scales; the bottleneck is its own space."""
    ato = analyse(SE(style), SHAPES[2], keys)
    sp = space(ato, "conv")
    assert not sp.pinned and sp.width == 8
    assert set(sp.producers) == {"conv", "fc2"} and set(sp.consumers) == {"fc1", "conv2"}
    for row in zig_rows(ato, sp):
        assert row[OUT("conv")] == row[OUT("fc2")] == row[IN("fc1")] == row[IN("conv2")]
    bottleneck = space(ato, "fc1")
    assert not bottleneck.pinned and bottleneck.width == 2
    assert mapping(ato, bottleneck, OUT("fc1"), IN("fc2")) == identity(2)


class Scaled(nn.Module):
    """conv -> x (op) per-channel tensor of this module -> conv2."""

    def __init__(self, op: Callable, shape: tuple[int, ...], parameter: bool):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.block = nn.Module()
        if parameter:
            self.block.scale = nn.Parameter(torch.ones(shape))
        else:
            self.block.register_buffer("scale", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.op(self.conv(x), self.block.scale))


@pytest.mark.parametrize(("op", "shape", "parameter", "role", "keeps"), [
    (operator.mul, (8, 1, 1), True, "out", True),  # layer scale: zeroing it zeroes the channel
    (torch.mul, (1, 8, 1, 1), True, "out", True),
    (operator.add, (8, 1, 1), True, "out", True),  # a learnable bias: part of the ZIG
    (operator.mul, (8, 1, 1), False, "in", True),  # a fixed per-channel buffer
    (operator.add, (8, 1, 1), False, "in", False),  # a fixed offset: never zero
    (operator.truediv, (8, 1, 1), True, "in", True),
], ids=["layer-scale", "torch.mul-4d", "param-bias", "buffer-scale", "buffer-offset", "div-by-param"])
def test_per_channel_parameter_operand(op: Callable, shape: tuple, parameter: bool, role: str, keeps: bool) -> None:
    ato = analyse(Scaled(op, shape, parameter), SHAPES[2], [op])
    sp = space(ato, "conv")
    dim = len(shape) - 3
    for row in zig_rows(ato, sp):
        assert row[OUT("conv")] == row[("block", "scale", dim)] == row[IN("conv2")]
    roles = {(m, n): r for z in range(sp.width) for r in ("out", "in")
             for m, n, _, _ in ato.zigs.zig_slices(sp.index, z, (r,))}
    assert roles[("block", "scale")] == role
    if keeps:
        assert not sp.pinned, sp.reason
    else:
        assert_pinned(sp, NOT_ZERO)


def test_computed_per_channel_operand_pins() -> None:
    ato = analyse(Scaled(lambda x, s: x * s.abs(), (8, 1, 1), True), SHAPES[2], [operator.mul])
    assert_pinned(space(ato, "conv"), "computed per-channel tensor that cannot be sliced")


@pytest.mark.parametrize("new", ["new_empty", "new_zeros", "new_ones", "new_full"])
def test_a_tensor_made_by_new_carries_no_channels(new: str) -> None:
    """Drop-path as users copy it, `x * x.new_empty((n, 1, 1, 1)).bernoulli_(p)`: the stream stays prunable."""

    def drop_path(x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[0], 1, 1, 1)
        return x * getattr(x, new)(*((size, 1.0) if new == "new_full" else (size,))).bernoulli_(0.8) / 0.8

    ato = analyse(Sandwich(drop_path), SHAPES[2], cover(Method(new), Method("bernoulli_")))
    assert not space(ato, "conv1").pinned, space(ato, "conv1").reason
    assert not ato.zigs.facts.unknown_ops


# ---------------------------------------------------------------- cat, split, chunk, getitem, pad


class Concat(nn.Module):
    def __init__(self, cat: Callable, wa: int = 3, wb: int = 5, dense: bool = False):
        super().__init__()
        self.cat, self.dense = cat, dense
        self.ca = nn.Conv2d(4, wa, 3, padding=1)
        self.cb = nn.Conv2d(wa if dense else 4, wb, 3, padding=1)
        self.cc = nn.Conv2d(wa + wb, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ca(x)
        b = self.cb(F.relu(a) if self.dense else x)
        return self.cc(self.cat([a, b], 1))


@pytest.mark.parametrize("cat", [torch.cat, torch.concat, torch.concatenate])
def test_cat_offsets(cat: Callable) -> None:
    ato = analyse(Concat(lambda xs, d: cat(xs, d)), SHAPES[2], cover(cat))
    a, b = space(ato, "ca"), space(ato, "cb")
    assert not a.pinned and not b.pinned and (a.width, b.width) == (3, 5)
    assert mapping(ato, a, OUT("ca"), IN("cc")) == identity(3)
    assert mapping(ato, b, OUT("cb"), IN("cc")) == identity(5, offset=3)


def test_dense_concat() -> None:
    """DenseNet: layer a is read by layer b and, at offset 0, by the concat's consumer."""
    ato = analyse(Concat(lambda xs, d: torch.cat(xs, dim=d), dense=True, wa=3, wb=2), SHAPES[2], [torch.cat])
    a, b = space(ato, "ca"), space(ato, "cb")
    assert set(a.consumers) == {"cb", "cc"} and b.consumers == ["cc"]
    assert mapping(ato, a, OUT("ca"), IN("cb")) == mapping(ato, a, OUT("ca"), IN("cc")) == identity(3)
    assert mapping(ato, b, OUT("cb"), IN("cc")) == identity(2, offset=3)


def test_cat_with_an_untracked_tensor_pins_only_that_part() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.register_buffer("extra", torch.ones(1, 2, 1, 1))
            self.conv2 = nn.Conv2d(10, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.conv2(torch.cat([y, self.extra.expand(2, -1, 6, 6)], 1))  # a constant for fx

    ato = analyse(M(), SHAPES[2], [torch.cat])
    sp = space(ato, "conv")
    assert not sp.pinned and mapping(ato, sp, OUT("conv"), IN("conv2")) == identity(8)
    extra = [s for s in ato.spaces if s.pinned and "concatenated untracked tensor" in s.reason]
    assert [s.width for s in extra] == [2]


def test_cat_along_a_spatial_dim_couples_the_inputs() -> None:
    m = Concat(lambda xs, d: torch.cat(xs, dim=2), wa=8, wb=8)
    m.cc = nn.Conv2d(8, 6, 1)
    ato = analyse(m, SHAPES[2], [torch.cat])
    sp = space(ato, "ca")
    assert not sp.pinned and set(sp.producers) == {"ca", "cb"}
    for row in zig_rows(ato, sp):
        assert row[OUT("ca")] == row[OUT("cb")] == row[IN("cc")]


def test_cat_mixing_channel_dims_pins() -> None:
    ato = analyse(Sandwich(lambda x: torch.cat([x, x.transpose(1, 2)], 3)[..., :8]), (1, 4, 8, 8), [torch.cat])
    assert_pinned(space(ato, "conv1"), "concatenation that mixes channel dims")


def test_cat_of_a_slice_of_split_outputs() -> None:
    """torch.cat(parts[1:]) gets one tuple-valued node, not a list."""

    def op(x: torch.Tensor) -> torch.Tensor:
        parts = x.split(2, 1)
        return torch.cat(parts[1:] + parts[:1], 1)

    ato = analyse(Sandwich(op), SHAPES[2], [Method("split"), operator.getitem, torch.cat])
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.width == 2  # equal splits shrink together
    for row in zig_rows(ato, sp):
        (k, *_) = row[OUT("conv1")]
        assert row[OUT("conv1")] == (k, k + 2, k + 4, k + 6)
        assert row[IN("conv2")] == (k, k + 2, k + 4, k + 6)  # parts 1, 2, 3, 0 at offsets 0, 2, 4, 6


class Split(nn.Module):
    """conv (4 -> 8) -> two parts -> convs a (w0 -> 6) and b (w1 -> 6), summed."""

    def __init__(self, split: Callable, widths: tuple[int, ...]):
        super().__init__()
        self.split = split
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(w, 6, 1) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.split(self.conv(x))
        out = self.heads[0](parts[0])
        for i in range(1, len(self.heads)):
            out = out + self.heads[i](parts[i])
        return out


@pytest.mark.parametrize(("split", "keys"), [
    (lambda x: torch.chunk(x, 2, 1), cover(torch.chunk, operator.getitem)),
    (lambda x: x.chunk(2, dim=1), cover(Method("chunk"))),
    (lambda x: torch.split(x, 4, 1), cover(torch.split)),
    (lambda x: x.split(4, dim=1), cover(Method("split"))),
], ids=["torch.chunk", ".chunk", "torch.split-int", ".split-int"])
def test_equal_split_couples_the_halves(split: Callable, keys: tuple) -> None:
    ato = analyse(Split(split, (4, 4)), SHAPES[2], keys)
    sp = space(ato, "conv")
    assert not sp.pinned and sp.width == 4 and set(sp.consumers) == {"heads.0", "heads.1"}
    assert mapping(ato, sp, OUT("conv"), IN("heads.0")) == {(k, 4 + k): (k,) for k in range(4)}
    assert mapping(ato, sp, OUT("conv"), IN("heads.1")) == {(k, 4 + k): (k,) for k in range(4)}


@pytest.mark.parametrize("split", [lambda x: torch.split(x, [3, 5], 1), lambda x: x.split([3, 5], dim=1),
                                   lambda x: (x[:, :3], x[:, 3:])],
                         ids=["torch.split-sections", ".split-sections", "getitem-slices"])
def test_split_sections_are_separate_spaces(split: Callable) -> None:
    ato = analyse(Split(split, (3, 5)), SHAPES[2], [operator.getitem])
    first, second = spaces_of(ato, "conv")
    assert not first.pinned and not second.pinned and (first.width, second.width) == (3, 5)
    assert mapping(ato, first, OUT("conv"), IN("heads.0")) == identity(3)
    assert mapping(ato, second, OUT("conv"), IN("heads.1")) == {(3 + k,): (k,) for k in range(5)}


@pytest.mark.parametrize("op", [lambda: nn.Sequential(nn.Flatten(1), nn.Unflatten(1, (8, 6, 6))),
                                lambda: (lambda x: x.flatten(1).unflatten(1, (8, 6, 6)))], ids=["Unflatten", ".unflatten"])
def test_unflatten_to_a_channel_count_written_as_a_number_pins(op: Callable) -> None:
    """The 8 in `(8, 6, 6)` would stay 8 after pruning (it is not rewritten): the channels are pinned."""
    ato = analyse(Sandwich(op()), SHAPES[2])
    assert_pinned(space(ato, "conv1"), "unflatten to sizes written as numbers")


def test_unflatten_with_a_computed_channel_count_prunes() -> None:
    model = Sandwich(lambda x: x.flatten(1).unflatten(1, (-1, 6, 6)))
    ato = analyse(model, SHAPES[2], [Method("unflatten")])
    assert not space(ato, "conv1").pinned
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))  # checked against the masked model
    assert small.conv1.out_channels == 4


def test_unequal_chunks_pin() -> None:
    ato = analyse(Split(lambda x: x.chunk(3, dim=1), (3, 3, 2)), SHAPES[2], [Method("chunk")])
    assert all(s.pinned and "chunks of unequal size" in s.reason for s in spaces_of(ato, "conv"))


@pytest.mark.parametrize(("index", "expected"), [
    (lambda x: x[:, 2:6], {(2 + k,): (k,) for k in range(4)}),
    (lambda x: x[:, -4:], {(4 + k,): (k,) for k in range(4)}),
    (lambda x: x[:, ::2], {(2 * k,): (k,) for k in range(4)}),
    (lambda x: x[:, 1::2, :, :], {(2 * k + 1,): (k,) for k in range(4)}),
], ids=["2:6", "-4:", "::2", "1::2"])
def test_getitem_channel_slice(index: Callable, expected: dict) -> None:
    m = Sandwich(index)
    m.conv2 = nn.Conv2d(4, 6, 1)
    ato = analyse(m, SHAPES[2], [operator.getitem])
    read = [s for s in spaces_of(ato, "conv1") if s.consumers == ["conv2"]]
    assert len(read) == 1 and not read[0].pinned
    assert mapping(ato, read[0], OUT("conv1"), IN("conv2")) == expected


@pytest.mark.parametrize(("index", "width"), [(lambda x: x[:, 3].unsqueeze(1), 1), (lambda x: x[:, [0, 2, 4, 6]], 4),
                                            (lambda x: x[:, torch.arange(4)], 4)], ids=["int", "list", "tensor"])
def test_getitem_selecting_single_channels_pins(index: Callable, width: int) -> None:
    m = Sandwich(index)
    m.conv2 = nn.Conv2d(width, 6, 1)
    ato = analyse(m, SHAPES[2], [operator.getitem], unknown=True)
    assert_pinned(space(ato, "conv1"), "indexing that selects single channels")


@pytest.mark.parametrize(("pad", "keeps"), [((0, 0, 0, 0, 1, 2), True), ((1, 1, 1, 1, 1, 2), True)],
                         ids=["channels-only", "channels-and-spatial"])
def test_channel_padding_offsets_the_consumer(pad: tuple, keeps: bool) -> None:
    m = Sandwich(lambda x: F.pad(x, pad))
    m.conv2 = nn.Conv2d(11, 6, 1)
    ato = analyse(m, SHAPES[2], cover(F.pad))
    sp = space(ato, "conv1")
    assert not sp.pinned and mapping(ato, sp, OUT("conv1"), IN("conv2")) == identity(8, offset=1)
    padding = [s for s in ato.spaces if s.pinned and s.reason.startswith("channel padding")]
    assert [s.width for s in padding] == [3]


def test_channel_padding_with_a_value_is_not_zero() -> None:
    """F.pad with value 1 on the channel and spatial dims writes 1s into the border of every channel."""
    m = Sandwich(lambda x: F.pad(x, (1, 1, 1, 1, 1, 2), value=1.0))
    m.conv2 = nn.Conv2d(11, 6, 1)
    ato = analyse(m, SHAPES[2], [F.pad])
    assert_pinned(space(ato, "conv1"), NOT_ZERO)
    assert not layout_into(ato, "conv2").zero.any()


def test_channel_cropping_pins() -> None:
    m = Sandwich(lambda x: F.pad(x, (0, 0, 0, 0, -1, -1)))
    m.conv2 = nn.Conv2d(6, 6, 1)
    ato = analyse(m, SHAPES[2], [F.pad])
    assert_pinned(space(ato, "conv1"), "constant padding or cropping of the channel dim")


# ---------------------------------------------------------------- permute / transpose to channels-last


class ChannelsLast(nn.Module):
    def __init__(self, to_last: Callable):
        super().__init__()
        self.to_last = to_last
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.to_last(F.relu(self.conv(x))))


@pytest.mark.parametrize(("to_last", "keys"), [
    (lambda x: torch.permute(x, (0, 2, 3, 1)), cover(torch.permute)),
    (lambda x: x.permute(0, 2, 3, 1), cover(Method("permute"))),
    (lambda x: x.permute((0, -2, -1, -3)), (Method("permute"),)),
    (lambda x: torch.transpose(x, 1, 3), cover(torch.transpose)),
    (lambda x: x.transpose(1, -1), cover(Method("transpose"))),
    (lambda x: torch.swapaxes(x, 3, 1), cover(torch.swapaxes)),
    (lambda x: x.swapaxes(1, 3), cover(Method("swapaxes"))),
    (lambda x: torch.movedim(x, 1, -1), cover(torch.movedim)),
    (lambda x: x.movedim(1, 3), cover(Method("movedim"))),
    (lambda x: torch.movedim(x, (1, 2), (3, 1)), (torch.movedim,)),
], ids=["torch.permute", ".permute", ".permute-tuple", "torch.transpose", ".transpose", "torch.swapaxes",
        ".swapaxes", "torch.movedim", ".movedim", "torch.movedim-seq"])
def test_permute_moves_the_channel_dim(to_last: Callable, keys: tuple) -> None:
    ato = analyse(ChannelsLast(to_last), SHAPES[2], keys)
    sp = space(ato, "conv")
    assert not sp.pinned and sp.consumers == ["fc"]
    assert mapping(ato, sp, OUT("conv"), IN("fc")) == identity(8)


# ---------------------------------------------------------------- reductions, pooling over channels, expand


@pytest.mark.parametrize(("reduce", "keys", "reason"), [
    (lambda x: F.relu(x).sum(1, keepdim=True), (Method("sum"),), None),
    (lambda x: torch.sum(torch.sigmoid(x), dim=1, keepdim=True), (torch.sum,), "before sum() over channels"),
    (lambda x: x.mean(1, keepdim=True), (Method("mean"),), "mean() over the channel dim"),
    (lambda x: torch.mean(x, dim=(1, 2), keepdim=True), (torch.mean,), "mean() over the channel dim"),
    (lambda x: x.amax(1, keepdim=True), (Method("amax"),), "amax() over the channel dim"),
    (lambda x: torch.amin(x, 1, keepdim=True), (torch.amin,), "amin() over the channel dim"),
    (lambda x: x.std(1, keepdim=True), (Method("std"),), "std() over the channel dim"),
    (lambda x: torch.var(x, dim=1, keepdim=True), (torch.var,), "var() over the channel dim"),
    (lambda x: x.max(1, keepdim=True)[0], (Method("max"),), "max() over the channel dim"),
    (lambda x: torch.min(x, dim=1, keepdim=True).values, (torch.min,), "min() over the channel dim"),
], ids=["sum", "sum-after-sigmoid", "mean", "mean-2-dims", "amax", "amin", "std", "var", "max", "min"])
def test_reduction_over_channels(reduce: Callable, keys: tuple, reason: str | None) -> None:
    """A sum over channels only needs dropped channels to be zero; a mean or max depends on the width."""
    m = Sandwich(reduce)
    m.conv2 = nn.Conv2d(1, 6, 1)
    ato = analyse(m, SHAPES[2], keys)
    sp = space(ato, "conv1")
    assert sp.consumers == []  # the reduced tensor no longer carries conv1's channels
    if reason is None:
        assert not sp.pinned, sp.reason
    else:
        assert_pinned(sp, reason)


def test_global_pool_then_linear() -> None:
    """x.mean((2, 3)) drops the spatial dims: the channel dim stays dim 1, read by the classifier."""
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    ato = analyse(m, SHAPES[2], [nn.AdaptiveAvgPool2d, nn.Flatten])
    assert mapping(ato, space(ato, "0"), OUT("0"), IN("4")) == identity(8)
    ato = analyse(ChannelsLast(lambda x: torch.mean(x, (2, 3))), SHAPES[2], [torch.mean])
    assert mapping(ato, space(ato, "conv"), OUT("conv"), IN("fc")) == identity(8)


def test_pooling_over_the_channel_dim_pins() -> None:
    """MaxPool1d on (N, L, C) pools the channels."""
    pool = nn.MaxPool1d(2)
    m = Sandwich(lambda x: pool(x.transpose(1, 2)).transpose(1, 2), nd=1)
    m.pool = pool
    m.conv2 = nn.Conv1d(4, 6, 1)
    ato = analyse(m, SHAPES[1], [nn.MaxPool1d])
    assert_pinned(space(ato, "conv1"), "pooling or resampling over the channel dim")


def test_expand_of_one_channel_pins() -> None:
    ato = analyse(TwoBranches(lambda a, b: a * b.expand(-1, 8, -1, -1), cb=1), SHAPES[2], [Method("expand")])
    assert_pinned(space(ato, "cb"), "expand or repeat along the channel dim")


# ---------------------------------------------------------------- softmax, normalize


SOFTMAXES = [
    pytest.param(lambda d: nn.Softmax(dim=d), cover(nn.Softmax), id="nn.Softmax"),
    pytest.param(lambda d: nn.LogSoftmax(dim=d), cover(nn.LogSoftmax), id="nn.LogSoftmax"),
    pytest.param(lambda d: (lambda x: F.softmax(x, dim=d)), cover(F.softmax), id="F.softmax"),
    pytest.param(lambda d: (lambda x: F.log_softmax(x, d)), cover(F.log_softmax), id="F.log_softmax"),
    pytest.param(lambda d: (lambda x: torch.softmax(x, d)), cover(torch.softmax), id="torch.softmax"),
    pytest.param(lambda d: (lambda x: x.softmax(d)), cover(Method("softmax")), id=".softmax"),
    pytest.param(lambda d: (lambda x: x.log_softmax(dim=d)), cover(Method("log_softmax")), id=".log_softmax"),
]


@pytest.mark.parametrize(("make", "keys"), SOFTMAXES)
@pytest.mark.parametrize("dim", [1, -1], ids=["channels", "width"])
def test_softmax(make: Callable, keys: tuple, dim: int) -> None:
    """Over channels it pins; over width it keeps the channels but not their zeros (an affine norm restores them)."""
    op = make(dim)
    norm = nn.GroupNorm(8, 8)
    m = Sandwich(lambda x: norm(op(x)))
    m.softmax, m.norm = (op if isinstance(op, nn.Module) else nn.Identity()), norm
    ato = analyse(m, SHAPES[2], keys)
    sp = space(ato, "conv1")
    if dim == 1:
        assert_pinned(sp, "softmax over the channel dim")
    else:
        assert not sp.pinned and sp.producers == ["conv1", "norm"]
        assert mapping(ato, sp, OUT("conv1"), IN("conv2")) == identity(8)


def test_normalize_over_channels_pins() -> None:
    ato = analyse(Sandwich(lambda x: F.normalize(x, dim=1)), SHAPES[2], [F.normalize])
    assert_pinned(space(ato, "conv1"), "normalize() over the channel dim")


# ---------------------------------------------------------------- unknown ops


@pytest.mark.parametrize(("op", "named"), [
    (lambda x: torch.flip(x, [1]), "torch.flip"),
    (lambda x: torch.fft.fft2(x).real, "fft"),
    (lambda x: x.repeat(1, 1, 1, 1), ".repeat()"),
], ids=["torch.flip", "torch.fft.fft2", ".repeat"])
def test_unknown_op_pins_and_names_the_op(op: Callable, named: str) -> None:
    ato = analyse(Sandwich(op), SHAPES[2], unknown=True)
    sp = space(ato, "conv1")
    assert_pinned(sp, "unknown op")
    assert named in sp.reason
    assert any(named in what for what in ato.zigs.facts.unknown_ops.values())
    assert named in ato.report()


class Opaque(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class KeepsReLUForward(nn.ReLU):
    pass


class OwnForwardReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


@pytest.mark.parametrize(("cls", "pinned"), [(Opaque, True), (OwnForwardReLU, True), (KeepsReLUForward, False)])
def test_user_leaf_module(cls: type, pinned: bool) -> None:
    """A leaf module the table does not know pins, as kept opaque at the user's request (not an unknown op); a
    subclass keeping its base's forward uses the base's rule."""
    ato = analyse(Sandwich(cls()), SHAPES[2], leaf_modules=[cls])
    assert any(n.op == "call_module" and n.target == "op" for n in ato.graph_module.graph.nodes)
    sp = space(ato, "conv1")
    if pinned:
        assert_pinned(sp, f"kept opaque (leaf_modules): module {cls.__name__} ('op')")
    else:
        assert not sp.pinned


def test_tensor_attribute_other_than_data_pins() -> None:
    """`.T` returns a tensor the table cannot follow: its channels pin instead of going untracked."""
    ato = analyse(Sandwich(lambda x: x.mT.mT), SHAPES[2], [getattr])
    assert_pinned(space(ato, "conv1"), "tensor attribute .mT")


# ---------------------------------------------------------------- keys fx never emits from a plain trace


def _retargeted(model: nn.Module, shape: tuple[int, ...], old: Any, new: Any) -> tuple[fx.GraphModule, int]:
    """Trace and shape-propagate `model`, then point every `old` node at `new` (a graph another tool built)."""
    gm = trace(perturb(model))
    ShapeProp(gm).propagate(example(shape))
    count = 0
    for n in gm.graph.nodes:
        if (Method(n.target) if n.op == "call_method" else n.target) == old and n.op != "call_module":
            n.op = "call_method" if isinstance(new, Method) else "call_function"
            n.target = new.name if isinstance(new, Method) else new
            count += 1
    gm.recompile()
    return gm, count


@pytest.mark.parametrize(("make", "old", "new", "prunable"), [
    (lambda: Sandwich(lambda x: x.tanh()), Method("tanh"), cover(F.tanh)[0], True),
    (lambda: Sandwich(lambda x: x.sigmoid()), Method("sigmoid"), cover(F.sigmoid)[0], False),
    (lambda: TwoBranches(operator.add), operator.add, cover(operator.iadd)[0], True),
    (lambda: TwoBranches(operator.sub), operator.sub, cover(operator.isub)[0], True),
    (lambda: TwoBranches(operator.mul), operator.mul, cover(operator.imul)[0], True),
], ids=["F.tanh", "F.sigmoid", "operator.iadd", "operator.isub", "operator.imul"])
def test_keys_seen_in_graphs_from_other_tracers(make: Callable, old: Any, new: Any, prunable: bool) -> None:
    """F.tanh / F.sigmoid trace as methods and `a += b` as operator.add; other graph builders emit them."""
    model = make()
    gm, count = _retargeted(model, SHAPES[2], old, new)
    assert count == 1
    ato = check(ATOModel(model, gm).analyze(example(SHAPES[2])), [new])
    sp = spaces_of(ato, "conv1" if isinstance(model, Sandwich) else "ca")[0]
    assert sp.pinned != prunable and sp.width == 8


def test_cuda_method_is_analysed_like_cpu() -> None:
    """`.cuda()` cannot run here: shapes come from `.cpu()`, the analysis then sees a `.cuda()` node."""
    model = Sandwich(lambda x: x.cpu())
    gm, count = _retargeted(model, SHAPES[2], Method("cpu"), cover(Method("cuda"))[0])
    assert count == 1 and Method("cuda") in keys_in(gm)
    zigs = infer_zigs(ChannelDependencyPass(gm).run())
    assert [(s.width, s.pinned, s.producers, s.consumers) for s in zigs.spaces] == [
        (4, True, [], ["conv1"]), (8, False, ["conv1"], ["conv2"]), (6, True, ["conv2"], [])]
    assert not zigs.facts.unknown_ops


# ---------------------------------------------------------------- fixed permutations, stacks, attention, RNNs


def _prunes_exactly(ato: ATOModel) -> nn.Module:
    """Prune with a seeded random mask (the equivalence check runs inside) and check the FLOPs model."""
    mask = ato.random_mask(keep=0.5, seed=3)
    small = ato.prune(mask)
    assert abs(ato.flops(mask) - atofx.count_flops(small, ato.example_inputs)) <= 0.01 * ato.flops()
    return small


@pytest.mark.parametrize(("op", "shift", "keys"), [
    (lambda x: torch.roll(x, 3, 1), 3, cover(torch.roll)),
    (lambda x: x.roll(-2, dims=1), -2, cover(Method("roll"))),
    (lambda x: x.roll((1, 5), (2, -3)), 5, (Method("roll"),)),
    (lambda x: torch.roll(x, 8, 1), 8, (torch.roll,)),  # the identity, until pruning makes the width 4
], ids=["torch.roll", ".roll", ".roll-two-dims", "torch.roll-by-the-width"])
def test_roll_over_channels_is_a_fixed_rotation(op: Callable, shift: int, keys: tuple) -> None:
    ato = analyse(Sandwich(op), SHAPES[2], keys)
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.width == 8
    assert mapping(ato, sp, OUT("conv1"), IN("conv2")) == {(c,): ((c + shift) % 8,) for c in range(8)}
    _prunes_exactly(ato)


def test_roll_over_a_flattened_tensor_pins() -> None:
    ato = analyse(Sandwich(lambda x: torch.roll(x, 1)), SHAPES[2], (torch.roll,))
    assert_pinned(space(ato, "conv1"), "roll over a flattened tensor")


class SelectiveKernel(nn.Module):
    """SKNet attention: branch outputs stacked, softmax over the branches, weighted sum."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(4, 8, 3, padding=1)
        self.b2 = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
        self.fc = nn.Conv2d(8, 3, 1)
        self.fcs = nn.Conv2d(3, 16, 1)
        self.out = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([F.relu(self.b1(x)), F.relu(self.b2(x))], dim=1)
        z = F.relu(self.fc(feats.sum(1).mean((2, 3), keepdim=True)))
        attention = self.fcs(z).view(x.shape[0], 2, 8, 1, 1).softmax(dim=1)
        return self.out((feats * attention).sum(1))


def test_stack_of_branches_couples_their_channels() -> None:
    ato = analyse(SelectiveKernel(), SHAPES[2], cover(torch.stack))
    sp = space(ato, "b1")
    assert not sp.pinned and sp.width == 8 and {"b1", "b2", "fcs"} <= set(sp.producers)
    assert mapping(ato, sp, OUT("b1"), OUT("b2")) == identity(8)
    _prunes_exactly(ato)


def test_stack_with_an_untracked_tensor_pins() -> None:
    const = torch.ones(2, 8, 6, 6)
    ato = analyse(Sandwich(lambda x: torch.stack([x, const], 0).sum(0)), SHAPES[2], (torch.stack,))
    assert_pinned(space(ato, "conv1"), "stack of tensors")


class PixelShuffles(nn.Module):
    """conv (16) -> PixelShuffle(2) -> conv (8) -> PixelUnshuffle(2) -> conv: a super-resolution round trip."""

    def __init__(self, functional: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(4, 8, 1), nn.Conv2d(32, 6, 1)
        if functional:
            self.up, self.down = (lambda x: F.pixel_shuffle(x, 2)), (lambda x: F.pixel_unshuffle(x, 2))
        else:
            self.up, self.down = nn.PixelShuffle(2), nn.PixelUnshuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.down(F.relu(self.b(self.up(F.relu(self.a(x)))))))


@pytest.mark.parametrize(("functional", "keys"), [
    (False, cover(nn.PixelShuffle, nn.PixelUnshuffle)), (True, cover(F.pixel_shuffle, F.pixel_unshuffle))],
    ids=["modules", "functions"])
def test_pixel_shuffle_moves_channels_in_blocks_of_r_squared(functional: bool, keys: tuple) -> None:
    ato = analyse(PixelShuffles(functional), SHAPES[2], keys)
    up = space(ato, "a")
    assert not up.pinned and up.width == 4  # each output channel is a block of 4 input channels
    assert mapping(ato, up, OUT("a"), IN("b")) == {tuple(range(4 * c, 4 * c + 4)): (c,) for c in range(4)}
    down = space(ato, "b")
    assert not down.pinned and down.width == 8
    assert mapping(ato, down, OUT("b"), IN("c")) == {(c,): tuple(range(4 * c, 4 * c + 4)) for c in range(8)}
    _prunes_exactly(ato)


class CRNN(nn.Module):
    """conv features -> height pooled away -> a sequence over width -> a recurrent layer -> linear."""

    def __init__(self, cell: type, bidirectional: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.rnn = cell(8, 5, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(10 if bidirectional else 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv1(x)).mean(2).permute(0, 2, 1)
        out, _ = self.rnn(features)
        return self.fc(out)


@pytest.mark.parametrize(("cell", "bidirectional"), [(cover(nn.LSTM)[0], True), (cover(nn.GRU)[0], False),
                                                     (cover(nn.RNN)[0], True)], ids=["LSTM", "GRU", "RNN"])
def test_recurrent_layer_reads_conv_channels_as_input_features(cell: type, bidirectional: bool) -> None:
    ato = analyse(CRNN(cell, bidirectional), SHAPES[2], (cell,))
    sp = space(ato, "conv1")
    assert not sp.pinned and sp.width == 8 and sp.consumers == ["rnn"]
    suffixes = ("", "_reverse") if bidirectional else ("",)
    for row in zig_rows(ato, sp):
        (c,) = row[OUT("conv1")]
        assert all(row[("rnn", f"weight_ih_l0{s}", 1)] == (c,) for s in suffixes)
    assert all(s.pinned for s in ato.spaces if "rnn" in s.nodes and "conv1" not in s.producers)
    small = _prunes_exactly(ato)
    assert small.rnn.input_size < 8


class NonLocal(nn.Module):
    """A non-local block: key/query channels contracted by a product, value channels passed through."""

    def __init__(self, product: str):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.theta, self.phi, self.g = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.w = nn.Conv2d(4, 8, 1)
        self.product = product

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return {"torch.matmul": torch.matmul, "@": operator.matmul, "torch.bmm": torch.bmm,
                ".matmul": lambda p, q: p.matmul(q), ".bmm": lambda p, q: p.bmm(q)}[self.product](a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        n, _, h, w = x.shape
        g = self.g(x).view(n, 4, -1).permute(0, 2, 1)
        theta = self.theta(x).view(n, 4, -1).permute(0, 2, 1)
        affinity = self._mm(theta, self.phi(x).view(n, 4, -1)).softmax(dim=-1)
        y = self._mm(affinity, g).permute(0, 2, 1).contiguous().view(n, 4, h, w)
        return x + self.w(y)


@pytest.mark.parametrize(("product", "key"), [
    ("torch.matmul", cover(torch.matmul)), ("@", cover(operator.matmul)), ("torch.bmm", cover(torch.bmm)),
    (".matmul", cover(Method("matmul"))), (".bmm", cover(Method("bmm")))])
def test_attention_prunes_value_and_key_channels(product: str, key: tuple) -> None:
    ato = analyse(NonLocal(product), SHAPES[2], key)
    keys = space(ato, "theta")
    assert not keys.pinned and keys.width == 4 and {"theta", "phi"} <= set(keys.producers)  # contracted: coupled
    assert mapping(ato, keys, OUT("theta"), OUT("phi")) == identity(4)
    values = space(ato, "g")
    assert not values.pinned and values.width == 4 and values.consumers == ["w"]
    _prunes_exactly(ato)


def test_product_over_channels_with_a_fixed_factor_pins() -> None:
    weight = torch.randn(8, 8)
    ato = analyse(Sandwich(lambda x: torch.matmul(x.permute(0, 2, 3, 1), weight).permute(0, 3, 1, 2)), SHAPES[2],
                  (torch.matmul,), unknown=True)
    assert_pinned(space(ato, "conv1"), "channel summed over by a matrix product")


# ---------------------------------------------------------------- the table is fully covered


def test_every_rule_has_a_case() -> None:
    missing = [k for k in RULES if k not in COVERED]
    assert not missing, f"op rules without a test case in {__name__}: {missing}"


def test_every_case_key_is_in_the_table() -> None:
    unknown = [k for k in COVERED if k not in RULES]
    assert not unknown, unknown


def test_reality_check_is_not_vacuous() -> None:
    """Both kinds of elementwise entries exist in the cases, so the zero claim is tested both ways."""
    kinds = {p.values[3] for p in ELEMENTWISE}
    assert kinds == {True, False}
    assert all(isinstance(p.values[2], tuple) and p.values[2] for p in ELEMENTWISE + SCALAR + SPATIAL)


def test_torch_pruning_is_imported_at_the_first_surgery_not_at_compile():
    probe = ("import sys, torch\nimport atofx\n"
             "ato = atofx.compile(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)),\n"
             "                    (torch.randn(1, 3, 4, 4),))\n"
             "print('after compile:', 'torch_pruning' in sys.modules)\n"
             "ato.prune(ato.random_mask(0.5))\n"
             "print('after prune:', 'torch_pruning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-3:-1] == ["after compile: False", "after prune: True"]
