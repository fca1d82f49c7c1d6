"""Hypothesis strategies that build small random CNNs for the invariant tests.

`random_cnns()` draws a `CNNSpec` and builds it: it yields `(model, example_input)` with the model
in eval mode, the input of shape (2, 3, S, S), S in 8..16, and every width in 2..12 (a concat or a
channel pad may reach a little more). The same spec always builds the same model and input: weights
and the input come from `torch.manual_seed(spec.seed)` inside `torch.random.fork_rng()`, so the
global RNG is untouched. BatchNorm layers get random affine parameters and running statistics so
that zeroing a group is not accidentally trivial.

Blocks (`spec.blocks`, 1..5 of them, each `(kind, params)`), drawn from the current width and size:
  conv      conv (1x1 or 3x3, maybe stride 2, maybe bias) -> BN -> activation
  residual  conv-BN-act-conv-BN + shortcut, then activation; the shortcut is the identity
            (same width, stride 1) or a 1x1 projection conv + BN (`proj=True`, may change width/stride)
  concat    2..3 conv-BN-act branches concatenated on channels, optionally with the input itself
            (DenseNet style, `dense=True`) — gives concat offsets
  depthwise conv with groups == in channels, channel multiplier 1 or 2, BN, activation
  grouped   grouped conv (groups g, 1 < g, width divisible by g; a 1x1 conv first makes it so)
  se        squeeze-excite x * sigmoid(fc2(relu(fc1(avgpool(x))))), fc as 1x1 convs or as nn.Linear
            with flatten/view
  shuffle   channel shuffle after a grouped conv: `x.view(n, g, c/g, h, w).transpose(1, 2)
            .reshape(n, c, h, w)` or `nn.ChannelShuffle(g)`
  chunk     ShuffleNetV2 unit: `x1, x2 = x.chunk(2, dim=1)`, `cat(x1, branch(x2))`, optional shuffle
  pad       `F.pad` that adds zero channels before/after the channel dim
  pool      max / avg 2x2 pooling or adaptive average pooling to half size (size >= 4 only)
  unknown   an op the rule table does not know (`torch.cumsum` or `torch.flip` over channels, or
            `nn.LocalResponseNorm`); every space it touches must be pinned
  roll      `torch.roll` over channels by a literal shift
  sk        selective kernel: two conv branches `torch.stack`ed, softmax over the branches, weighted sum
  pixel     1x1 conv to 4k channels -> PixelShuffle(2) -> 3x3 conv -> PixelUnshuffle(2)
  gn        conv -> GroupNorm(g) with g > 1 groups -> activation
  nonlocal  non-local attention: key/query channels contracted by `matmul`, values through `bmm`, residual
Activations: relu, relu6, hardswish, silu, gelu, "gated" (x * sigmoid(x)) or "relu_" (`torch.relu_`).
Head (`spec.head`): "gap" (adaptive avg pool 1 -> flatten -> Linear), "flatten" (adaptive avg pool
to 2x2 -> flatten -> Linear, so each channel feeds a block of 4 features) or "gru" (height averaged
away, a GRU over the width, Linear on its last step: a CRNN).

`cnn_specs()` draws only the spec; `build_cnn(spec)` builds it (handy to replay a failing example
printed by Hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = ("relu", "relu6", "hardswish", "silu", "gelu", "gated", "relu_")
BLOCK_KINDS = ("conv", "residual", "concat", "depthwise", "grouped", "se", "shuffle", "chunk", "pad", "pool", "unknown",
               "roll", "sk", "pixel", "gn", "nonlocal")
HEADS = ("gap", "flatten", "gru")
# constructs torch-pruning 1.6 does not model (it crashes on a GRU head): left out where it is the reference
BEYOND_TORCH_PRUNING = {"relu_", "roll", "sk", "pixel", "gn", "nonlocal", "gru"}
UNKNOWN_OPS = ("cumsum", "flip", "lrn")
MIN_WIDTH, MAX_WIDTH = 2, 12


@dataclass(frozen=True)
class CNNSpec:
    seed: int
    size: int  # input height and width
    stem: int  # width of the first conv
    stem_act: str
    blocks: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    head: str
    classes: int

    def describe(self) -> str:
        parts = [f"{kind}({', '.join(f'{k}={v}' for k, v in params)})" for kind, params in self.blocks]
        return f"stem={self.stem} size={self.size} seed={self.seed} -> " + " -> ".join(parts) + f" -> head={self.head}"


# ---------------------------------------------------------------- building blocks


class Gated(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class InplaceReLU(nn.Module):
    def forward(self, x):
        return torch.relu_(x)


def make_act(kind: str) -> nn.Module:
    return {
        "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU, "gated": Gated,
        "relu_": InplaceReLU,
    }[kind]()


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: str | None = "relu",
                 bias: bool = False):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(make_act(act))
        super().__init__(*layers)


class Residual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, proj: bool, act: str):
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(cin, hidden, 3, stride, act=act), ConvBNAct(hidden, cout, 3, act=None))
        self.shortcut = ConvBNAct(cin, cout, 1, stride, act=None) if proj else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class Concat(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, ...], dense: bool, act: str):
        super().__init__()
        self.branches = nn.ModuleList(ConvBNAct(cin, w, 1 + 2 * (i % 2), act=act) for i, w in enumerate(widths))
        self.dense = dense

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        return torch.cat([x, *outs] if self.dense else outs, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int, linear: bool):
        super().__init__()
        self.c, self.linear = c, linear
        if linear:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        if self.linear:
            s = torch.flatten(s, 1)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        if self.linear:
            s = s.view(-1, self.c, 1, 1)
        return x * s


class ViewShuffle(nn.Module):
    """The torchvision ShuffleNetV2 form of channel shuffle."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, self.groups, c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, c, h, w)


