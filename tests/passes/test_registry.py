"""passes/registry.py and the op table `OPS`: one consistent entry per op, and an op added by one entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from atofx.passes.channel_layout import ChannelLayout
from atofx.passes.op_rules import OPS, unary
from atofx.passes.registry import Op, OpTable
from atofx.passes.rewrite import remove_channels
from torch import nn

from atofx.core.serialization import _CHANNEL_ATTRS, _allowed_functions
from atofx.errors import OpTableError
from tests.passes.analysis import Flip, analyse, rows, space_of

# a sample layer per class with a surgery, and what to remove from it: (parameter, dim) -> indices
SURGERY_SAMPLES = {
    nn.Conv1d: (lambda: nn.Conv1d(4, 6, 3), {("weight", 0): [1], ("weight", 1): [0]}),
    nn.Conv2d: (lambda: nn.Conv2d(4, 6, 3, groups=2), {("weight", 0): [3, 4, 5]}),
    nn.Conv3d: (lambda: nn.Conv3d(4, 6, 1), {("weight", 1): [2, 3]}),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(4, 6, 3), {("weight", 1): [0], ("weight", 0): [1]}),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(4, 6, 3), {("weight", 1): [5]}),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(4, 6, 1), {("weight", 0): [0, 1]}),
    nn.Linear: (lambda: nn.Linear(4, 6), {("weight", 0): [2], ("weight", 1): [3]}),
    **{cls: (lambda cls=cls: cls(6), {("weight", 0): [1], ("bias", 0): [1], ("running_mean", 0): [1],
                                       ("running_var", 0): [1]})
       for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)},
    **{cls: (lambda cls=cls: cls(6, affine=True, track_running_stats=True), {("weight", 0): [0], ("bias", 0): [0],
                                                                               ("running_mean", 0): [0],
                                                                               ("running_var", 0): [0]})
       for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    nn.GroupNorm: (lambda: nn.GroupNorm(3, 6), {("weight", 0): [0, 1], ("bias", 0): [0, 1]}),
    nn.PReLU: (lambda: nn.PReLU(6), {("weight", 0): [4]}),
    **{cls: (lambda cls=cls: cls(6, 5, bidirectional=True), {("weight_ih_l0", 1): [2], ("weight_ih_l0_reverse", 1): [2]})
       for cls in (nn.RNN, nn.GRU, nn.LSTM)},
}

# a sample layer and input per class with a shape shortcut (in eval mode)
SHAPE_SAMPLES = {
    nn.Conv1d: (lambda: nn.Conv1d(3, 5, 3, stride=2), (2, 3, 9)),
    nn.Conv2d: (lambda: nn.Conv2d(3, 5, 3, padding="same", dilation=2), (2, 3, 7, 6)),
    nn.Conv3d: (lambda: nn.Conv3d(3, 5, 2, padding=1), (1, 3, 4, 5, 3)),
    nn.Linear: (lambda: nn.Linear(3, 5), (2, 4, 3)),
    nn.BatchNorm1d: (lambda: nn.BatchNorm1d(3), (2, 3, 7)),
    nn.BatchNorm2d: (lambda: nn.BatchNorm2d(3), (2, 3, 4, 4)),
    nn.BatchNorm3d: (lambda: nn.BatchNorm3d(3), (1, 3, 2, 2, 2)),
}


def _targets_with(field: str) -> list:
    return [t for op in OPS.entries if getattr(op, field) for t in op.targets]


def test_a_target_declared_twice_is_refused_with_both_entries_named() -> None:
    with pytest.raises(OpTableError, match=r"declared twice.*'first' and as 'second'"):
        OpTable([Op((torch.relu,), "first", unary(True)), Op((torch.relu, torch.tanh), "second", unary(True))])
    with pytest.raises(OpTableError, match="declared twice"):
        OPS.with_entries(Op((nn.Conv2d,), "conv again"))
    assert len(OPS.by_target) == sum(len(op.targets) for op in OPS.entries)


@pytest.mark.parametrize(("entry", "complaint"), [
    (Op((nn.Conv2d,), "surgery alone", surgery=lambda m, r: set()), "no rule"),
    (Op((torch.relu,), "function surgery", unary(True), surgery=lambda m, r: set()), "not a layer class"),
    (Op((nn.ReLU, torch.relu), "mixed widths", unary(True), saved_attrs=("width",)), "not a layer class"),
    (Op((nn.ReLU,), "layer patch", unary(True), patch=lambda n, lay, k: False), "for a layer class"),
], ids=lambda v: v.kind if isinstance(v, Op) else "")
def test_an_inconsistent_entry_is_refused(entry: Op, complaint: str) -> None:
    with pytest.raises(OpTableError, match=complaint):
        OpTable([entry])


def test_every_layer_with_a_surgery_has_a_sample_here() -> None:
    assert set(_targets_with("surgery")) == set(SURGERY_SAMPLES)


@pytest.mark.parametrize("cls", list(SURGERY_SAMPLES), ids=lambda c: c.__name__)
def test_a_surgery_changes_only_the_widths_saving_records(cls: type) -> None:
    make, removal = SURGERY_SAMPLES[cls]
    layer = make()
    before = {k: v for k, v in vars(layer).items() if type(v) is int}
    handled = OPS.surgery_for(layer)(layer, {k: np.asarray(v) for k, v in removal.items()})
    changed = {k for k, v in vars(layer).items() if type(v) is int and before.get(k) != v}
    assert changed <= set(OPS.by_target[cls].saved_attrs) <= set(_CHANNEL_ATTRS), changed
    for name, dim in handled & removal.keys():
        assert getattr(layer, name).shape[dim] == getattr(make(), name).shape[dim] - len(removal[(name, dim)])


def test_a_subclass_gets_its_bases_surgery_even_with_its_own_forward() -> None:
    class Same(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    assert OPS.surgery_for(Same(2, 4, 1)) is OPS.by_target[nn.Conv2d].surgery
    assert OPS.shape_shortcut(Same) is None  # its forward may compute another shape


def test_every_shape_shortcut_has_a_sample_here() -> None:
    assert set(_targets_with("output_shape")) == set(SHAPE_SAMPLES)


@pytest.mark.parametrize("cls", list(SHAPE_SAMPLES), ids=lambda c: c.__name__)
def test_a_shape_shortcut_agrees_with_running_the_layer(cls: type) -> None:
    make, shape = SHAPE_SAMPLES[cls]
    layer, x = make().eval(), torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert OPS.shape_shortcut(cls)(layer, x) == list(layer(x).shape)


def test_saving_allows_every_function_of_the_table_and_records_every_declared_width() -> None:
    allowed = set(_allowed_functions().values())
    assert {f for f in OPS.functions() if hasattr(f, "__qualname__")} == allowed
    assert torch.einsum in allowed and OPS.by_target[torch.einsum].rule is None  # saved only: its channels pin
    assert set(_CHANNEL_ATTRS) == {a for op in OPS.entries for a in op.saved_attrs}


def flip(ctx) -> ChannelLayout | None:
    """torch.flip over the channel dim reverses the channels; over other dims it keeps them."""
    lay = ctx.layout(ctx.arg(0, "input"))
    if lay is None:
        return None
    dims = [d % len(ctx.out_shape) for d in ctx.arg(1, "dims")]
    return ChannelLayout(lay.dim, lay.ids[::-1].copy(), lay.zero[::-1].copy()) if lay.dim in dims else lay


def test_supporting_an_op_is_one_entry() -> None:
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    _, before = analyse(Flip(), x)
    assert space_of(before, "a").pinned
    _, after = analyse(Flip(), x, OPS.with_entries(Op((torch.flip,), "flip", flip)))
    space = space_of(after, "a")
    assert not space.pinned and not after.facts.unknown_ops
    assert rows(after, space, "head", 1) == [[3], [2], [1], [0]]  # a's channel c is head's input 3 - c


class CRNN(nn.Module):
    """Conv features read by an LSTM, as in a text recogniser: the LSTM's input width follows the pruning."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.rnn, self.head = nn.Conv1d(2, 6, 3, padding=1), nn.LSTM(6, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.conv(x).transpose(1, 2))
        return self.head(out[:, -1])


