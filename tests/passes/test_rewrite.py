"""Invariants 2 and 3 for the rewrite pass: pruned == masked, FLOPs model == counted FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from atofx.passes import op_rules
from atofx.passes.equivalence import relative_difference, run_eval
from atofx.passes.registry import Op
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn

import atofx
from tests.strategies import CNNSpec, build_cnn, random_cnns

TOL = 1e-5


def prune_and_compare(model: nn.Module, x: torch.Tensor, keep: float, seed: int) -> tuple[atofx.ATOModel, nn.Module]:
    """Prune a copy with a random mask; assert equal outputs and exact FLOPs bookkeeping."""
    ato = atofx.compile(model, (x,))
    if not ato.zigs.prunable:
        return ato, model
    mask = ato.random_mask(keep=keep, seed=seed)
    small = ato.prune(mask)  # check=True already raises EquivalenceError on a mismatch
    reference = copy.deepcopy(model)
    atofx.compile(reference, (x,)).apply_mask(mask)
    assert relative_difference(run_eval(reference, (x,)), run_eval(small, (x,))) <= TOL
    counted = atofx.count_flops(small, (x,))
    predicted = ato.flops(mask)
    assert abs(predicted - counted) <= 0.01 * max(counted, 1)
    return ato, small


@given(random_cnns(), st.floats(0.2, 0.9), st.integers(0, 2**16))
def test_random_cnn_prunes_to_the_masked_model(model_and_input, keep, seed):
    model, x = model_and_input
    for kind in sorted({kind for kind, _ in model.spec.blocks}):
        event(f"has a {kind} block")  # --hypothesis-show-statistics: how often each construct was fuzzed
    prune_and_compare(model, x, keep, seed)


def test_selective_kernel_view_with_equal_branch_and_channel_counts_is_rewritten_at_the_channel_dim():
    """Hypothesis' CI falsifying example: `view(n, 2, c, 1, 1)` with c = 2 has the literal 2 twice; only the
    channel count may follow the pruning, the branch count must stay."""
    spec = CNNSpec(seed=0, size=8, stem=2, stem_act="relu",
                   blocks=(("sk", (("act", "relu"), ("hidden", 2), ("out", 2))),), head="gap", classes=3)
    model, x = build_cnn(spec)
    ato, small = prune_and_compare(model, x, keep=0.5, seed=0)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


SLICE = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x0_5",
         "regnet_x_400mf", "regnet_y_400mf", "resnext50_32x4d", "squeezenet1_1", "convnext_tiny", "googlenet",
         "mnasnet0_5"]


def _zoo_input(name: str, size: int) -> torch.Tensor:
    torch.manual_seed(0)
    side = 299 if name == "inception_v3" else size
    return torch.randn(2, 3, side, side)


def _zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong slice shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", SLICE)
def test_torchvision_slice_prunes_equivalently(name):
    ato, small = prune_and_compare(_zoo_model(name), _zoo_input(name, 32), keep=0.67, seed=1)
    assert ato.zigs.prunable, f"{name} has nothing to prune"


CNNS = [m for m in torchvision.models.list_models(module=torchvision.models)
        if not m.startswith(("vit", "swin", "maxvit"))]


@pytest.mark.zoo_full
@pytest.mark.parametrize("name", CNNS)
def test_every_torchvision_cnn_prunes_equivalently(name):
    prune_and_compare(_zoo_model(name), _zoo_input(name, 224)[:1], keep=0.67, seed=0)


def test_resnet50_residual_streams_shrink_so_flops_fall_quadratically():
    model, x = _zoo_model("resnet50"), _zoo_input("resnet50", 64)
    ato, small = prune_and_compare(model, x, keep=0.67, seed=0)
    ratio = atofx.count_flops(small, (x,)) / atofx.count_flops(model, (x,))
    assert 0.40 <= ratio <= 0.50, ratio  # ~0.67^2, not ~0.67
    assert small.conv1.out_channels < 64 and small.fc.in_features < 2048
    assert type(small) is type(model)


class _Literals(nn.Module):
    """Hard-coded channel counts: a split by sizes, a channel slice and a view feeding a linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 1)
        self.c = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        p, q = torch.split(y, [4, 4], dim=1)
        z = self.b(p) + self.c(q)
        z = F.adaptive_avg_pool2d(z[:, 0:6], 4)
        return self.fc(z.view(-1, 96))


def test_hard_coded_channel_counts_are_rewritten_in_a_graph_module():
    torch.manual_seed(0)
    model, x = _Literals().eval(), torch.randn(2, 3, 8, 8)
    ato, small = prune_and_compare(model, x, keep=0.5, seed=3)
    assert isinstance(small, torch.fx.GraphModule)
    assert small.fc.in_features < 96


def test_apply_mask_zeroes_the_users_model_in_place_and_matches_the_pruned_model():
    model, x = _zoo_model("resnet18"), _zoo_input("resnet18", 32)
    ato = atofx.compile(model, (x,))
    mask = ato.random_mask(keep=0.5, seed=0)
    small = ato.prune(mask)
    ato.apply_mask(mask)
    assert model.conv1.weight.abs().sum(dim=(1, 2, 3)).eq(0).sum() == 64 - int(mask.bits[1].sum())
    assert torch.allclose(model.eval()(x), small.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_wrong_rule_is_caught_by_the_equivalence_check(monkeypatch):
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), dims=[1]))

    # pretend a flip of the channels were elementwise: a wrong prune the check must refuse
    monkeypatch.setattr(op_rules, "OPS", op_rules.OPS.with_entries(Op((torch.flip,), "elementwise", op_rules.unary(True))))
    ato = atofx.compile(Flip().eval(), (torch.randn(1, 3, 4, 4),))
    with pytest.raises(atofx.EquivalenceError, match=r"first at flip.*ato\.pin\('layer'\)"):
        ato.prune(ato.random_mask(keep=0.5, seed=0))
    ato.pin("a")  # what the message advises works: nothing of a's space goes
    assert not ato.zigs.prunable and ato.prune(ato.random_mask(keep=0.5, seed=0)).a.out_channels == 6


