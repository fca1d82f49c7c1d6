"""The options that choose between atofx's behaviour and the authors' released code's (issue 14): each one
differs from the default where it should, the official flavour sets them all, bad values are refused, and
the per-epoch ZIG counts follow their definitions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import atofx
from atofx.app.cifar_models import CifarResNet
from atofx.app.datasets import digits
from atofx.ato.config import CHOICES, OFFICIAL, ATOConfig
from atofx.ato.controller import Controller, gated_spaces
from atofx.ato.flops_regularizer import controller_loss, two_sided_regularizer
from atofx.errors import ConfigError

EXAMPLE = (torch.zeros(1, 1, 8, 8),)
FAST = {"controller_data": 0.25, "controller_lr": 0.01, "controller_epochs": 3}


def fresh() -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(CifarResNet(8, 10, 1, 1), EXAMPLE)


def loaders() -> tuple[DataLoader, DataLoader]:
    """Fresh loaders, built the same way each time (a rerun of a script builds them anew)."""
    train, val = digits(0)
    return (DataLoader(Subset(train, range(256)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(Subset(val, range(128)), batch_size=64))


@pytest.fixture(scope="module")
def data():
    return loaders()


# ------------------------------------------------------------------------------ config
def test_defaults_and_official_differ_where_the_ablation_chose():
    """Issue 14's ablation (Fashion-MNIST, docs/design-notes.md) made the official decaying step the default;
    the other official choices stay options."""
    default, official = ATOConfig(), ATOConfig.official()
    assert (default.step_size, default.lam_schedule, default.lam_boost) == ("share", "jump", 100.0)
    assert (default.sampling, default.regularizer, default.controller_optimizer, default.head_bias,
            default.freeze_mask, default.search_space, default.window_mask) == \
        ("atofx", "paper", "adam", True, "bisect", "all", "floor")
    for name, value in OFFICIAL.items():
        assert getattr(official, name) == value, name
    assert {n for n in OFFICIAL if getattr(default, n) != OFFICIAL[n]} == \
        {"sampling", "regularizer", "controller_optimizer", "head_bias", "freeze_mask", "search_space", "window_mask"}
    assert ATOConfig.of("official", freeze_mask="dead").freeze_mask == "dead"  # an option overrides the flavour
    assert ATOConfig.of("atofx") == default


def test_a_short_run_gives_the_controller_more_passes_and_a_long_one_the_papers_one():
    config = ATOConfig()
    assert config.passes(window_epochs=4, batches=6) == 16  # the Fashion-MNIST quick protocol: 384 steps
    assert config.passes(window_epochs=80, batches=20) == 1  # CIFAR at paper scale: 1,600 steps in one pass each
    assert config.passes(window_epochs=40, batches=1) == 10  # a one-batch D_CN: at least 10 steps an epoch
    assert config.passes(window_epochs=1, batches=2) == 16  # a 2-epoch test run: capped, not 192 passes
    assert config.passes(window_epochs=4, batches=6, train_batches=118) == 16  # Fashion-MNIST quick: 96 <= 118
    assert config.passes(window_epochs=12, batches=2, train_batches=4) == 2  # never more steps than training
    assert config.passes(window_epochs=12, batches=12, train_batches=23) == 1  # the digits job: one pass
    assert ATOConfig(controller_epochs=2).passes(4, 6) == 2  # given: as given
    with pytest.raises(ConfigError, match="controller_epochs"):
        ATOConfig(controller_epochs=0).validate()


@pytest.mark.parametrize("name", [*CHOICES, "lam_jump_at", "hsp_eps", "head_bias", "lam_boost"])
def test_bad_option_values_are_refused(name):
    bad = {"lam_jump_at": 1.5, "hsp_eps": 1.0, "head_bias": "no", "lam_boost": 0.5}.get(name, "bogus")
    with pytest.raises(ConfigError, match=name):
        dataclasses.replace(ATOConfig(), **{name: bad}).validate()


def test_unknown_flavour_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="flavour"):
        ATOConfig.of("paper")
    with pytest.raises(ConfigError, match="step_size"):
        ATOConfig.of("official", step_sise="share")


def test_train_takes_the_options_and_refuses_bad_ones(data):
    with pytest.raises(ConfigError, match="sampling"):
        fresh().train(data[0], 2, target_flops=0.5, sampling="gumbel", progress=False)
    trainer = fresh().start_training(4, 0.5, flavour="official", hsp_eps=0.2)
    assert trainer.config == ATOConfig.official(target_flops=0.5, hsp_eps=0.2)


# ------------------------------------------------------------------------------ 1: step size and lambda
def test_share_step_divides_lambda_by_the_spaces_share_of_dropped_zigs():
    trainer = fresh().start_training(10, 0.5, step_size="share")
    a, b = trainer.ato.zigs.prunable[:2]
    mask = {k: v.clone() for k, v in trainer.mask.items()}
    mask[a.index][:1] = 0.0
    mask[b.index][:3] = 0.0
    share = trainer.params.group_lambdas(mask, 10.0, per_space_share=True)
    plain = trainer.params.group_lambdas(mask, 10.0)
    assert float(plain[a.components[0]]) == float(plain[b.components[0]]) == 10.0
    assert float(share[a.components[0]]) == pytest.approx(2.5) and float(share[b.components[0]]) == pytest.approx(7.5)
    assert float((share > 0).sum()) == 4  # only dropped ZIGs, each by lam * r_l (project_wegit)


def test_lambda_jumps_at_its_share_of_epochs_or_ramps_after_the_freeze():
    jump = fresh().start_training(10, 0.5, lam_schedule="jump", lam_boost=100.0, lam_jump_at=0.49)
    ramp = fresh().start_training(10, 0.5, lam_schedule="ramp", lam_boost=100.0)
    seen_jump, seen_ramp = [], []
    for epoch in range(10):
        jump.state.epoch = ramp.state.epoch = epoch
        jump.state.frozen = ramp.state.frozen = epoch >= 5
        seen_jump.append(jump.lam_now())
        seen_ramp.append(ramp.lam_now())
    assert seen_jump == [10.0] * 5 + [1000.0] * 5  # round(0.49 * 10) = 5
    assert seen_ramp[:5] == [10.0] * 5 and 10.0 < seen_ramp[5] < seen_ramp[8] < seen_ramp[9] == 1000.0


def test_share_step_lets_dropped_groups_decay_instead_of_dying(data):
    """The issue's finding: lr * lam zeroes dropped groups within a couple of steps; lam * r_l * lr does not."""
    zero_after = {}
    for step_size in ("lr", "share"):
        ato = fresh()
        trainer = ato.start_training(10, 0.5, warmup=0.0, step_size=step_size)
        trainer.mask = {k: (torch.arange(len(v)) % 2).float() for k, v in trainer.mask.items()}  # drop half
        opt = torch.optim.SGD(ato.model.parameters(), lr=0.1)
        for x, y in list(data[0])[:2]:
            opt.zero_grad()
            nn.functional.cross_entropy(ato.model(x), y).backward()
            opt.step()
            ato.after_optimizer_step(opt)
        zero_after[step_size] = trainer.zig_counts()
    assert zero_after["lr"]["zigs_dropped"] == zero_after["share"]["zigs_dropped"] > 0
    assert zero_after["share"]["zigs_zero"] == 0
    assert zero_after["lr"]["zigs_zero"] > zero_after["lr"]["zigs_dropped"] // 2


