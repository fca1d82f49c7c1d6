"""passes/flops.py: per-node FLOPs as torch's counter counts them, and P(keep) against a hand count."""

from __future__ import annotations

import torch
from atofx.passes.flops import FlopsModel, FlopsProp
from atofx.passes.rewrite import prune_copy
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.passes.analysis import analyse, space_of

# conv1 3 -> 8 (3x3, padding 1) and conv2 8 -> 4 (1x1) on one 8x8 image; a multiply-add counts 2
CONV1 = 2 * 8 * 8 * 8 * 3 * 3 * 3  # 2 * H * W * Cout * Cin * k * k = 27648
CONV2 = 2 * 8 * 8 * 4 * 8  # 4096


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def counted(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def flops_model(model: nn.Module, x: torch.Tensor) -> tuple[FlopsModel, int]:
    gm, zigs = analyse(model, x)
    FlopsProp(gm).propagate(x)
    return FlopsModel(gm, zigs), space_of(zigs, "conv1").index


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_each_node_carries_the_flops_torch_counts_for_it() -> None:
    gm, _ = analyse(TwoConvs(), X)
    FlopsProp(gm).propagate(X)
    per_node = {n.name: n.meta["flops"] for n in gm.graph.nodes}
    assert per_node["conv1"] == CONV1 and per_node["conv2"] == CONV2 and per_node["relu"] == 0


def test_flops_of_a_known_mask_equal_the_hand_count_and_the_pruned_models_count() -> None:
    model = TwoConvs()
    flops, space = flops_model(model, X)
    assert flops.total == CONV1 + CONV2 == counted(model, X)
    bits = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0], dtype=torch.float64)  # 3 of conv1's 8 channels kept
    by_hand = CONV1 * 3 / 8 + CONV2 * 3 / 8  # 10368 + 1536
    assert float(flops({space: bits})) == by_hand == 11904
    zigs = flops.zigs
    small = prune_copy(model, zigs, zigs.keep_per_component({space: bits.bool().numpy()}))
    assert small.conv1.out_channels == 3 and counted(small, X) == by_hand


def test_flops_are_differentiable_in_the_keep_bits() -> None:
    flops, space = flops_model(TwoConvs(), X)
    bits = torch.ones(8, dtype=torch.float64, requires_grad=True)
    flops({space: bits}).backward()
    # each of the 8 channels carries 1/8 of both convs' FLOPs: conv1's outputs and conv2's inputs
    assert torch.allclose(bits.grad, torch.full((8,), (CONV1 + CONV2) / 8, dtype=torch.float64))


def test_space_share_is_the_part_of_the_flops_that_touch_a_space() -> None:
    flops, space = flops_model(TwoConvs(), X)
    share = flops.space_share()
    assert share[space] == 1.0  # both convs read or write conv1's channels
    out = space_of(flops.zigs, "conv2").index
    assert share[out] == CONV2 / (CONV1 + CONV2)
