"""ZIG inference: zero-invariance (invariant 1), agreement with torch-pruning (invariant 4), unknown
ops pin (invariant 5), and the worked examples of DESIGN.md on torchvision models."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from hypothesis import event, given, reject, settings
from torch import nn

import atofx
from tests.checks import assert_zero_invariant
from tests.strategies import random_cnns

# ---------------------------------------------------------------- helpers


def _compile(model: nn.Module, x: torch.Tensor):
    return atofx.compile(model, x)


def _space_of(ato, producer: str):
    """The one space whose producers include `producer`'s output channels (weight, dim 0)."""
    found = {s.index for s in ato.spaces if producer in s.producers}
    assert len(found) == 1, f"{producer} is a producer of spaces {sorted(found)}"
    return ato.spaces[found.pop()]


def _pinned_components(zigs) -> np.ndarray:
    pinned = np.zeros(len(zigs.comp_space), dtype=bool)
    for s in zigs.spaces:
        if s.pinned:
            pinned[s.components] = True
    return pinned


# ---------------------------------------------------------------- invariant 1 on random CNNs


@given(random_cnns())
def test_zeroing_any_zig_zeroes_its_channels_on_random_cnns(case):
    model, x = case
    ato = _compile(model, x)
    assert_zero_invariant(ato)


# ---------------------------------------------------------------- invariant 5: unknown ops pin


@given(random_cnns())
def test_unknown_ops_pin_every_space_they_touch_on_random_cnns(case):
    model, x = case
    ato = _compile(model, x)
    zigs, gm = ato.zigs, ato.graph_module
    pinned = _pinned_components(zigs)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in zigs.facts.unknown_ops:
        for src in nodes[name].all_input_nodes:
            lay = zigs.facts.layouts.get(src.name)
            lays = [lay] if hasattr(lay, "ids") else [v for v in (lay or ()) if hasattr(v, "ids")]
            for v in lays:
                assert pinned[zigs.labels[v.ids]].all(), f"input {src.name} of unknown op {name} is not pinned"


class _Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


class _Flip(nn.Module):
    def forward(self, x):
        return torch.flip(x, [1])


@pytest.mark.parametrize("unknown", [_Cumsum, _Flip, lambda: nn.LocalResponseNorm(2)], ids=["cumsum", "flip", "lrn"])
def test_unknown_op_between_convs_pins_both_sides_and_reports_it(unknown):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), unknown(), nn.Conv2d(6, 4, 1), nn.ReLU(),
                          nn.Conv2d(4, 5, 1)).eval()
    ato = _compile(model, torch.randn(2, 3, 8, 8))
    before = _space_of(ato, "0")
    assert before.pinned and "unknown op" in before.reason
    # what the unknown op returns is pinned too; the later conv's own output stays prunable
    assert any(s.pinned and "unknown op" in s.reason and "4" in s.consumers for s in ato.spaces)
    assert not _space_of(ato, "4").pinned
    assert ato.zigs.facts.unknown_ops


# ---------------------------------------------------------------- invariant 4: agreement with torch-pruning

_PRUNED = (nn.Linear, nn.modules.conv._ConvNd)