# ------------------------------------------------------------------------------ 2: half-space projector
def test_hsp_and_prox_give_different_models(data):
    params = {}
    for projection in ("prox", "hsp"):
        ato = fresh()
        ato.train(data[0], 3, target_flops=0.5, warmup=0.0, projection=projection, progress=False, **FAST)
        params[projection] = dict(ato.model.named_parameters())
    assert any(not torch.equal(params["prox"][k], params["hsp"][k]) for k in params["prox"])


# ------------------------------------------------------------------------------ 3: sampling
def test_one_gumbel_keeps_more_often_than_logistic_noise():
    c = Controller([4000], seed=0)
    with torch.no_grad():
        c.heads[0].weight.zero_()
        c.heads[0].bias.zero_()
    kept = {noise: float(c.sample(offset=0.0, generator=torch.Generator().manual_seed(0), noise=noise)[0].detach().mean())
            for noise in ("logistic", "gumbel")}
    assert kept["logistic"] == pytest.approx(0.5, abs=0.03)
    assert kept["gumbel"] == pytest.approx(1 - torch.exp(torch.tensor(-1.0)).item(), abs=0.03)  # P(G > 0)


@pytest.mark.parametrize("sampling", ["atofx", "official"])
def test_official_sampling_feeds_the_soft_mask_to_the_task_loss(data, sampling):
    trainer = fresh().start_training(10, 0.5, sampling=sampling)
    trainer.state.epoch = 2  # inside the window
    seen = []
    original = trainer.slots.set
    trainer.slots.set = lambda keep: (seen.append(None if keep is None else keep.detach().clone()), original(keep))
    before = trainer.mask
    trainer.controller_step(next(iter(data[0])))
    keep = seen[0]
    binary = bool(((keep == 0) | (keep == 1)).all())
    assert binary == (sampling == "atofx")
    assert (trainer.mask is before) == (sampling == "official")  # official: the mask changes once an epoch


