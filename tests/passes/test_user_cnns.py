"""User-written CNN constructs the zoo lacks: tied weights, functional grouped convs, training-mode layers,
several inputs and structured outputs. Each is compiled, masked and pruned exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from atofx.passes.equivalence import relative_difference, run_eval
from torch import nn

import atofx
from atofx.ato.projection import ZIGParams

TOL = 1e-5


def _masked_and_pruned(model: nn.Module, inputs: tuple, keep: float = 0.5, seed: int = 0):
    """Compile, mask a copy in place and prune: (ato, masked copy, pruned model)."""
    ato = atofx.compile(model, inputs)
    mask = ato.random_mask(keep=keep, seed=seed)
    masked = copy.deepcopy(model)
    atofx.compile(masked, inputs).apply_mask(mask)
    small = ato.prune(mask)
    assert relative_difference(run_eval(masked, inputs), run_eval(small, inputs)) <= TOL
    return ato, masked, small


class TiedConvs(nn.Module):
    """A conv and a transposed conv share one weight (a tied autoencoder)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.dec = nn.ConvTranspose2d(6, 8, 3, padding=1)
        self.dec.weight = self.mid.weight
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.mid(torch.relu(self.enc(x))))
        return self.head(torch.relu(self.dec(y)) + torch.relu(self.enc(x)))


def test_a_weight_shared_by_two_layers_is_masked_and_pruned_as_one_tensor():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ato, _, small = _masked_and_pruned(TiedConvs(), (x,))
    # the shared weight's input dim is enc's channels and dec's outputs: one space
    assert any({"enc", "dec"} <= set(s.producers) for s in ato.zigs.prunable)
    assert small.dec.weight is small.mid.weight
    assert small.mid.weight.shape[0] < 6 and small.mid.weight.shape[1] < 8


def test_the_projection_indexes_a_shared_weight_once_under_either_name():
    torch.manual_seed(0)
    ato = atofx.compile(TiedConvs(), torch.randn(1, 3, 8, 8))
    names = ZIGParams.of(ato).names
    assert "dec.weight" in names  # its out-slice is dec's output channels
    assert len(names) == len(set(names))


class BlurPool(nn.Module):
    """A depthwise blur written functionally, as timm's BlurPool2d: a fixed filter buffer, `groups` a literal
    or computed from the input."""

    def __init__(self, channels: int, literal: bool):
        super().__init__()
        self.channels, self.literal = channels, literal
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (taps[:, None] * taps[None, :] / 16).expand(channels, 1, 3, 3).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.channels if self.literal else x.shape[1]
        return F.conv2d(F.pad(x, (1, 1, 1, 1), "reflect"), self.filt, stride=2, groups=groups)


class BlurNet(nn.Module):
    def __init__(self, literal: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.blur = BlurPool(8, literal)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.blur(torch.relu(self.bn(self.a(x)))))


@pytest.mark.parametrize("literal", [True, False])
def test_a_functional_depthwise_conv_prunes_with_its_groups_following(literal: bool):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ato, _, small = _masked_and_pruned(BlurNet(literal).eval(), (x,))
    space = next(s for s in ato.zigs.prunable if "a" in s.producers)
    assert "blur" in space.producers  # the filter rows go with the channels
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in BlurNet(literal).parameters())


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """timm's drop_path: the identity in eval mode, a per-sample Bernoulli scale in training."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _drop_path(x, self.p, self.training)


class StochasticNet(nn.Module):
    """A residual block with drop-path, a functional dropout and a blur whose `groups` literal forces a rewrite."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.drop_path = DropPath(0.5)
        self.blur = BlurPool(8, literal=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = x + self.drop_path(torch.relu(self.b(x)))
        return self.head(self.blur(F.dropout(x, 0.3, self.training)))


def test_a_rewritten_pruned_graph_keeps_dropout_and_drop_path_in_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = StochasticNet().train()
    _, masked, small = _masked_and_pruned(model, (x,))  # eval outputs equal the masked model's
    assert isinstance(small, torch.fx.GraphModule)
    assert model.training  # compile and prune leave the user's mode alone
    small.train()
    assert not torch.equal(small(x), small(x))  # dropout and drop-path are live
    small.eval()
    assert torch.equal(small(x), small(x))
    with torch.no_grad():
        assert relative_difference(run_eval(masked, (x,)), small(x)) <= TOL


def test_compiling_in_train_mode_finds_the_spaces_of_eval_mode():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    spaces = {mode: [(s.name, s.pinned) for s in atofx.compile(getattr(StochasticNet(), mode)(), x).spaces]
              for mode in ("train", "eval")}
    assert spaces["train"] == spaces["eval"]
    assert sum(not pinned for _, pinned in spaces["train"]) >= 1  # the residual stream through the drop-path


class TwoInputsDictOut(nn.Module):
    """Two image inputs fused, a dict of outputs (a detection-style head)."""

    def __init__(self):
        super().__init__()
        self.rgb = nn.Conv2d(3, 8, 3, padding=1)
        self.depth = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, 5, 1)
        self.box = nn.Conv2d(8, 4, 1)

    def forward(self, image: torch.Tensor, depth: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.relu(self.mix(torch.relu(self.rgb(image) + self.depth(depth))))
        return {"cls": self.cls(y), "box": self.box(y)}


class FeaturePyramid(nn.Module):
    """A backbone returning a list of feature maps at three scales."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
                                    for c_in, c_out in ((3, 8), (8, 12), (12, 16)))
        self.lateral = nn.ModuleList(nn.Conv2d(c, 6, 1) for c in (8, 12, 16))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage, lateral in zip(self.stages, self.lateral, strict=True):
            x = torch.relu(stage(x))
            features.append(lateral(x))
        return features


@pytest.mark.parametrize("make", [TwoInputsDictOut, FeaturePyramid])
def test_several_inputs_and_structured_outputs_prune_exactly(make):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16)) if make is TwoInputsDictOut else (
        torch.randn(2, 3, 16, 16),)
    ato, _, small = _masked_and_pruned(make().eval(), inputs)
    assert ato.zigs.prunable
    out = run_eval(small, inputs)
    assert isinstance(out, dict if make is TwoInputsDictOut else list)
    assert ato.flops(ato.random_mask(0.5)) < ato.flops()


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: batch statistics chosen by a Python branch on `self.training`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = True if self.training else self.running_mean is None
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, 0.1, self.eps)
        return torch.relu(x)


class NormActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct(8)
        self.drop_path = DropPath(0.5)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.a(x))
        return self.b(y + self.drop_path(y))


def test_compiled_in_train_mode_the_graph_keeps_a_python_branch_on_training_in_its_train_form():
    """The graph ATO trains is traced in the model's mode: batch statistics while training, the drop-path
    found to be the identity in eval mode kept as a call."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = NormActNet().train()
    ato = atofx.compile(model, x)
    assert any(n.meta.get("atofx_eval_identity") for n in ato.graph.nodes)
    assert any(n.target is F.batch_norm and n.kwargs.get("training") is True for n in ato.graph.nodes)
    model.drop_path.p = ato.graph_module.drop_path.p = 0.0  # deterministic: compare batch statistics alone
    reference = copy.deepcopy(model)
    assert torch.allclose(ato.graph_module.train()(x), reference(x), atol=1e-6)