def _role(module: nn.Module, role: str) -> str:
    """Out/in for dense convs and linears; everything else (BN, depthwise or grouped conv) is one 'param' role."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1):
        return role
    return "param"


def _atofx_groups(ato, model: nn.Module) -> dict[str, set[tuple[str, str]]]:
    """For every conv/linear whose output channels atofx may prune: the (module, role) pairs of those ZIGs."""
    zigs = ato.zigs
    mods = dict(model.named_modules())
    pinned = _pinned_components(zigs)
    groups = {}
    for s in zigs.slices:
        if s.role == "out" and s.name == "weight" and isinstance(mods.get(s.module), _PRUNED):
            comps = np.unique(zigs.labels[s.ids])
            if pinned[comps].any():
                continue
            groups[s.module] = {
                (t.module, _role(mods[t.module], t.role)) for t in zigs.slices if np.isin(zigs.labels[t.ids], comps).any()
            }
    return groups


def _tp_group(graph: tp.DependencyGraph, model: nn.Module, name: str) -> set[tuple[str, str]]:
    """The (module, role) pairs of torch-pruning's group rooted at `name`'s output channels."""
    names = {m: n for n, m in model.named_modules()}
    module = model.get_submodule(name)
    pruner = graph.get_pruner_of_module(module)
    group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
    touched = set()
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Module) and m in names and next(m.parameters(recurse=False), None) is not None:
            role = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
            touched.add((names[m], _role(m, role)))
    return touched


# Constructs where torch-pruning 1.6 and atofx are known to disagree, and in which direction
# ("atofx": atofx couples more modules, "tp": torch-pruning couples more).
KNOWN_DIFFERENCES = {
    "grouped conv": ({"atofx"}, "atofx removes whole groups (a group's input channels with its output channels); "
                                "torch-pruning prunes inside groups"),
    "channel shuffle": ({"atofx"}, "atofx keeps the groups of a shuffle equal, so channel i of every group is one ZIG; "
                                   "torch-pruning does not follow view-transpose-view or nn.ChannelShuffle"),
    "chunk": ({"atofx", "tp"}, "atofx keeps chunks equal (both halves lose the same positions); torch-pruning maps "
                               "indices through split offsets and lets halves differ"),
    "concat": ({"tp"}, "torch-pruning maps a concat member's indices back onto the other members when one of them "
                       "is also read elsewhere (input reused in a DenseNet-style concat)"),
    "channel padding": ({"atofx", "tp"}, "atofx pins the padded channels and shifts offsets; torch-pruning does not "
                                         "see F.pad on the channel dim"),
}


def _construct(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Which known-difference construct an fx node is, if any."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.ChannelShuffle):
            return "channel shuffle"
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            return "grouped conv"  # includes depthwise with a channel multiplier
        return None
    target = node.target
    shape = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
    ndim = len(shape.shape) if shape is not None and hasattr(shape, "shape") else 0
    if target in ("transpose", torch.transpose) and ndim == 5 or target in (F.channel_shuffle, torch.channel_shuffle):
        return "channel shuffle"
    if target in ("chunk", "split", torch.chunk, torch.split):
        return "chunk"
    if target in (torch.cat, torch.concat):
        return "concat"
    if target is F.pad:
        amounts = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        if len(amounts) >= 2 * (ndim - 1) and any(amounts[2 * (ndim - 2):2 * (ndim - 1)]):
            return "channel padding"
    return None


def _implicated_constructs(ato, modules_involved: set[str], model: nn.Module) -> set[str]:
    """Constructs on or next to the tensors of the spaces and modules a comparison involves."""
    gm = ato.graph_module
    mods = dict(gm.named_modules())
    region = {n for s in ato.spaces if set(s.producers + s.consumers) & modules_involved for n in s.nodes}
    region |= {n.name for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in modules_involved}
    found = set()
    for node in gm.graph.nodes:
        near = {node.name} | {a.name for a in node.all_input_nodes} | {u.name for u in node.users}
        if near & region:
            kind = _construct(node, mods)
            if kind:
                found.add(kind)
    return found


def _explain(ato, model: nn.Module, root: str, mine: set, theirs: set) -> tuple[str | None, set[str]]:
    """(None, constructs that explain it) when the difference is explained, else (what is unexplained, ...)."""
    pinned = _pinned_components(ato.zigs)
    pinned_modules = {s.module for s in ato.zigs.slices if pinned[ato.zigs.labels[s.ids]].all()}
    tp_only = {(m, r) for m, r in theirs - mine if m not in pinned_modules}  # atofx pinned it: explained
    atofx_only = mine - theirs
    directions = {d for d, diff in (("atofx", atofx_only), ("tp", tp_only)) if diff}
    if not directions:
        return None, {"atofx pinned"} if theirs - mine else set()
    involved = {m for m, _ in mine | theirs} | {root}
    constructs = _implicated_constructs(ato, involved, model)
    used = {c for c in constructs if KNOWN_DIFFERENCES[c][0] & directions}
    unexplained = {d for d in directions if not any(d in KNOWN_DIFFERENCES[c][0] for c in constructs)}
    if not unexplained:
        return None, used
    return (f"group of {root}: atofx only {sorted(atofx_only)}, torch-pruning only {sorted(tp_only)}; "
            f"constructs nearby {sorted(constructs)} do not explain the '{'/'.join(sorted(unexplained))}' side"), used


def _assert_agrees_with_torch_pruning(model: nn.Module, x: torch.Tensor, expect_identical: bool = False) -> int:
    ato = _compile(model, x)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    except ZeroDivisionError:
        # torch-pruning 1.6.1 divides by zero in update_reshape_index_mapping on some view-transpose-view
        # shuffles (torchvision's ShuffleNetV2 too): nothing to compare against
        mods = dict(ato.graph_module.named_modules())
        assert any(_construct(n, mods) == "channel shuffle" for n in ato.graph_module.graph.nodes)
        reject()
    groups = _atofx_groups(ato, model)
    for root, mine in groups.items():
        theirs = _tp_group(graph, model, root)
        if expect_identical:
            assert mine == theirs, f"group of {root}: atofx only {sorted(mine - theirs)}, tp only {sorted(theirs - mine)}"
        else:
            problem, used = _explain(ato, model, root, mine, theirs)
            assert problem is None, problem
            for construct in sorted(used):
                event(f"torch-pruning differs, explained by: {construct}")
    return len(groups)


@settings(max_examples=100)
@given(random_cnns(torch_pruning=True))
def test_spaces_agree_with_torch_pruning_groups_or_differ_by_a_known_construct_on_random_cnns(case):
    model, x = case
    _assert_agrees_with_torch_pruning(model, x)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_spaces_equal_torch_pruning_groups_on_torchvision_models(name):
    model = _zoo(name)
    assert _assert_agrees_with_torch_pruning(model, torch.randn(1, 3, 32, 32), expect_identical=True) > 10


def test_torch_pruning_difference_for_grouped_conv_is_recognised():
    """The explanation machinery itself: a grouped conv makes atofx couple more than torch-pruning."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2),
                          nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    model.eval()
    ato = _compile(model, x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    mine, theirs = _atofx_groups(ato, model)["0"], _tp_group(graph, model, "0")
    assert mine - theirs == {("5", "in")}  # atofx: conv 0's groups are conv 3's groups, read by the linear
    assert _explain(ato, model, "0", mine, theirs) == (None, {"grouped conv"})
    assert _implicated_constructs(ato, {"0", "3"}, model) == {"grouped conv"}


# ---------------------------------------------------------------- worked examples (DESIGN.md)


@cache
def _zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


@cache
def _zoo_ato(name: str, size: int = 64):
    return _compile(_zoo(name), torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)))