def test_official_mask_is_a_sample_drawn_at_the_epoch_end(data):
    trainer = fresh().start_training(10, 0.5, sampling="official", freeze_mask="controller")
    trainer.state.epoch = 2
    trainer.controller_step(next(iter(data[0])))
    before = trainer.mask
    trainer.end_epoch(2)
    assert trainer.mask is not before and set(trainer.mask) == set(before)
    trainer.end_epoch(4)  # the window's end: the last sample is frozen as it is
    frozen = {k: v.clone() for k, v in trainer.mask.items()}
    trainer.end_epoch(5)
    assert trainer.state.frozen and all(torch.equal(frozen[k], trainer.mask[k]) for k in frozen)


# ------------------------------------------------------------------------------ 4: regulariser, optimiser, heads
def test_official_regulariser_is_two_sided_with_a_dead_band_and_twice_gamma():
    total, target = 100.0, 0.5
    for kept, expected in ((0.503, 0.0), (0.497, 0.0), (0.6, 2 * 4.0 * torch.log(torch.tensor(0.6 / 0.5)).item()),
                           (0.4, 2 * 4.0 * torch.log(torch.tensor(0.5 / 0.4)).item())):
        p = torch.tensor(kept * total, requires_grad=True)
        loss = controller_loss(torch.tensor(0.0), p, target, total, 4.0, "official")
        loss.backward()
        if expected == 0.0:
            assert float(p.grad) == 0.0, kept  # inside the band: no push either way
        else:
            assert float(loss.detach()) == pytest.approx(expected, rel=1e-5), kept
    below = torch.tensor(40.0)
    assert float(controller_loss(torch.tensor(0.0), below, target, total, 4.0, "paper")) == 0.0  # one-sided
    assert float(two_sided_regularizer(below, target, total)) > 0.0


def test_official_controller_optimiser_and_heads():
    trainer = fresh().start_training(10, 0.5, controller_optimizer="adamw", head_bias=False)
    assert isinstance(trainer.controller_opt, torch.optim.AdamW)
    decays = sorted(g["weight_decay"] for g in trainer.controller_opt.param_groups)
    assert decays == [0.0, 1e-2]
    assert all(h.bias is None for h in trainer.controller.heads)
    lrs = []
    for epoch in range(1, 5):
        trainer.state.epoch = epoch
        lrs.append(trainer.controller_lr())
    assert lrs == [1e-3, 1e-3, 1e-3, pytest.approx(1e-4)]  # x0.1 from int(0.98 * 5) = 4
    default = fresh().start_training(10, 0.5)
    assert type(default.controller_opt) is torch.optim.Adam and all(h.bias is not None for h in default.controller.heads)


# ------------------------------------------------------------------------------ 5: the frozen mask
def _kill_and_freeze(trainer, dead: dict[int, list[int]]):
    """Zero the parameters of the ZIGs `dead` names (space index -> positions), then end the window (epoch 4 of 10)."""
    with torch.no_grad():
        trainer.params.zero_(trainer.params.keep_vector(
            {k: torch.tensor([0.0 if i in d else 1.0 for i in range(len(trainer.mask[k]))]) for k, d in dead.items()}) == 0)
    trainer.state.epoch = 4
    trainer.end_epoch(4)
    return trainer


