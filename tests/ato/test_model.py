"""The model façade `ATOModel`: compile, mask, prune, save and load, end to end on a small CNN."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import atofx
from atofx.core.analysis import Analysis


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


EXAMPLE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ato() -> atofx.ATOModel:
    return atofx.compile(net(), EXAMPLE)


def test_compile_gives_an_analysis_that_can_train(ato):
    assert isinstance(ato, atofx.ATOModel) and isinstance(ato, Analysis)
    assert ato.analysed and len(ato.zigs.prunable) == 2
    assert [s.width for s in ato.zigs.prunable] == [8, 6]
    assert ato.flops() == pytest.approx(ato.flops_model.total)


def test_apply_mask_then_prune_gives_the_same_outputs_with_fewer_flops(ato):
    mask = ato.random_mask(keep=0.5, seed=3)
    small = ato.prune(mask)
    ato.apply_mask(mask)
    ato.model.eval()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(EXAMPLE), ato.model(EXAMPLE), rtol=1e-5, atol=1e-6)
    assert atofx.count_flops(small, EXAMPLE) < atofx.count_flops(ato.model, EXAMPLE)
    assert ato.flops(mask) < ato.flops()


def test_a_pruned_model_saved_and_loaded_computes_the_same(ato, tmp_path):
    small = ato.prune(ato.random_mask(keep=0.5, seed=4))
    path = atofx.save(small, tmp_path / "small.pt", EXAMPLE)
    loaded = atofx.load(path)
    small.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(EXAMPLE), small(EXAMPLE))
    assert torch.load(path, weights_only=True)["format"] == "atofx.pruned"


def test_an_unanalysed_model_says_how_to_analyse_it():
    ato = atofx.compile(net())
    assert not ato.analysed
    with pytest.raises(atofx.AtofxError, match="example_inputs"):
        ato.random_mask()
    with pytest.raises(atofx.AtofxError, match="analyse the model first"):
        ato.start_training(3, 0.5)


def test_prune_without_a_mask_says_where_one_comes_from(ato):
    with pytest.raises(atofx.AtofxError, match="random_mask"):
        ato.prune()


class _NoisyInTraining(nn.Module):
    """A Python branch on `self.training` that adds an op in train mode, which the graph of eval mode lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        if self.training:
            y = y * 1.1
        return self.head(y)


@pytest.mark.parametrize("train_mode", [True, False], ids=["compiled-in-train-mode", "compiled-in-eval-mode"])
def test_training_a_graph_traced_in_eval_mode_of_a_forward_branching_on_training_warns(train_mode):
    """fx recorded the eval branch (no scaling): ato.train would train that, so it says so."""
    torch.manual_seed(0)
    ato = atofx.compile(_NoisyInTraining().train(train_mode), torch.randn(2, 3, 6, 6))
    assert ato.mode_branches == ("",)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 6, 6), torch.randint(0, 2, (16, 4, 4)))  # per pixel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ato.start_training(epochs=2, target_flops=0.5)  # a custom loop trains the model itself: nothing to say
        assert not [w for w in caught if "compiled in eval mode" in str(w.message)]
        ato.train(torch.utils.data.DataLoader(data, batch_size=8), 1, target_flops=0.5, progress=False)
    said = [w for w in caught if "compiled in eval mode" in str(w.message)]
    assert len(said) == (0 if train_mode else 1)
    assert not said or said[0].filename == __file__  # it points at the user's call
    said = [str(w.message) for w in said]
    assert not said or "_NoisyInTraining.forward branches on self.training" in said[0]
