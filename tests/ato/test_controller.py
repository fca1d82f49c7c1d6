"""The ATO controller: shapes, binary straight-through masks, fixed embeddings, determinism, init."""

import pytest
import torch
from torch import nn

import atofx
from atofx.ato.controller import Controller

WIDTHS = [64, 128, 5, 256]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_masks_have_one_bit_per_zig_and_are_binary():
    c = Controller(WIDTHS)
    for masks in (c.sample(generator=gen()), c.mask()):
        assert list(masks) == [0, 1, 2, 3]
        assert [m.shape for m in masks.values()] == [torch.Size([w]) for w in WIDTHS]
        for m in masks.values():
            assert ((m == 0) | (m == 1)).all()


def test_keys_name_the_spaces():
    c = Controller([3, 4], keys=[7, 2])
    assert list(c.mask()) == [7, 2]
    assert c.mask()[2].shape == (4,)
    with pytest.raises(atofx.ConfigError):
        Controller([3, 4], keys=[1, 1])
    with pytest.raises(atofx.ConfigError):
        Controller([3, 0])


def test_from_zigs_covers_the_prunable_spaces():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    ato = atofx.compile(model, (torch.randn(1, 3, 16, 16),))
    assert len(ato.zigs.prunable) == 2
    c = Controller.from_zigs(ato.zigs)
    masks = c.mask()
    assert list(masks) == [s.index for s in ato.zigs.prunable]
    assert all(masks[s.index].shape == (s.width,) for s in ato.zigs.prunable)
    # the FLOPs model takes the masks as they are, and all-ones is the full model
    assert torch.isclose(ato.flops_model(masks), torch.tensor(ato.flops_model.total, dtype=torch.float32))


def test_straight_through_gradient_reaches_gru_and_heads_not_embeddings():
    c = Controller(WIDTHS)
    masks = c.sample(generator=gen())
    loss = sum((m * torch.linspace(-1, 1, len(m))).sum() for m in masks.values())
    loss.backward()
    assert not c.embeddings.requires_grad and c.embeddings.grad is None
    assert "embeddings" not in dict(c.named_parameters())
    assert "embeddings" in dict(c.named_buffers())
    for name, p in c.named_parameters():
        assert p.grad is not None, name
    for part in (c.gru, c.heads[0], c.heads[3]):
        assert any(p.grad.abs().sum() > 0 for p in part.parameters())


def test_straight_through_gradient_is_the_soft_gradient():
    c = Controller([6])
    hard = c.sample(hard=True, generator=gen(3))[0]
    soft = c.sample(hard=False, generator=gen(3))[0]
    assert torch.equal(hard, (soft > 0.5).float())
    g_hard = torch.autograd.grad(hard.sum(), c.heads[0].bias)[0]
    g_soft = torch.autograd.grad(soft.sum(), c.heads[0].bias)[0]
    torch.testing.assert_close(g_hard, g_soft)


def test_deterministic_with_seed_and_generator():
    a, b = Controller(WIDTHS, seed=1), Controller(WIDTHS, seed=1)
    assert torch.equal(a.embeddings, b.embeddings)
    for ma, mb in zip(a.sample(generator=gen(5)).values(), b.sample(generator=gen(5)).values(), strict=True):
        assert torch.equal(ma, mb)
    for la, lb in zip(a().values(), b().values(), strict=True):
        assert torch.equal(la, lb)
    assert not torch.equal(Controller(WIDTHS, seed=2).embeddings, a.embeddings)


def test_embeddings_are_orthonormal():
    e = Controller(WIDTHS).embeddings[:, 0]
    torch.testing.assert_close(e @ e.T, torch.eye(len(WIDTHS)))


def test_noise_depends_on_the_generator():
    c = Controller([512])
    assert not torch.equal(c.sample(hard=False, generator=gen(0))[0], c.sample(hard=False, generator=gen(1))[0])


def test_fresh_controller_keeps_nearly_everything():
    c = Controller(WIDTHS)
    bits = torch.cat(list(c.sample(generator=gen()).values()))
    assert bits.mean() > 0.85
    assert torch.cat(list(c.mask().values())).mean() > 0.99
    # without the offset about half the ZIGs would be dropped
    assert torch.cat(list(c.sample(offset=0.0, generator=gen()).values())).mean() < 0.7


def test_mask_is_deterministic_and_detached():
    c = Controller(WIDTHS)
    m1, m2 = c.mask(), c.mask()
    assert all(torch.equal(m1[k], m2[k]) and not m1[k].requires_grad for k in m1)


@pytest.mark.parametrize(("n", "share", "batch", "ranks"), [(1437, 0.5, 64, 1), (1437, 0.5, 32, 2), (1000, 0.05, 16, 4),
                                                            (50, 0.02, 8, 3)])
def test_the_controller_batches_a_pass_are_what_each_rank_loads(n, share, batch, ranks):
    """The schedule warning counts the controller's steps with controller_batches: under torchrun each rank loads a
    shard of D_CN at the per-rank batch size, so the count is the same as one process's, not `ranks` times it."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

    from atofx.ato.controller import controller_batches, controller_subset, subset_size

    data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    size = subset_size(n, share, batch)
    if ranks == 1:
        loaded = len(controller_subset(DataLoader(data, batch_size=batch), share, seed=0))
    else:
        subset = Subset(data, list(range(size)))
        loaded = len(DataLoader(subset, batch_size=batch, sampler=DistributedSampler(subset, ranks, 0, shuffle=False)))
    assert controller_batches(n, share, batch, ranks) == loaded