def _over_budget(freeze_mask: str):
    trainer = fresh().start_training(10, 0.3, freeze_mask=freeze_mask)
    first = trainer.ato.zigs.prunable[1]
    trainer.mask[first.index][:2] = 0.0
    return _kill_and_freeze(trainer, {first.index: [3]}), first  # ZIG 3 of that space is dead although kept


def test_freeze_without_bisection_keeps_the_controllers_decision():
    bisect, _ = _over_budget("bisect")
    controller, first = _over_budget("controller")
    dead, _ = _over_budget("dead")
    assert bisect.flops_kept() <= 0.3 < controller.flops_kept()
    assert controller.mask[first.index].tolist()[:4] == [0.0, 0.0, 1.0, 1.0]
    assert dead.mask[first.index].tolist()[:4] == [0.0, 0.0, 1.0, 0.0]  # the dead channel goes, no other
    assert int((controller.mask[first.index] != dead.mask[first.index]).sum()) == 1


def _under_budget(freeze_mask: str):
    """A mask that keeps about a quarter of the FLOPs for a 0.5 target: half the ZIGs of every space dropped, the
    first two dropped ZIGs of each space dead (exactly zero), the rest alive."""
    trainer = fresh().start_training(10, 0.5, freeze_mask=freeze_mask)
    dead = {}
    for s in trainer.ato.zigs.prunable:
        half = s.width // 2
        trainer.mask[s.index][half:] = 0.0
        dead[s.index] = list(range(half, min(half + 2, s.width)))
    return _kill_and_freeze(trainer, dead), dead


def test_fill_keeps_live_dropped_zigs_again_up_to_the_target():
    bisect, _ = _under_budget("bisect")
    fill, dead = _under_budget("fill")
    assert bisect.flops_kept() < fill.flops_kept() <= 0.5  # bisect leaves a mask under the budget as it is
    for k, d in dead.items():
        assert all(fill.mask[k][i] == 0 for i in d), k  # a dead ZIG never comes back
        assert bool((fill.mask[k] >= bisect.mask[k]).all())  # nothing the controller kept is dropped
    logits = fill.controller()
    back = [(k, i) for k, m in fill.mask.items() for i in (m > bisect.mask[k]).nonzero().flatten().tolist()]
    out = [(k, i) for k, m in fill.mask.items() for i in (m == 0).nonzero().flatten().tolist() if i not in dead[k]]
    assert back and out  # the budget is met before every live ZIG is back
    assert min(logits[k][i] for k, i in back) >= max(logits[k][i] for k, i in out)  # best logits first
    k, i = max(out, key=lambda ki: logits[ki[0]][ki[1]])
    trial = {j: v.double() for j, v in fill.mask.items()}
    trial[k] = trial[k].clone().index_fill_(0, torch.tensor([i]), 1.0)
    assert float(fill.flops(trial)) > 0.5 * fill.flops.total  # the next one would not fit


@pytest.mark.parametrize("sampling", ["atofx", "official"])
def test_floor_tops_the_window_mask_up_to_the_budget(data, sampling):
    """A controller that keeps almost nothing: its own mask sinks far under the budget; with window_mask="floor"
    the projecting mask is the same topped up to the target with its best logits (both samplings)."""
    masks = {}
    for how in ("controller", "floor"):
        trainer = fresh().start_training(10, 0.5, sampling=sampling, window_mask=how)
        with torch.no_grad():
            for head in trainer.controller.heads:
                head.bias.sub_(20.0)
        trainer.state.epoch = 2  # inside the window
        trainer.controller_step(next(iter(data[0])))
        trainer.end_epoch(2)
        masks[how] = trainer.mask
        if how == "floor":
            assert 0.45 < trainer.flops_kept() <= 0.5
            logits = {k: v.detach() for k, v in trainer.controller().items()}
    floor, own = masks["floor"], masks["controller"]
    assert fresh().start_training(10, 0.5).flops_kept(own) < 0.2
    assert all(bool((floor[k] >= own[k]).all()) for k in own)  # nothing the controller keeps is dropped
    for k in logits:  # within a space, a kept ZIG's logit is at least every dropped one's
        kept, dropped = logits[k][floor[k] > 0], logits[k][floor[k] == 0]
        if len(dropped) and len(kept):
            assert float(kept.min()) >= float(dropped.max()), k