class GroupedShuffle(nn.Module):
    def __init__(self, cin: int, groups: int, cout: int, mode: str, act: str):
        super().__init__()
        self.conv = ConvBNAct(cin, cout, 1, groups=groups, act=act)
        self.shuffle = ViewShuffle(groups) if mode == "view" else nn.ChannelShuffle(groups)

    def forward(self, x):
        return self.shuffle(self.conv(x))


class ChunkUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit on an even width."""

    def __init__(self, c: int, shuffle: bool, act: str):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            ConvBNAct(half, half, 1, act=act),
            ConvBNAct(half, half, 3, groups=half, act=None),
            ConvBNAct(half, half, 1, act=act),
        )
        self.shuffle = ViewShuffle(2) if shuffle else nn.Identity()

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return self.shuffle(torch.cat((x1, self.branch(x2)), dim=1))


class ChannelPad(nn.Module):
    def __init__(self, left: int, right: int):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        return F.pad(x, (0, 0, 0, 0, self.left, self.right))


class Pool(nn.Module):
    def __init__(self, kind: str, size: int):
        super().__init__()
        self.kind, self.size = kind, size

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, 2)
        if self.kind == "avg":
            return F.avg_pool2d(x, 2)
        return F.adaptive_avg_pool2d(x, self.size // 2)


class Unknown(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lrn = nn.LocalResponseNorm(2) if kind == "lrn" else None

    def forward(self, x):
        if self.kind == "cumsum":
            return torch.cumsum(x, dim=1)
        if self.kind == "flip":
            return torch.flip(x, [1])
        return self.lrn(x)


class Roll(nn.Module):
    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        return torch.roll(x, self.shift, 1)


class SelectiveKernel(nn.Module):
    def __init__(self, cin: int, cout: int, hidden: int, act: str):
        super().__init__()
        self.cout = cout
        self.branches = nn.ModuleList(ConvBNAct(cin, cout, k, act=act) for k in (1, 3))
        self.fc = nn.Conv2d(cout, hidden, 1)
        self.fcs = nn.Conv2d(hidden, 2 * cout, 1)

    def forward(self, x):
        feats = torch.stack([b(x) for b in self.branches], dim=1)
        z = torch.relu(self.fc(feats.sum(1).mean((2, 3), keepdim=True)))
        attention = self.fcs(z).view(x.shape[0], 2, self.cout, 1, 1).softmax(dim=1)
        return (feats * attention).sum(1)


class PixelRoundTrip(nn.Module):
    def __init__(self, cin: int, k: int, m: int, act: str):
        super().__init__()
        self.pre = ConvBNAct(cin, 4 * k, 1, act=act)
        self.up = nn.PixelShuffle(2)
        self.conv = ConvBNAct(k, m, 3, act=act)
        self.down = nn.PixelUnshuffle(2)

    def forward(self, x):
        return self.down(self.conv(self.up(self.pre(x))))


class GroupNormBlock(nn.Sequential):
    def __init__(self, cin: int, groups: int, cout: int, act: str):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), make_act(act))


class NonLocal(nn.Module):
    def __init__(self, c: int, inner: int):
        super().__init__()
        self.inner = inner
        self.theta, self.phi, self.g = (nn.Conv2d(c, inner, 1) for _ in range(3))
        self.w = ConvBNAct(inner, c, 1, act=None)

    def forward(self, x):
        n, _, h, w = x.shape
        theta = self.theta(x).view(n, self.inner, -1).permute(0, 2, 1)
        affinity = torch.matmul(theta, self.phi(x).view(n, self.inner, -1)).softmax(dim=-1)
        y = torch.bmm(affinity, self.g(x).view(n, self.inner, -1).permute(0, 2, 1))
        return x + self.w(y.permute(0, 2, 1).reshape(n, self.inner, h, w))


class Head(nn.Module):
    def __init__(self, c: int, kind: str, classes: int):
        super().__init__()
        self.kind = kind
        if kind == "gru":
            self.rnn = nn.GRU(c, 6, batch_first=True)
            self.fc = nn.Linear(6, classes)
            return
        self.pool = nn.AdaptiveAvgPool2d(1 if kind == "gap" else 2)
        self.fc = nn.Linear(c * (1 if kind == "gap" else 4), classes)

    def forward(self, x):
        if self.kind == "gru":
            out, _ = self.rnn(x.mean(2).permute(0, 2, 1))
            return self.fc(out[:, -1])
        return self.fc(torch.flatten(self.pool(x), 1))


class RandomCNN(nn.Module):
    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.spec = spec
        c, size = spec.stem, spec.size
        self.stem = ConvBNAct(3, c, 3, act=spec.stem_act)
        blocks = []
        for kind, params in spec.blocks:
            block, c, size = _build_block(kind, dict(params), c, size)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(c, spec.head, spec.classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

    def extra_repr(self) -> str:
        return self.spec.describe()


def _next_shape(kind: str, p: dict, c: int, size: int) -> tuple[int, int]:
    """Width and spatial size after a block."""
    if kind in ("conv", "residual"):
        return (p["out"], _down(size, p["stride"])) if kind == "conv" or p["proj"] else (c, size)
    if kind == "concat":
        return sum(p["widths"]) + (c if p["dense"] else 0), size
    if kind == "depthwise":
        return c * p["mult"], size
    if kind in ("grouped", "shuffle"):
        return p["out"], size
    if kind == "chunk":
        return p["pre"] or c, size
    if kind == "pad":
        return c + p["left"] + p["right"], size
    if kind == "pool":
        return c, size // 2
    if kind in ("sk", "gn"):
        return p["out"], size
    if kind == "pixel":
        return 4 * p["m"], size
    return c, size


def _build_block(kind: str, p: dict, c: int, size: int) -> tuple[nn.Module, int, int]:
    act = p.get("act", "relu")
    out, new_size = _next_shape(kind, p, c, size)
    if kind == "conv":
        block: nn.Module = ConvBNAct(c, out, p["k"], p["stride"], act=act, bias=p["bias"])
    elif kind == "residual":
        block = Residual(c, p["hidden"], out, p["stride"], p["proj"], act)
    elif kind == "concat":
        block = Concat(c, p["widths"], p["dense"], act)
    elif kind == "depthwise":
        block = ConvBNAct(c, out, 3, groups=c, act=act)
    elif kind in ("grouped", "shuffle"):
        layers: list[nn.Module] = [ConvBNAct(c, p["pre"], 1, act=act)] if p["pre"] else []
        cin = p["pre"] or c
        if kind == "grouped":
            layers.append(ConvBNAct(cin, out, 3, groups=p["groups"], act=act))
        else:
            layers.append(GroupedShuffle(cin, p["groups"], out, p["mode"], act))
        block = nn.Sequential(*layers)
    elif kind == "se":
        block = SqueezeExcite(c, p["hidden"], p["linear"])
    elif kind == "chunk":
        layers = [ConvBNAct(c, p["pre"], 1, act=act)] if p["pre"] else []
        block = nn.Sequential(*layers, ChunkUnit(out, p["shuffle"], act))
    elif kind == "pad":
        block = ChannelPad(p["left"], p["right"])
    elif kind == "pool":
        block = Pool(p["kind"], size)
    elif kind == "unknown":
        block = Unknown(p["op"])
    elif kind == "roll":
        block = Roll(p["shift"])
    elif kind == "sk":
        block = SelectiveKernel(c, out, p["hidden"], act)
    elif kind == "pixel":
        block = PixelRoundTrip(c, p["k"], p["m"], act)
    elif kind == "gn":
        block = GroupNormBlock(c, p["groups"], out, act)
    elif kind == "nonlocal":
        block = NonLocal(c, p["inner"])
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    return block, out, new_size


def _down(size: int, stride: int) -> int:
    return (size + 1) // 2 if stride == 2 else size


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5) * torch.where(torch.rand(n) < 0.2, -1.0, 1.0))
                m.bias.normal_(0.0, 0.5)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def build_cnn(spec: CNNSpec) -> tuple[nn.Module, torch.Tensor]:
    """The model (eval mode) and an example input (2, 3, size, size) for `spec`, deterministically."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = RandomCNN(spec)
        _randomise_norms(model)
        x = torch.randn(2, 3, spec.size, spec.size)
    return model.eval(), x