def test_resnet18_has_four_residual_streams_and_eight_block_spaces():
    ato = _zoo_ato("resnet18")
    prunable = [s for s in ato.spaces if not s.pinned]
    assert len(prunable) == 12
    streams = {64: ["conv1", "bn1"]} | {
        64 * 2 ** (k - 1): [f"layer{k}.0.downsample.0", f"layer{k}.0.downsample.1"] for k in (2, 3, 4)
    }
    for stage, (width, owners) in enumerate(streams.items(), start=1):
        space = _space_of(ato, owners[0])
        assert not space.pinned and space.width == width
        expected = set(owners) | {f"layer{stage}.{b}.{p}" for b in (0, 1) for p in ("conv2", "bn2")}
        assert set(space.producers) == expected
        assert {f"layer{stage}.1.conv1"} <= set(space.consumers)
        if stage < 4:
            assert {f"layer{stage + 1}.0.conv1", f"layer{stage + 1}.0.downsample.0"} <= set(space.consumers)
        else:
            assert "fc" in space.consumers
    for stage in range(1, 5):
        for block in (0, 1):
            space = _space_of(ato, f"layer{stage}.{block}.conv1")
            assert not space.pinned
            assert set(space.producers) == {f"layer{stage}.{block}.conv1", f"layer{stage}.{block}.bn1"}
            assert space.consumers == [f"layer{stage}.{block}.conv2"]
    fc = _space_of(ato, "fc")
    assert fc.pinned and "output" in fc.reason


def test_mobilenet_v2_couples_expansions_stage_streams_and_first_depthwise_with_stem():
    ato = _zoo_ato("mobilenet_v2")
    model = _zoo("mobilenet_v2")
    stem = _space_of(ato, "features.0.0")
    assert not stem.pinned
    assert set(stem.producers) == {"features.0.0", "features.0.1", "features.1.conv.0.0", "features.1.conv.0.1"}
    assert stem.consumers == ["features.1.conv.1"]
    stream_of_stage: dict[tuple[int, int], list[int]] = {}
    for i in range(2, 18):
        block = model.features[i]
        space = _space_of(ato, f"features.{i}.conv.0.0")  # expansion width
        assert not space.pinned and space.width == block.conv[0][0].out_channels
        assert set(space.producers) == {f"features.{i}.conv.{a}.{b}" for a in (0, 1) for b in (0, 1)}
        assert space.consumers == [f"features.{i}.conv.2"]
        stream_of_stage.setdefault(_space_of(ato, f"features.{i}.conv.2").index, []).append(i)
    # one stream per stage: blocks coupled by residual adds share the projection's space
    stages = sorted(stream_of_stage.values())
    assert stages == [[2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13], [14, 15, 16], [17]]
    for blocks in stages:
        space = _space_of(ato, f"features.{blocks[0]}.conv.2")
        assert not space.pinned
        assert set(space.producers) == {f"features.{i}.conv.{p}" for i in blocks for p in (2, 3)}
    last = _space_of(ato, "features.18.0")
    assert not last.pinned and last.width == 1280 and last.consumers == ["classifier.1"]


