"""What a Torch-Pruning user reaches for in `ato.train`, and the warnings a short schedule deserves."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.ato.config import ATOConfig
from atofx.ato.model import schedule_warning
from atofx.ato.trainer import Phases


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.fixture
def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_two_epochs_of_ato_warn_that_the_controller_has_no_time(loader):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    with pytest.warns(atofx.AtofxWarning, match=r"with 2 epochs the controller learns the mask in 1 epoch") as caught:
        ato.train(loader, 2, target_flops=0.6, progress=False)
    text = str(caught[0].message)  # advice in the words of the Python API, not the command line's flags
    assert "at least 8" in text and "controller_data=" in text and "method='static'" in text and "--" not in text


def test_a_static_run_or_a_long_schedule_does_not_warn(loader):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", atofx.AtofxWarning)
        ato.train(loader, 2, target_flops=0.6, method="static", progress=False)
    assert schedule_warning(Phases.of(ATOConfig(), 30), controller_batches=10, passes=1) is None
    assert schedule_warning(Phases.of(ATOConfig(), 30), controller_batches=1, passes=1) is not None  # 12 steps


def train_briefly(ato: atofx.ATOModel, loader: DataLoader, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atofx.AtofxWarning)  # a two-epoch schedule: the warning is tested above
        ato.train(loader, 2, target_flops=0.3, progress=False, **kw)


def test_ignored_layers_and_pin_leave_those_spaces_whole(loader):
    model = tiny()
    ato = atofx.compile(model, torch.randn(1, 1, 8, 8))
    first, second = (s.index for s in ato.zigs.prunable)
    train_briefly(ato, loader, ignored_layers=[model[0]])
    assert first not in ato.mask.bits and ato.spaces[first].reason == "pinned by the user"
    assert ato.prune()[0].out_channels == 8, "the ignored layer keeps every output channel"
    ato2 = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    train_briefly(ato2, loader, pin=[second])
    assert set(ato2.mask.bits) == {first}


def test_max_pruned_caps_what_a_space_loses(loader):
    model = tiny()
    ato = atofx.compile(model, torch.randn(1, 1, 8, 8))
    train_briefly(ato, loader)
    assert int(ato.mask.bits[ato.spaces_of("3")[0].index].sum()) < 12, "uncapped, the second conv loses more"
    ato2 = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    train_briefly(ato2, loader, max_pruned={"3": 0.25})  # layer path "3": the second conv, 16 channels
    second = ato2.spaces_of("3")[0].index
    assert int(ato2.mask.bits[second].sum()) >= 12
    assert ato2.prune()[3].out_channels >= 12


@pytest.mark.parametrize("option, message", [
    ({"ignored_layer": []}, r"unknown option 'ignored_layer'; did you mean 'ignored_layers'\?"),
    ({"importance": "l1"}, r"atofx has no option 'importance': .*mask_from_scores"),
    ({"pruning_ratio": 0.5}, r"target_flops is the share of FLOPs kept"),
    ({"lamda": 3.0}, r"did you mean 'lam'\?"),
    ({"pin": ["conv9"]}, r"no layer or channel space 'conv9'"),
    ({"max_pruned": 1.5}, r"max_pruned .* must be in \[0, 1\]"),
])
def test_unknown_or_bad_options_are_config_errors(loader, option, message):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    with pytest.raises(atofx.ConfigError, match=message):
        ato.train(loader, 2, target_flops=0.5, progress=False, **option)


def test_a_mask_by_hand_or_from_scores(loader):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    by_hand = atofx.Mask({s.index: torch.ones(s.width, dtype=torch.bool) for s in ato.zigs.prunable})
    first = ato.zigs.prunable[0]
    by_hand.bits[first.index][:3] = False
    assert ato.prune(by_hand)[0].out_channels == 5
    norms = ato.group_norms()
    assert set(norms) == {s.index for s in ato.zigs.prunable} and all(n.min() > 0 for n in norms.values())
    mask = ato.mask_from_scores(norms, keep=0.5)
    kept = mask.bits[first.index]
    assert int(kept.sum()) == 4 and norms[first.index][kept].min() >= norms[first.index][~kept].max()
    ato.prune(mask)


def test_a_model_passed_in_eval_mode_ends_training_wholly_in_train_mode(loader):
    """The loop trains the traced GraphModule, whose root is not the model: the model's root must follow too, or
    it (and its pruned copy) keeps an eval root over training layers."""
    model = tiny().eval()
    ato = atofx.compile(model, torch.randn(1, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atofx.AtofxWarning)
        ato.train(loader, 3, target_flops=0.6, progress=False, controller_data=0.5)
    assert all(m.training for m in model.modules())
    assert all(m.training for m in ato.prune().modules())


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = tiny()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        return out, out.detach()


@pytest.mark.parametrize("labels, model, message", [
    (torch.int32, tiny, r"labels are \(16,\) int32; cross-entropy takes class indices as int64: convert them with "
                        r"y\.long\(\)"),
    (torch.int64, _Pair, r"the model returns a tuple, and cross-entropy takes one tensor: pass a loss_fn that picks "
                         r"the logits, e\.g\. lambda out, y: F\.cross_entropy\(out\[0\], y\)"),
])
def test_what_cross_entropy_cannot_take_is_refused_before_a_step(labels, model, message):
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,)).to(labels))
    net = model()
    ato = atofx.compile(net, torch.randn(1, 1, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings(), pytest.raises(atofx.ShapeError, match=message):
        warnings.simplefilter("ignore", atofx.AtofxWarning)
        ato.train(DataLoader(data, batch_size=16), 3, target_flops=0.6, progress=False, controller_data=0.5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm untouched too


def test_reduce_lr_on_plateau_steps_on_the_validation_loss(loader):
    model = tiny()
    ato = atofx.compile(model, torch.randn(1, 1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    seen = []
    step = plateau.step
    plateau.step = lambda metric: seen.append(metric) or step(metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", atofx.AtofxWarning)
        history = ato.train(loader, 3, target_flops=0.6, optimizer=opt, scheduler=plateau, val_loader=loader,
                            progress=False, controller_data=0.5)
    assert seen == [r["val_loss"] for r in history]


def test_an_optimiser_the_projection_cannot_follow_is_refused_before_any_epoch(loader):
    model = tiny()
    ato = atofx.compile(model, torch.randn(1, 1, 8, 8))
    first, rest = list(model[:2].parameters()), list(model[2:].parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    two_rates = torch.optim.SGD([{"params": first, "lr": 0.01}, {"params": rest, "lr": 0.1}])
    elsewhere = torch.optim.SGD(tiny().parameters(), lr=0.1)
    for optimizer, message in ((two_rates, r"need one learning rate .*found \[0\.01, 0\.1\].*pin=\[\.\.\.\]"),
                               (elsewhere, r"holds none of the model's prunable parameters")):
        with warnings.catch_warnings(), pytest.raises(atofx.AtofxError, match=message):
            warnings.simplefilter("ignore", atofx.AtofxWarning)
            ato.train(loader, 10, target_flops=0.6, optimizer=optimizer, progress=False, controller_data=0.5)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one step taken


def test_a_budget_the_caps_leave_out_of_reach_is_said(loader):
    ato = atofx.compile(tiny(), torch.randn(1, 1, 8, 8))
    with pytest.warns(atofx.AtofxWarning, match=r"keeps 1\.000 of the FLOPs, above the 0\.300 asked for: what is "
                                                r"left prunable \(after max_pruned, pin"):
        ato.train(loader, 10, target_flops=0.3, max_pruned=0.0, progress=False, controller_data=0.5)