# ---------------------------------------------------------------- strategies

_widths = st.integers(MIN_WIDTH, MAX_WIDTH)


def _divisors(c: int) -> list[int]:
    return [g for g in range(2, c) if c % g == 0]


@st.composite
def _block(draw: st.DrawFn, c: int, size: int, allow_unknown: bool, skip: frozenset[str]) -> tuple[str, dict]:
    kinds = [k for k in BLOCK_KINDS
             if (k != "pool" or size >= 4) and (k != "unknown" or allow_unknown) and k not in skip]
    kind = draw(st.sampled_from(kinds))
    act = draw(st.sampled_from([a for a in ACTIVATIONS if a not in skip]))
    small = st.integers(MIN_WIDTH, max(MIN_WIDTH, min(MAX_WIDTH, 6)))
    stride = st.sampled_from((1, 2)) if size >= 4 else st.just(1)
    if kind == "conv":
        return kind, {"out": draw(_widths), "k": draw(st.sampled_from((1, 3))), "stride": draw(stride),
                      "bias": draw(st.booleans()), "act": act}
    if kind == "residual":
        proj = draw(st.booleans())
        return kind, {"hidden": draw(_widths), "proj": proj, "out": draw(_widths) if proj else c,
                      "stride": draw(stride) if proj else 1, "act": act}
    if kind == "concat":
        widths = tuple(draw(st.lists(small, min_size=2, max_size=3)))
        return kind, {"widths": widths, "dense": c <= 8 and draw(st.booleans()), "act": act}
    if kind == "depthwise":
        return kind, {"mult": draw(st.sampled_from((1, 1, 2))) if c <= 6 else 1, "act": act}
    if kind in ("grouped", "shuffle"):
        options = _divisors(c)
        pre = 0
        if not options or draw(st.booleans()):
            pre = draw(st.sampled_from((4, 6, 8, 9, 12)))
            options = _divisors(pre)
        groups = draw(st.sampled_from(options))
        out = groups * draw(st.integers(1, MAX_WIDTH // groups))
        params = {"pre": pre, "groups": groups, "out": out, "act": act}
        if kind == "shuffle":
            params["mode"] = draw(st.sampled_from(("view", "module")))
        return kind, params
    if kind == "se":
        return kind, {"hidden": draw(small), "linear": draw(st.booleans())}
    if kind == "chunk":
        pre = 0 if c % 2 == 0 and c >= 4 and draw(st.booleans()) else draw(st.sampled_from((4, 6, 8, 10, 12)))
        return kind, {"pre": pre, "shuffle": draw(st.booleans()), "act": act}
    if kind == "pad":
        left, right = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        return kind, {"left": left, "right": right if left or right else 1}
    if kind == "pool":
        return kind, {"kind": draw(st.sampled_from(("max", "avg", "adaptive")))}
    if kind == "roll":
        return kind, {"shift": draw(st.integers(-c, c))}
    if kind == "sk":
        return kind, {"out": draw(_widths), "hidden": draw(small), "act": act}
    if kind == "pixel":
        return kind, {"k": draw(st.integers(1, 3)), "m": draw(st.integers(1, 3)), "act": act}
    if kind == "gn":
        groups = draw(st.integers(2, 4))
        return kind, {"groups": groups, "out": groups * draw(st.integers(1, MAX_WIDTH // groups)), "act": act}
    if kind == "nonlocal":
        return kind, {"inner": draw(small)}
    return kind, {"op": draw(st.sampled_from(UNKNOWN_OPS))}


@st.composite
def cnn_specs(draw: st.DrawFn, max_blocks: int = 5, allow_unknown: bool = True, torch_pruning: bool = False) -> CNNSpec:
    """A random `CNNSpec`; `allow_unknown=False` leaves out the ops the rule table does not know,
    `torch_pruning=True` the constructs torch-pruning does not model."""
    skip = frozenset(BEYOND_TORCH_PRUNING if torch_pruning else ())
    size = draw(st.integers(8, 16))
    stem = draw(_widths)
    blocks = []
    c, s = stem, size
    for _ in range(draw(st.integers(1, max_blocks))):
        kind, params = draw(_block(c, s, allow_unknown, skip))
        c, s = _next_shape(kind, params, c, s)
        blocks.append((kind, tuple(sorted(params.items()))))
    return CNNSpec(
        seed=draw(st.integers(0, 2**31 - 1)),
        size=size,
        stem=stem,
        stem_act=draw(st.sampled_from([a for a in ACTIVATIONS if a not in skip])),
        blocks=tuple(blocks),
        head=draw(st.sampled_from([h for h in HEADS if h not in skip])),
        classes=draw(st.integers(3, 5)),
    )


def random_cnns(max_blocks: int = 5, allow_unknown: bool = True,
                torch_pruning: bool = False) -> st.SearchStrategy[tuple[nn.Module, torch.Tensor]]:
    """`(model, example_input)` pairs: a random CNN in eval mode and a batch of 2 inputs (see module docstring)."""
    return cnn_specs(max_blocks=max_blocks, allow_unknown=allow_unknown, torch_pruning=torch_pruning).map(build_cnn)