@pytest.mark.parametrize("shift", [-20.0, 20.0])
def test_budget_window_mask_is_the_controllers_ranking_cut_at_the_budget(data, shift):
    """window_mask="budget": whether the controller keeps almost nothing or everything, the projecting mask keeps
    its live ZIGs of highest logit, across spaces, up to the FLOPs target; a dead ZIG is never kept."""
    trainer = fresh().start_training(10, 0.5, window_mask="budget")
    with torch.no_grad():
        for head in trainer.controller.heads:
            head.bias.add_(shift)
        trainer.params.zero_(trainer.params.keep_vector(  # ZIG 0 of every space is dead
            {k: torch.tensor([0.0] + [1.0] * (len(m) - 1)) for k, m in trainer.mask.items()}) == 0)
    trainer.state.epoch = 2  # inside the window
    trainer.controller_step(next(iter(data[0])))
    assert 0.45 < trainer.flops_kept() <= 0.5
    assert all(float(m[0]) == 0.0 for m in trainer.mask.values())
    logits = {k: torch.sigmoid(v.detach().double() + trainer.config.offset) for k, v in trainer.controller().items()}
    kept = [float(logits[k][i]) for k, m in trainer.mask.items() if k in logits for i in m.nonzero().flatten().tolist()
            if m.sum() > 1]  # a space's last ZIG is kept whatever its logit: a layer of width 0 cannot be built
    dropped = [float(logits[k][i]) for k, m in trainer.mask.items() if k in logits
               for i in (m == 0).nonzero().flatten().tolist() if i > 0]  # the dead ZIG 0 aside
    assert dropped and min(kept) >= max(dropped)


# ------------------------------------------------------------------------------ 6: search space
def test_internal_search_space_gates_block_internal_spaces_only():
    ato = fresh()
    internal = gated_spaces(ato, "internal")
    assert internal and set(internal) < {s.index for s in ato.zigs.prunable}
    for s in ato.zigs.prunable:
        inside = all(n.startswith(("layer1.", "layer2.", "layer3.")) and n.split(".")[:2] == s.producers[0].split(".")[:2]
                     for n in (*s.producers, *s.consumers))
        assert (s.index in internal) == inside, s
    trainer = ato.start_training(10, 0.5, search_space="internal")
    assert trainer.controller.keys == internal
    assert set(trainer.mask) == {s.index for s in ato.zigs.prunable}


def test_internal_search_space_refuses_a_model_without_blocks():
    plain = atofx.compile(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(64, 3)), EXAMPLE)
    with pytest.raises(ConfigError, match="search_space"):
        plain.start_training(4, 0.5, search_space="internal")


# ------------------------------------------------------------------------------ ZIG counts
def test_zig_counts_follow_their_definitions():
    trainer = fresh().start_training(10, 0.5, warmup=0.2)  # projections from epoch 2
    space = trainer.ato.zigs.prunable[1]
    comps = space.components
    trainer.mask[space.index][:3] = 0.0
    trainer.end_epoch(0)  # epoch 1 has no projection: its mask is not remembered
    trainer.mask = {k: v.clone() for k, v in trainer.mask.items()}
    trainer.mask[space.index][:3] = 1.0
    assert trainer.zig_counts()["zigs_revived"] == 0
    trainer.mask[space.index][:3] = 0.0
    trainer.end_epoch(1)  # state.epoch 2 >= warm-up: this mask projects next, its drops are remembered
    with torch.no_grad():
        trainer.params.zero_(trainer.params.keep_vector({space.index: torch.tensor(
            [0.0] + [1.0] * (space.width - 1))}) == 0)  # ZIG 0 dies
    trainer.mask = {k: v.clone() for k, v in trainer.mask.items()}
    trainer.mask[space.index][:3] = 1.0  # the controller keeps all three again
    counts = trainer.zig_counts()
    assert counts == {"zigs_dropped": 0, "zigs_zero": 1, "zigs_revived": 2}, (counts, comps[:3])


