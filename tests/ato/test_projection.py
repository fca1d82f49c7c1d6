"""Group projections on ZIG parameters: hand-checked formulas, exact zeros, and agreement with the
ZIGSet's own per-ZIG slices on real models (ResNet-18; a CNN with depthwise, ConvTranspose,
layer-scale and a module called twice)."""

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import atofx
from atofx.ato.projection import ZIGParams
from atofx.errors import AtofxError, MaskError


class Tiny(nn.Module):
    """One prunable space of two ZIGs: {conv.weight[0], conv.bias[0]} and {conv.weight[1], conv.bias[1]}."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([3.0, 0.6]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([4.0, 0.8]))  # norms: 5 and 1

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class Mixed(nn.Module):
    """Depthwise conv, per-channel layer scale (C,1,1), ConvTranspose (out dim 1), a conv called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ls = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.shared = nn.Conv2d(6, 6, 1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = self.dw(x) * self.ls
        x = torch.relu(self.up(x))
        x = self.shared(torch.relu(self.shared(x)))
        return self.head(self.c2(x).mean((2, 3)))


def compiled(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> atofx.ATOModel:
    """Build and compile a model with fixed weights, whatever ran before."""
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # non-trivial BN affine parameters and statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.1, 0.1)
    return atofx.compile(model.eval(), (torch.randn(*shape),))


@pytest.fixture(scope="module")
def tiny():
    return compiled(Tiny, (1, 1, 4, 4))


@pytest.fixture(scope="module")
def resnet():
    return compiled(lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32))


@pytest.fixture(scope="module")
def mixed():
    return compiled(Mixed, (2, 3, 8, 8))


def clone(ato: atofx.ATOModel) -> tuple[nn.Module, dict[str, torch.Tensor], ZIGParams]:
    """A private copy of the graph module, its parameters, and a ZIGParams over them."""
    gm = copy.deepcopy(ato.graph_module)
    params = dict(gm.named_parameters())
    return gm, params, ZIGParams(ato.zigs, params)


def zig_ids(ato: atofx.ATOModel, per_space: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(space index, position, ZIG id) of a few ZIGs of every prunable space."""
    rng = np.random.default_rng(seed)
    picks = []
    for s in ato.zigs.prunable:
        for pos in rng.choice(s.width, size=min(per_space, s.width), replace=False):
            picks.append((s.index, int(pos), int(s.components[pos])))
    return picks


def scale_by_hand(ato, params, picks, factors) -> None:
    """Loop reference: scale each picked ZIG's "out" entries (as ZIGSet.zig_slices lists them)."""
    with torch.no_grad():
        for (space, pos, _), f in zip(picks, factors, strict=True):
            for module, name, dim, idx in ato.zigs.zig_slices(space, pos):
                p = params[f"{module}.{name}" if module else name]
                idx = torch.as_tensor(idx)
                p.index_copy_(dim, idx, p.index_select(dim, idx) * f)


def norm_by_hand(ato, params, space, pos) -> float:
    sq = sum(params[f"{m}.{n}" if m else n].index_select(d, torch.as_tensor(i)).double().square().sum().item()
             for m, n, d, i in ato.zigs.zig_slices(space, pos))
    return sq**0.5


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6, msg=name)


# ---------------------------------------------------------------------- hand-checked, tiny model
def tiny_lams(zp: ZIGParams, tiny, lam0: float, lam1: float) -> torch.Tensor:
    c = tiny.zigs.prunable[0].components
    lam = torch.zeros(zp.n_zigs, dtype=torch.float64)
    lam[c[0]], lam[c[1]] = lam0, lam1
    return lam


def conv_values(params):
    return params["conv.weight"].flatten().tolist(), params["conv.bias"].tolist()


def test_tiny_norms(tiny):
    _, params, zp = clone(tiny)
    c = tiny.zigs.prunable[0].components
    norms = zp.group_norms()
    assert norms[c].tolist() == pytest.approx([5.0, 1.0])
    pinned = np.setdiff1d(np.arange(zp.n_zigs), c)
    assert (norms[pinned] == 0).all()
    assert zp.names == ["conv.weight", "conv.bias"]


def test_prox_formula_by_hand(tiny):
    _, params, zp = clone(tiny)
    zp.proximal_group_lasso_(tiny_lams(zp, tiny, 2.0, 0.0), lr=0.5)
    # group 0: ||x|| = 5, lr * lam = 1 -> factor 1 - 1/5 = 0.8; group 1: lam 0 -> untouched bit for bit
    w, b = conv_values(params)
    assert w == pytest.approx([2.4, 0.6]) and b == pytest.approx([3.2, 0.8])
    assert params["conv.weight"][1].item() == torch.tensor(0.6).item()
    assert params["conv.bias"][1].item() == torch.tensor(0.8).item()


def test_prox_keeps_a_zero_group_zero_at_learning_rate_zero(tiny):
    """A cosine schedule's last step has lr 0: 0 / ||0|| must not turn a dropped, zeroed group into NaN."""
    _, params, zp = clone(tiny)
    zp.proximal_group_lasso_(tiny_lams(zp, tiny, 14.0, 0.0), lr=0.5)  # group 0 exactly zero
    zp.proximal_group_lasso_(tiny_lams(zp, tiny, 14.0, 0.0), lr=0.0)
    w, b = conv_values(params)
    assert (w[0], b[0]) == (0.0, 0.0) and w[1] == pytest.approx(0.6) and b[1] == pytest.approx(0.8)


@pytest.mark.parametrize("lam", [10.0, 14.0])  # lr * lam = 5 = ||x|| (boundary) and 7 > ||x||
def test_prox_gives_exact_zero_once_the_step_exceeds_the_norm(tiny, lam):
    _, params, zp = clone(tiny)
    zp.proximal_group_lasso_(tiny_lams(zp, tiny, lam, 0.9), lr=0.5)
    w, b = conv_values(params)
    assert w[0] == 0.0 and b[0] == 0.0
    assert w[1] == pytest.approx(0.6 * 0.55) and b[1] == pytest.approx(0.8 * 0.55)  # 1 - 0.45 / 1


def test_half_space_both_branches(tiny):
    _, params, zp = clone(tiny)
    # eps = 0.5. Group 0: lr*lam = 3, trial point 0.4 x, x~.x = 0.4 * 25 < 0.5 * 25 -> zero.
    # Group 1: lr*lam = 0.2, trial 0.8 x, x~.x = 0.8 > 0.5 -> keeps the trial point (the prox would keep 0.4 x in group 0).
    zp.half_space_project_(tiny_lams(zp, tiny, 6.0, 0.4), lr=0.5, eps=0.5)
    w, b = conv_values(params)
    assert w[0] == 0.0 and b[0] == 0.0
    assert w[1] == pytest.approx(0.48) and b[1] == pytest.approx(0.64)


def test_half_space_with_eps_zero_and_no_step_in_between_is_the_prox(mixed):
    _, p_hsp, hsp = clone(mixed)
    _, p_prox, prox = clone(mixed)
    lam = torch.rand(hsp.n_zigs, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    hsp.half_space_project_(lam, lr=0.1, eps=0.0)
    prox.proximal_group_lasso_(lam, lr=0.1)
    assert_same_params(p_hsp, p_prox)
    assert (hsp.group_norms() == 0).sum() > 0  # some groups crossed


def test_half_space_tests_the_trial_point_against_the_point_before_the_step(tiny):
    """OTO's rule, not the prox: a group the optimiser's step pulled to 5% of its norm is zeroed (the trial point
    left the half-space x~ . x >= 0.1 ||x||^2), while the prox, seeing only the new small group, keeps it."""
    _, p_hsp, hsp = clone(tiny)
    _, p_prox, prox = clone(tiny)
    hsp.remember_()  # x_k: group 1 has norm 1
    for params in (p_hsp, p_prox):
        with torch.no_grad():  # the optimiser's step: group 1 to 0.05 of itself (norm 0.05)
            params["conv.weight"][1] *= 0.05
            params["conv.bias"][1] *= 0.05
    lam = tiny_lams(hsp, tiny, 0.0, 0.1)  # lr * lam = 0.01 on group 1
    hsp.half_space_project_(lam, lr=0.1, eps=0.1)
    prox.proximal_group_lasso_(lam, lr=0.1)
    w_h, b_h = conv_values(p_hsp)
    w_p, b_p = conv_values(p_prox)
    assert w_h[1] == 0.0 and b_h[1] == 0.0  # trial = 0.05 x - 0.01 x: 0.04 ||x||^2 < 0.1 ||x||^2
    assert w_p[1] == pytest.approx(0.6 * 0.05 * 0.8) and b_p[1] == pytest.approx(0.8 * 0.05 * 0.8)  # 1 - 0.01/0.05
    assert w_h[0] == w_p[0] == 3.0  # lam 0: untouched by both


def test_half_space_takes_the_trial_step_along_the_previous_point(tiny):
    _, params, zp = clone(tiny)
    zp.remember_()
    with torch.no_grad():  # the step moved group 1 sideways: (0.6, 0.8) -> (0.8, 0.6), same norm
        params["conv.weight"][1] = 0.8
        params["conv.bias"][1] = 0.6
    zp.half_space_project_(tiny_lams(zp, tiny, 0.0, 1.0), lr=0.2, eps=0.1)  # step 0.2 along x_k / ||x_k||
    w, b = conv_values(params)
    assert w[1] == pytest.approx(0.8 - 0.2 * 0.6) and b[1] == pytest.approx(0.6 - 0.2 * 0.8)


def test_lambda_zero_leaves_everything_bit_identical(mixed):
    _, params, zp = clone(mixed)
    before = {k: v.detach().clone() for k, v in params.items()}
    zero = torch.zeros(zp.n_zigs)
    zp.proximal_group_lasso_(zero, lr=1.0)
    zp.half_space_project_(zero, lr=1.0, eps=0.3)
    zp.zero_(torch.zeros(zp.n_zigs, dtype=torch.bool))
    assert all(torch.equal(before[k], params[k]) for k in params)


# ---------------------------------------------------------------------- masks -> lambdas
def test_group_lambdas_from_controller_masks(tiny):
    _, _, zp = clone(tiny)
    space = tiny.zigs.prunable[0]
    lam = zp.group_lambdas({space.index: torch.tensor([0.0, 1.0])}, lam=10.0)
    expected = torch.zeros(zp.n_zigs, dtype=torch.float64)
    expected[space.components[0]] = 10.0
    assert torch.equal(lam, expected)
    with pytest.raises(MaskError):
        zp.keep_vector({space.index: torch.ones(3)})
    with pytest.raises(MaskError):
        zp.proximal_group_lasso_(torch.zeros(2), lr=1.0)


def test_step_size_is_the_optimizers_lr_for_zig_parameters(tiny):
    gm, params, zp = clone(tiny)
    opt = torch.optim.AdamW([{"params": [params["conv.weight"], params["conv.bias"]], "lr": 0.1},
                             {"params": gm.head.parameters(), "lr": 0.5}])
    assert zp.step_size(opt) == 0.1
    opt.param_groups[0]["lr"] = 0.01  # what a scheduler does
    assert zp.step_size(opt) == 0.01
    split = torch.optim.SGD([{"params": [params["conv.weight"]], "lr": 0.1}, {"params": [params["conv.bias"]], "lr": 0.2}])
    with pytest.raises(AtofxError):
        zp.step_size(split)


# ---------------------------------------------------------------------- vectorised vs the ZIGSet, ResNet-18
def test_resnet_norms_match_the_zigset(resnet):
    _, params, zp = clone(resnet)
    norms = zp.group_norms()
    for space, pos, comp in zig_ids(resnet, 2):
        assert norms[comp].item() == pytest.approx(norm_by_hand(resnet, params, space, pos), rel=1e-6)
    pinned = [c for s in resnet.zigs.spaces if s.pinned for c in s.components]
    assert (norms[pinned] == 0).all()
    assert torch.equal(ZIGParams.of(resnet).group_norms(), norms)  # the compiled model's own parameters


def test_resnet_zero_is_exactly_the_zigs_entries(resnet):
    gm, params, zp = clone(resnet)
    ref_gm, ref_params, _ = clone(resnet)
    picks = zig_ids(resnet, 3)
    groups = torch.zeros(zp.n_zigs, dtype=torch.bool)
    groups[[c for *_, c in picks]] = True
    zp.zero_(groups)
    scale_by_hand(resnet, ref_params, picks, [0.0] * len(picks))
    for name in params:
        assert torch.equal(params[name], ref_params[name]), name
    norms = zp.group_norms()
    assert (norms[groups] == 0).all() and (norms[[s.components[0] for s in resnet.zigs.prunable]] > 0).any()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(gm(x), ref_gm(x))
        assert not torch.equal(gm(x), resnet.graph_module(x))


def test_resnet_prox_matches_a_loop_over_groups(resnet):
    _, params, zp = clone(resnet)
    _, ref_params, _ = clone(resnet)
    picks = zig_ids(resnet, 3, seed=1)
    lam = torch.zeros(zp.n_zigs, dtype=torch.float64)
    lam_pick = torch.linspace(0.5, 60.0, len(picks), dtype=torch.float64)
    lam[[c for *_, c in picks]] = lam_pick
    lr = 0.05
    factors = [max(0.0, 1 - lr * lp / norm_by_hand(resnet, ref_params, s, p))
               for (s, p, _), lp in zip(picks, lam_pick.tolist(), strict=True)]
    assert 0.0 in factors and any(0 < f < 1 for f in factors)
    zp.proximal_group_lasso_(lam, lr)
    scale_by_hand(resnet, ref_params, picks, factors)
    assert_same_params(params, ref_params)


# ---------------------------------------------------------------------- parameters in several slices
def test_mixed_model_index_covers_every_slice_kind(mixed):
    _, _, zp = clone(mixed)
    assert set(zp.names) == {"c1.weight", "c1.bias", "bn.weight", "bn.bias", "dw.weight", "dw.bias", "ls",
                             "up.weight", "up.bias", "shared.weight", "shared.bias", "c2.weight", "c2.bias"}


def test_mixed_norms_match_the_zigset(mixed):
    _, params, zp = clone(mixed)
    norms = zp.group_norms()
    for space, pos, comp in zig_ids(mixed, 8):
        assert norms[comp].item() == pytest.approx(norm_by_hand(mixed, params, space, pos), rel=1e-6)


def test_mixed_zero_matches_hand_zeroing_and_silences_channels(mixed):
    gm, params, zp = clone(mixed)
    ref_gm, ref_params, _ = clone(mixed)
    picks = zig_ids(mixed, 2, seed=3)
    groups = torch.zeros(zp.n_zigs, dtype=torch.bool)
    groups[[c for *_, c in picks]] = True
    zp.zero_(groups)
    scale_by_hand(mixed, ref_params, picks, [0.0] * len(picks))
    for name in params:
        assert torch.equal(params[name], ref_params[name]), name
    up = mixed.zigs.spaces[[s.name for s in mixed.zigs.spaces].index("up")]
    for space, pos, _ in picks:
        if space == up.index:
            assert (params["up.weight"][:, pos] == 0).all() and (params["up.weight"][pos] != 0).any()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(gm(x), ref_gm(x))
        # a zeroed ZIG of the ConvTranspose space: its output channel is exactly zero
        up_out = torch.relu(gm.up(gm.dw(torch.relu(gm.bn(gm.c1(x)))) * gm.ls))
    zeroed_up = [pos for space, pos, _ in picks if space == up.index]
    assert zeroed_up and (up_out[:, zeroed_up] == 0).all()


def test_a_layer_called_twice_is_one_space_and_its_rows_shrink_once(mixed):
    """`shared` is called twice: both calls index the same rows, so they are one ZIG each, counted once."""
    _, params, zp = clone(mixed)
    (space,) = [s for s in mixed.zigs.prunable if "shared" in s.producers]
    for pos in range(space.width):
        rows = [idx for m, n, d, idx in mixed.zigs.zig_slices(space.index, pos) if (m, n, d) == ("shared", "weight", 0)]
        assert len(rows) == 1
    lam = torch.zeros(zp.n_zigs, dtype=torch.float64)
    lam[space.components[0]] = 1.0
    norm = norm_by_hand(mixed, params, space.index, 0)
    lr = 0.25 * norm
    (row,) = [idx for m, n, d, idx in mixed.zigs.zig_slices(space.index, 0) if (m, n, d) == ("shared", "weight", 0)]
    before = params["shared.weight"].detach().clone()
    zp.proximal_group_lasso_(lam, lr)
    torch.testing.assert_close(params["shared.weight"][row], before[row] * 0.75)  # one factor, not its square
    others = np.setdiff1d(np.arange(before.shape[0]), row)
    assert torch.equal(params["shared.weight"][others], before[others])
