"""The instrument pass: mask nodes are the identity until set; set, they reproduce the pruned model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torchvision
from atofx.passes.equivalence import relative_difference, run_eval
from atofx.passes.instrument import ChannelMask, MaskSlots, instrument
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import atofx
from atofx.app.cifar_models import CifarResNet
from atofx.core.pruning import zero_dropped
from atofx.errors import EquivalenceError
from tests.strategies import CNNSpec, build_cnn, random_cnns

TOL = 1e-5


def instrumented(ato: atofx.ATOModel) -> tuple[fx.GraphModule, MaskSlots]:
    gm = fx.GraphModule(ato.graph_module, copy.deepcopy(ato.graph_module.graph))
    return gm, instrument(gm, ato.zigs)


def masked_output(ato: atofx.ATOModel, gm: fx.GraphModule, slots: MaskSlots, mask: atofx.Mask) -> torch.Tensor:
    slots.set(ato.flops_model.keep_vector(mask.as_float(torch.float32)))
    try:
        return run_eval(gm, ato.example_inputs)
    finally:
        slots.set(None)


def check_model(model: nn.Module, x: torch.Tensor, keep: float, seed: int, strict: bool = True) -> None:
    ato = atofx.compile(model, (x,))
    gm, slots = instrumented(ato)
    mask_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelMask)]
    assert len(mask_nodes) == len(slots.masks)
    expected = run_eval(model, (x,))
    assert torch.equal(run_eval(gm, (x,)), expected), "unset mask nodes must be the identity"
    if not ato.zigs.prunable:
        assert not slots.masks, "a model without prunable spaces needs no mask node"
        return
    assert slots.masks, "a prunable model must get mask nodes"
    mask = ato.random_mask(keep=keep, seed=seed)
    got = masked_output(ato, gm, slots, mask)
    # the masked model: every dropped ZIG's parameters zeroed in a copy
    reference = copy.deepcopy(model)
    zero_dropped(reference, ato.zigs, mask.component_keep(ato.zigs))
    assert relative_difference(run_eval(reference, (x,)), got) <= TOL
    try:
        small = ato.prune(mask)
    except EquivalenceError:
        if strict:
            raise
        event("prune raised EquivalenceError")
        return  # a rewrite-pass failure; tests/passes/test_rewrite.py owns that invariant
    assert relative_difference(run_eval(small, (x,)), got) <= TOL
    # unset again: back to the dense model
    assert torch.equal(run_eval(gm, (x,)), expected)


def test_resnet18_masked_equals_pruned():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for m in model.modules():  # non-trivial BN statistics so a wrong channel shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    check_model(model, x, keep=0.5, seed=1)


def test_mask_nodes_sit_before_consumers_of_resnet18():
    torch.manual_seed(0)
    ato = atofx.compile(torchvision.models.resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),))
    gm, slots = instrumented(ato)
    # every conv except the stem, and fc, read a prunable space: 19 convs + fc
    readers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelMask)]
    consumers = {u.target for n in readers for u in n.users}
    assert "fc" in consumers and "layer1.0.conv1" in consumers and "conv1" not in consumers
    assert len(slots.masks) == 20
    # positions index ZIG ids: each mask node's vector is as wide as the channels it scales
    for m, pos in zip(slots.masks, slots.positions, strict=True):
        assert m.dim == 1 and pos.ndim == 1 and pos.numel() in (64, 128, 256, 512)
    # the original graph is untouched
    assert not any(isinstance(m, ChannelMask) for m in ato.graph_module.modules())


@settings(max_examples=40)
@given(random_cnns(), st.floats(0.2, 0.9), st.integers(0, 2**16))
def test_random_cnn_masked_equals_pruned(model_and_input, keep, seed):
    model, x = model_and_input
    check_model(model, x, keep, seed, strict=False)


def test_all_ones_keep_vector_is_the_identity():
    torch.manual_seed(0)
    model = CifarResNet(8, 10, 1).eval()
    x = torch.randn(4, 1, 8, 8)
    ato = atofx.compile(model, (x,))
    gm, slots = instrumented(ato)
    got = masked_output(ato, gm, slots, atofx.Mask.ones(ato.zigs))
    assert relative_difference(run_eval(model, (x,)), got) == 0.0


def test_gradient_reaches_the_keep_vector():
    torch.manual_seed(0)
    model = CifarResNet(8, 10, 1).eval()
    x = torch.randn(4, 1, 8, 8)
    ato = atofx.compile(model, (x,))
    gm, slots = instrumented(ato)
    mask = ato.random_mask(keep=0.6, seed=0)
    keep = ato.flops_model.keep_vector(mask.as_float(torch.float32)).requires_grad_(True)
    slots.set(keep)
    out = gm(x)
    out.square().sum().backward()
    slots.set(None)
    assert keep.grad is not None
    prunable = torch.cat([torch.as_tensor(s.components) for s in ato.zigs.prunable])
    g = keep.grad[prunable]
    assert torch.isfinite(g).all()
    assert int((g != 0).sum()) > g.numel() // 2, "most ZIGs must get a gradient through the mask nodes"
    # a dropped ZIG gets a gradient too: the controller can switch it back on
    dropped = keep.detach()[prunable] == 0
    assert dropped.any() and (g[dropped] != 0).any()


def test_set_moves_positions_to_the_keep_device_and_dtype():
    torch.manual_seed(0)
    model = CifarResNet(8, 10, 1).eval()
    x = torch.randn(2, 1, 8, 8)
    ato = atofx.compile(model, (x,))
    gm, slots = instrumented(ato)
    keep = ato.flops_model.keep_vector(ato.random_mask(0.5, 3).as_float(torch.float64))
    slots.set(keep)
    assert all(m.scale is not None and m.scale.dtype == torch.float64 for m in slots.masks)
    out = gm(x)
    assert out.dtype == torch.float32
    slots.set(None)
    assert all(m.scale is None for m in slots.masks)


@pytest.mark.parametrize("dim", [1, 2])
def test_channel_mask_scales_one_dim(dim):
    m = ChannelMask(dim)
    x = torch.randn(2, 3, 3)
    assert m(x) is x
    m.scale = torch.tensor([1.0, 0.0, 2.0])
    y = m(x)
    expected = x.clone()
    idx = [slice(None)] * 3
    idx[dim] = 1
    expected[tuple(idx)] = 0
    idx[dim] = 2
    expected[tuple(idx)] *= 2
    assert torch.equal(y, expected)


@pytest.mark.parametrize("spec", [
    CNNSpec(seed=0, size=8, stem=4, stem_act="relu", blocks=(("nonlocal", (("inner", 3),)),), head="gap", classes=3),
    CNNSpec(seed=0, size=8, stem=6, stem_act="relu", blocks=(), head="gru", classes=3),
], ids=["attention-keys", "gru-input-features"])
def test_products_and_recurrent_inputs_get_mask_nodes(spec):
    """A matmul contracting channels and an RNN reading them are consumers too: masked == pruned."""
    model, x = build_cnn(spec)
    check_model(model, x, keep=0.5, seed=0)