def test_masks_that_do_not_fit_are_refused():
    ato = atofx.compile(_zoo_model("resnet18"), (_zoo_input("resnet18", 32),))
    mask = ato.random_mask(keep=0.5)
    mask.bits[1] = torch.zeros_like(mask.bits[1])
    with pytest.raises(atofx.MaskError, match="drops every channel"):
        ato.prune(mask)
    with pytest.raises(atofx.MaskError, match="keep must be"):
        ato.random_mask(keep=0.0)
    with pytest.raises(atofx.AtofxError, match="no mask"):
        ato.prune()


class _Sliced(nn.Module):
    """conv `a` (16 channels) -> relu -> `pick(y)` -> conv `b` (8 channels in)."""

    def __init__(self, pick, channels_last: bool = False):
        super().__init__()
        self.pick, self.channels_last = pick, channels_last
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.channels_last:  # NHWC: the channel dim is the last
            return self.b(self.pick(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.b(self.pick(y))


@pytest.mark.parametrize(("pick", "channels_last"), [
    (lambda y: y[:, ::2] + y[:, 1::2], False),
    (lambda y: y[:, 1:16:2], False),
    (lambda y: y[:, None][:, 0, 1::2], False),
    (lambda y: y[..., :8], True),
    (lambda y: y[..., 4:12], True),
], ids=["::2-and-1::2", "1:16:2", "None-then-1::2", "channels-last-...,:8", "channels-last-...,4:12"])
def test_strided_and_ellipsis_channel_slices_are_rewritten_to_the_channels_kept(pick, channels_last):
    """A strided slice reads the kept channels by position (they need not be evenly spaced); `x[..., a:b]` slices
    the last dim, which is the channel dim of a channels-last tensor."""
    torch.manual_seed(0)
    model = _Sliced(pick, channels_last).eval()
    x = torch.randn(2, 3, 6, 6)
    for seed in range(3):
        ato, small = prune_and_compare(model, x, keep=0.5, seed=seed)
        assert ato.zigs.prunable and small.a.out_channels < 16


class _TrainHalves(nn.Module):
    """A branch on `self.training` in the forward and a hard-coded channel count (`reshape(-1, 8 * 16)`)."""

    def __init__(self):
        super().__init__()
        self.c0, self.fc = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.Linear(8 * 16, 5)
        self.c1, self.c2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 5, 1)

    def forward(self, x):
        y = F.relu(self.c0(x))
        if self.training:
            y = y * 0.5
        return self.fc(y.reshape(-1, 8 * 16)) + self.c2(F.relu(self.c1(x))).mean((2, 3))


def test_a_rewritten_graph_of_a_forward_branching_on_training_warns_and_equals_the_model_in_its_mode():
    """The hard-coded count makes the pruned model a rewritten graph, which keeps the branch of the compile-time
    mode: compiled in eval mode, prune says so and the graph equals the masked model in eval mode; compiled in
    train mode, the check (in eval mode) cannot pass, and the error says why instead of blaming atofx."""
    torch.manual_seed(0)
    model, x = _TrainHalves().eval(), torch.randn(4, 3, 16, 16)
    ato = atofx.compile(model, x[:1])
    assert ato.mode_branches == ("",)
    mask = ato.random_mask(keep=0.5, seed=0)
    with pytest.warns(atofx.AtofxWarning, match=r"_TrainHalves.forward branches on self.training: the graph runs"):
        small = ato.prune(mask)
    assert small.c1.out_channels < 6 and small.fc.in_features < 128
    ato.apply_mask(mask)
    with torch.no_grad():
        assert relative_difference(model(x), small.eval()(x)) <= TOL
    trained = atofx.compile(_TrainHalves().train(), x[:1])
    with pytest.raises(atofx.EquivalenceError, match=r"compiled in train mode it cannot match .*model\.eval\(\)"):
        trained.prune(trained.random_mask(keep=0.5, seed=0))


class _BatchStats(nn.Module):
    """timm's BatchNormAct2d: `batch_norm(..., True if self.training else ...)`, and a hard-coded count."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn, self.fc = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.Linear(8 * 16, 5)

    def forward(self, x):
        batch_stats = True if self.training else self.bn.running_mean is None
        y = F.batch_norm(self.c0(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                         batch_stats)
        return self.fc(F.relu(y).reshape(-1, 8 * 16))


@pytest.mark.parametrize("mode", [True, False], ids=["compiled-in-train-mode", "compiled-in-eval-mode"])
def test_a_branch_that_only_sets_a_flag_to_the_mode_is_followed_by_the_pruned_graph_in_both_modes(mode):
    """The two modes' graphs differ only in batch_norm's `training` flag: it becomes a read of the graph's own
    `training`, so the rewritten pruned graph uses batch statistics in train mode and running ones in eval mode."""
    torch.manual_seed(0)
    model, x = _BatchStats().train(mode), torch.randn(4, 3, 16, 16)
    ato = atofx.compile(model, x[:1])
    assert ato.mode_branches == ()
    mask = ato.random_mask(keep=0.5, seed=0)
    small = ato.prune(mask)
    assert isinstance(small, torch.fx.GraphModule) and small.fc.in_features < 128
    ato.apply_mask(mask)
    for train in (True, False):
        reference, pruned = copy.deepcopy(model).train(train), copy.deepcopy(small).train(train)
        with torch.no_grad():
            assert relative_difference(reference(x), pruned(x)) <= TOL