def test_official_digits_run_logs_decay_and_ends_exact(data):
    ato = fresh()
    opt = torch.optim.AdamW(ato.model.parameters(), lr=1e-3, weight_decay=0.05)
    history = ato.train(data[0], 6, target_flops=0.5, optimizer=opt, flavour="official", search_space="all",
                        progress=False, **FAST)
    assert all({"zigs_dropped", "zigs_zero", "zigs_revived"} <= set(r) for r in history)
    last = history[-1]
    assert last["zigs_zero"] >= last["zigs_dropped"] > 0
    assert any(r["zigs_zero"] < r["zigs_dropped"] for r in history)  # dropped groups decay, not die at once
    small = ato.prune()  # raises EquivalenceError if the trained model differs from its pruned copy
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in ato.model.parameters())


def test_a_default_digits_run_lets_dropped_groups_decay_and_revive_and_ends_exact():
    """Issue 14: with the default settings dropped groups decay over the window instead of dying at once, some come
    back, and at the end every dropped group is exactly zero and the pruned model equals the trained one."""
    ato = fresh()
    with pytest.warns(atofx.AtofxWarning, match="controller learns the mask"):  # 12 steps: short, on purpose
        history = ato.train(loaders()[0], 8, target_flops=0.5, progress=False, controller_lr=0.01,
                            controller_data=0.25)
    window = [r for r in history if not r["mask_frozen"]]
    counts = [(r["zigs_dropped"], r["zigs_zero"], r["zigs_revived"]) for r in history]
    assert any(r["zigs_zero"] < r["zigs_dropped"] for r in window), counts
    assert any(r["zigs_revived"] > 0 for r in window), counts  # kept again after a mask that projected dropped them
    last = history[-1]
    assert last["zigs_zero"] >= last["zigs_dropped"] > 0
    small = ato.prune()  # raises EquivalenceError if the trained model differs from its pruned copy
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in ato.model.parameters())


def test_an_official_hsp_run_resumes_to_the_uninterrupted_result(data, tmp_path, monkeypatch):
    """The sampled masks, the revival record and the half-space reference point all survive a restart."""
    from atofx.ato import checkpoint as ckpt

    options = {"target_flops": 0.5, "progress": False, "flavour": "official", "search_space": "all",
               "projection": "hsp", "warmup": 0.0, "lam_schedule": "ramp", **FAST}

    def run(folder):
        ato = fresh()
        history = ato.train(loaders()[0], 6, checkpoint_dir=folder, **options)
        return ato, [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    ref, ref_history = run(tmp_path / "ref")
    write = ckpt.write

    def write_then_stop(folder, payload):
        path = write(folder, payload)
        if payload["epoch"] == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(ckpt, "write", write)
    ato, history = run(tmp_path / "cut")
    assert history == ref_history
    assert any(r["zigs_revived"] > 0 or r["zigs_dropped"] > 0 for r in history)
    ref_state, state = ref.model.state_dict(), ato.model.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)


def test_threshold_for_target_picks_the_lowest_cut_that_meets_the_budget():
    """The bisection over the scores returns what trying every threshold in order would: the mask of the lowest
    threshold (0 or a score) whose FLOPs meet the target, each space keeping at least its best ZIG."""
    trainer = fresh().start_training(10, 0.4)
    target = 0.4 * trainer.flops.total

    def keep_above(scores: dict, t: float) -> dict:
        return {k: ((r > t) | (torch.arange(len(r)) == r.argmax())).double() for k, r in scores.items()}

    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        scores = {k: torch.rand(len(trainer.mask[k]), generator=g) for k in trainer.gated}
        got = trainer._threshold_for_target(scores)
        for t in sorted({0.0, *(float(v) for r in scores.values() for v in r)}):  # every threshold in turn
            expected = trainer._full({k: v.float() for k, v in keep_above(scores, t).items()})
            if float(trainer.flops({k: v.double() for k, v in expected.items()})) <= target:
                break
        assert all(torch.equal(got[k], expected[k]) for k in got), seed
        assert float(trainer.flops({k: v.double() for k, v in got.items()})) <= target