def test_densenet121_layer_inputs_are_concats_of_earlier_spaces_at_fixed_offsets():
    ato = _zoo_ato("densenet121", 32)
    zigs = ato.zigs
    own = {}
    for block, layers in ((1, 6), (2, 12), (3, 24), (4, 16)):
        for j in range(1, layers + 1):
            space = _space_of(ato, f"features.denseblock{block}.denselayer{j}.conv2")
            assert not space.pinned and space.width == 32
            own[block, j] = space.index
    assert len(set(own.values())) == len(own), "two dense layers share an output space"
    first = {1: "features.conv0", 2: "features.transition1.conv", 3: "features.transition2.conv",
             4: "features.transition3.conv"}
    for (block, j), _ in own.items():
        sl = next(s for s in zigs.slices if s.module == f"features.denseblock{block}.denselayer{j}.conv1" and s.role == "in")
        spaces_along = zigs.comp_space[zigs.labels[sl.ids]]
        expected = [_space_of(ato, first[block])] + [ato.spaces[own[block, k]] for k in range(1, j)]
        offsets = np.cumsum([0] + [s.width for s in expected])
        assert len(spaces_along) == offsets[-1]
        for space, a, b in zip(expected, offsets[:-1], offsets[1:], strict=True):
            assert (spaces_along[a:b] == space.index).all()
            # a fixed offset: position k of the slice is ZIG k of that space
            assert (zigs.comp_pos[zigs.labels[sl.ids[a:b]]] == np.arange(space.width)).all()


def test_shufflenet_v2_follows_chunk_and_shuffle_without_pinning():
    ato = _zoo_ato("shufflenet_v2_x1_0")
    zigs = ato.zigs
    pinned = [s for s in ato.spaces if s.pinned]
    assert sorted(s.name for s in pinned) == ["fc", "x"]
    gm = ato.graph_module
    followed = [n for n in gm.graph.nodes if n.target in ("chunk", torch.transpose)]
    # 16 units, each ending in a view-transpose-view shuffle; the 13 stride-1 units start with x.chunk(2, dim=1)
    assert sorted(str(n.target) for n in followed).count("chunk") == 13 and len(followed) == 13 + 16
    for node in followed:
        lay = zigs.facts.layouts[node.name]
        lays = lay if isinstance(lay, tuple) else (lay,)
        for v in lays:
            assert v.width > 0
            assert all(not ato.spaces[i].pinned for i in np.unique(zigs.comp_space[zigs.labels[v.ids]]))
    assert_zero_invariant(ato, zigs_per_space=1)


def test_convnext_tiny_pins_layernormed_streams_and_keeps_mlp_hidden_widths_prunable():
    ato = _zoo_ato("convnext_tiny")
    model = _zoo("convnext_tiny")
    hidden = 0
    for stage in (1, 3, 5, 7):
        for b in range(len(model.features[stage])):
            block = f"features.{stage}.{b}.block"
            mlp = _space_of(ato, f"{block}.3")
            assert not mlp.pinned and mlp.width == 4 * model.features[stage][b].block[3].in_features
            assert mlp.producers == [f"{block}.3"] and mlp.consumers == [f"{block}.5"]
            stream = _space_of(ato, f"{block}.5")
            assert stream.pinned and "LayerNorm" in stream.reason
            hidden += 1
    assert hidden == 18
    assert len([s for s in ato.spaces if not s.pinned]) == 18


def test_worked_examples_satisfy_zero_invariance():
    for name in ("resnet18", "mobilenet_v2", "convnext_tiny"):
        assert assert_zero_invariant(_zoo_ato(name), zigs_per_space=1) > 0