def test_a_pruned_recurrent_layer_loads_into_a_fresh_model(tmp_path) -> None:
    """The LSTM's surgery changes its input_size, so its entry declares it and saving records it."""
    import atofx

    x = torch.randn(2, 2, 5, generator=torch.Generator().manual_seed(1))
    ato = atofx.compile(CRNN().eval(), (x,))
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))
    assert small.rnn.input_size == 3
    atofx.save(small, tmp_path / "crnn.pt")
    loaded = atofx.load(tmp_path / "crnn.pt", model=CRNN())
    assert loaded.rnn.input_size == 3
    assert torch.allclose(loaded.eval()(x), small.eval()(x))


def test_an_instance_norm_with_running_statistics_loses_those_channels_too() -> None:
    model = nn.Sequential(nn.InstanceNorm2d(6, affine=True, track_running_stats=True))
    state = ("weight", "bias", "running_mean", "running_var")
    remove_channels(model, {("0", name, 0): np.array([1, 4]) for name in state})
    assert model[0].num_features == 4 and all(getattr(model[0], name).shape == (4,) for name in state)
    assert model.eval()(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_max_pool2d(F.max_pool2d(self.conv(x), 2), 1).flatten(1)


def test_a_saved_graph_calls_the_very_pooling_functions_of_the_model(tmp_path) -> None:
    """F.max_pool2d and its kin share one __qualname__: each is saved under its own name."""
    import atofx

    model, x = Pools().eval(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    atofx.save(model, tmp_path / "pools.pt", example_inputs=(x,))
    loaded = atofx.load(tmp_path / "pools.pt")  # from the stored graph: refused if saving could not store it
    assert torch.allclose(loaded(x), model(x))
