"""A catalogue of bad input: each answered by an AtofxError subclass whose message says what to do.

Also: models with several inputs, dict inputs and tuple or dict outputs compile, prune and train.
Cases already covered by tests/test_trainer.py (train() with bad arguments, an empty map-style loader,
device='cuda' through train(), a checkpoint of another run with the same model class) are not repeated.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from atofx.passes.equivalence import relative_difference, run_eval
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import atofx
from atofx.app import cli
from atofx.app.cifar_models import CifarResNet
from atofx.ato import checkpoint as ckpt
from atofx.ato import loop as loop_module
from atofx.ato.plain_training import train_plain
from atofx.errors import ConfigError, DataError, NoPrunableSpaceError, ShapeError, TraceError

EXAMPLE = (torch.zeros(1, 1, 8, 8),)
QUIET: dict[str, Any] = {"target_flops": 0.5, "progress": False}


def fresh() -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(CifarResNet(8, 10, 1, 1), EXAMPLE)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8, **kw: Any) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kw)


def images(n: int = 16, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def labels(n: int = 16, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- models that cannot be pruned


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


class LinearOnly(nn.Module):
    """Input and output widths are the interface: nothing to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_data_dependent_control_flow_is_a_trace_error() -> None:
    # at the root, keeping the module opaque would leave nothing to analyse: the fix moves the branch out
    with pytest.raises(TraceError, match=r"data-dependent control flow.*move the branch into a submodule.*leaf_modules"
                                         r".*concrete_args"):
        atofx.compile(DataDependent(), torch.randn(1, 3, 8, 8))


def test_no_prunable_space_is_refused_on_train() -> None:
    ato = atofx.compile(LinearOnly(), torch.randn(1, 4))
    assert ato.spaces and not ato.zigs.prunable
    data = loader(torch.randn(8, 4), torch.randint(0, 3, (8,)), batch_size=4)
    with pytest.raises(NoPrunableSpaceError, match=r"no prunable channel space; ato\.report\(\) lists why"):
        ato.train(data, 1, **QUIET)
    assert ato.mask is None


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_target_flops_outside_0_1_is_a_config_error(target: float) -> None:
    with pytest.raises(ConfigError, match=rf"share of FLOPs kept and must be in \(0, 1\], got {target}"):
        fresh().start_training(2, target)


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no CUDA GPU is available; use device='cpu' or 'auto'"):
        fresh().start_training(2, 0.5, device="cuda")
    # the command line says it in one line and in flags, exit status 2, before loading data or training
    status = cli.main(["train", "--device", "cuda", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_ERROR
    assert err == ("atofx: error: --device cuda was asked for but no CUDA GPU is available; use --device cpu or "
                   "--device auto.\n")


# ---------------------------------------------------------------------- loaders


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(images(), labels(), strict=True)


def test_loader_without_a_length_is_a_data_error() -> None:
    ato = fresh()
    before = state(ato.model)
    with pytest.raises(DataError, match=r"no length .*needs a map-style dataset"):
        ato.train(DataLoader(Stream(), batch_size=8), 1, **QUIET)
    assert same_state(before, state(ato.model))


def test_a_list_of_batches_is_a_data_error() -> None:
    batches = [(images(8), labels(8))] * 2
    with pytest.raises(DataError, match=r"loader is a list, not a DataLoader: .*wrap your data in a torch DataLoader"):
        fresh().train(batches, 1, **QUIET)


def test_loader_that_drops_every_batch_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"yielded no batch; check the dataset and batch_size/drop_last"):
        fresh().train(loader(images(4), labels(4), batch_size=8, drop_last=True), 1, **QUIET)


# ---------------------------------------------------------------------- batches that do not fit


@pytest.mark.parametrize("x, y, message", [
    (images(channels=3), labels(), r"batch input 0 is \(8, 3, 8, 8\) float32 but the model was analysed with "
                                   r"\(1, 1, 8, 8\) float32 .*expected input\[8, 3, 8, 8\] to have 1 channels"),
    (images().mul(100).long(), labels(), r"batch input 0 is \(8, 1, 8, 8\) int64 but the model expects float "
                                         r"values like its example \(1, 1, 8, 8\) float32: convert the batch"),
    (images()[:, 0], labels(), r"has shape \(8, 8, 8\) but the model expects 4 dims like its example"),
    (images(), labels().float(), r"labels are \(8,\) float32; cross-entropy on the model's 10 outputs expects "
                                 r"integer class indices of shape \(batch,\) or class probabilities of shape "
                                 r"\(batch, 10\): convert class labels with y\.long\(\)"),
    (images(8), labels().view(8, 2), r"labels are \(8, 2\) int64; cross-entropy on the model's 10 outputs expects "
                                     r"integer class indices of shape \(batch,\)"),
    (images(), labels().clamp(max=9).index_fill(0, torch.tensor([5]), 12),
     r"label 12 is out of range for the model's 10 outputs \(classes 0\.\.9\): .*num_classes"),
    (images(), labels().index_fill(0, torch.tensor([0]), -3), r"label -3 is out of range"),
])
def test_a_batch_that_does_not_fit_is_a_shape_error(x, y, message) -> None:
    ato = fresh()
    before = state(ato.model)
    with pytest.raises(ShapeError, match=message) as err:
        ato.train(loader(x, y), 1, **QUIET)
    assert err.value.__traceback__ is not None and "Traceback" not in str(err.value)
    assert same_state(before, state(ato.model)), "a refused batch must not train the model"


def test_several_model_inputs_must_match_the_example_inputs() -> None:
    ato = atofx.compile(TwoInputs(), two_inputs())
    data = loader(images(channels=3), labels(classes=5))  # one input where the model takes two
    with pytest.raises(ShapeError, match=r"batch inputs \(input 0\) do not match the model's example inputs "
                                         r"\(input 0, input 1\)"):
        ato.train(data, 1, **QUIET)


def test_soft_labels_ignore_index_and_other_resolutions_are_accepted() -> None:
    """What the checks must let through: class probabilities, ignore_index, a resolution the model runs on."""
    y = labels().index_fill(0, torch.tensor([3]), -100)
    fresh().train(loader(images(), y), 1, **QUIET)
    probs = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(2)), dim=1)
    fresh().train(loader(images(), probs), 1, **QUIET)
    fresh().train(loader(images(size=12), labels()), 1, **QUIET)  # analysed at 8x8, pooled to 1x1 anyway
    ignored = labels().index_fill(0, torch.tensor([0]), 12)
    fresh().train(loader(images(), ignored), 1, loss_fn=nn.CrossEntropyLoss(ignore_index=12), **QUIET)


def test_labels_out_of_range_in_the_validation_loader() -> None:
    bad = loader(images(), labels().index_fill(0, torch.tensor([2]), 10))
    with pytest.raises(ShapeError, match=r"label 10 is out of range for the model's 10 outputs"):
        fresh().train(loader(images(), labels()), 1, val_loader=bad, **QUIET)


def test_batches_are_checked_once_an_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The label check syncs with the host: it runs on the first batch of each epoch only."""
    calls = []
    check = loop_module.check_targets
    monkeypatch.setattr(loop_module, "check_targets", lambda *a: calls.append(1) or check(*a))
    fresh().train(loader(images(32), labels(32)), 2, **QUIET)  # 4 batches an epoch, no val loader
    assert len(calls) == 2


# ---------------------------------------------------------------------- example inputs


def test_example_inputs_that_do_not_fit_give_a_short_shape_error(capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(ShapeError) as err:
        atofx.compile(CifarResNet(8, 10, 1, 1), torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "at node 'conv1' (Conv2d)" in message and "(1, 3, 8, 8) float32" in message
    assert "expected input[1, 3, 8, 8] to have 1 channels, but got 3 channels" in message
    assert "Pass example_inputs shaped like one real batch" in message
    assert "ShapeProp" not in message and "meta=" not in message and len(message) < 400
    assert capfd.readouterr().err == "", "no traceback printed on the way"
    with pytest.raises(ShapeError, match=r"at node 'fc' \(Linear\)"):  # fails further in
        atofx.compile(LinearOnly(), torch.randn(1, 5))


# ---------------------------------------------------------------------- a model pruned before


def test_a_pruned_model_compiles_and_prunes_again() -> None:
    ato = fresh()
    mask = ato.random_mask(keep=0.6, seed=0)
    first, again = ato.prune(mask), ato.prune(mask)  # pruning twice: two equal, independent copies
    assert first is not again and same_state(state(first), state(again))
    assert atofx.count_params(first) < atofx.count_params(ato.model)

    second = atofx.compile(first, EXAMPLE)
    assert second.zigs.prunable, "the pruned model still has prunable spaces"
    mask2 = second.random_mask(keep=0.6, seed=1)
    smaller = second.prune(mask2)  # check=True: equal outputs to the masked pruned model
    second.apply_mask(mask2)
    x = images(4)
    assert relative_difference(run_eval(first, (x,)), run_eval(smaller, (x,))) <= 1e-5
    assert atofx.count_params(smaller) < atofx.count_params(first)


def test_a_trained_model_prunes_twice() -> None:
    ato = fresh()
    ato.train(loader(images(32), labels(32)), 2, controller_data=0.5, controller_lr=0.05, controller_epochs=3, **QUIET)
    a, b = ato.prune(), ato.prune()
    assert same_state(state(a), state(b))


# ---------------------------------------------------------------------- a checkpoint folder of another run


def test_a_checkpoint_folder_of_another_model_is_refused(tmp_path) -> None:
    other = atofx.compile(CifarResNet(14, 10, 1, 2), EXAMPLE)
    payload = {"fingerprint": other.start_training(1, 0.4, projection="hsp").fingerprint(2)}
    ckpt.write(tmp_path, payload)
    ato = fresh()
    before = state(ato.model)
    with pytest.raises(atofx.AtofxError, match=r"different run \(differs in: config, model\)\. Use a new "
                                               r"checkpoint_dir, or delete that folder"):
        ato.train(loader(images(), labels()), 1, checkpoint_dir=tmp_path, **QUIET)
    assert same_state(before, state(ato.model))
    assert ckpt.read_latest(tmp_path)[0] == payload, "the refused folder is left alone"


# ---------------------------------------------------------------------- several inputs, dict inputs and outputs


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rgb, self.depth, self.body, self.fc = block(3, 8), block(1, 8), block(8, 16), nn.Linear(16, 5)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.rgb(rgb) + self.depth(depth)).mean((2, 3)))


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rgb, self.depth, self.body, self.fc = block(3, 8), block(1, 8), block(16, 16), nn.Linear(16, 5)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([self.rgb(batch["rgb"]), self.depth(batch["depth"])], dim=1)
        return self.fc(self.body(h).mean((2, 3)))


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.fc, self.aux = block(3, 8), block(8, 16), nn.Linear(16, 5), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        return self.fc(self.body(h).mean((2, 3))), self.aux(h.mean((2, 3)))


class DictOutput(TupleOutput):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = self.stem(x)
        features = self.body(h)
        return {"logits": self.fc(features.mean((2, 3))), "features": features}


def two_inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return images(n, 3), images(n, 1)


MULTI = {
    "two inputs": (TwoInputs, lambda n: two_inputs(n)),
    "dict input": (DictInput, lambda n: ({"rgb": two_inputs(n)[0], "depth": two_inputs(n)[1]},)),
    "tuple output": (TupleOutput, lambda n: (images(n, 3),)),
    "dict output": (DictOutput, lambda n: (images(n, 3),)),
}


@pytest.mark.parametrize("name", MULTI)
def test_multi_input_and_output_models_prune_to_equal_outputs(name: str) -> None:
    cls, example = MULTI[name]
    torch.manual_seed(0)
    ato = atofx.compile(cls(), example(2))
    assert ato.zigs.prunable
    mask = ato.random_mask(keep=0.5, seed=0)
    small = ato.prune(mask)
    ato.apply_mask(mask)
    x = example(4)  # another batch size than the example's
    assert relative_difference(run_eval(ato.model, x), run_eval(small, x)) <= 1e-5
    assert atofx.count_params(small) < atofx.count_params(ato.model)
    out = run_eval(small, x)
    assert type(out) is type(run_eval(ato.model, x))


class DictDataset(torch.utils.data.Dataset):
    """(dict of inputs, label) samples, as a multi-modal dataset yields them."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"rgb": torch.randn(3, 8, 8, generator=g), "depth": torch.randn(1, 8, 8, generator=g)}, torch.tensor(i % 5)


def test_dict_inputs_and_tuple_outputs_train_and_prune() -> None:
    """Analysed from the first (dict) batch; a tuple output's first entry is the logits for accuracy."""
    torch.manual_seed(0)
    dict_model = atofx.compile(DictInput())  # not analysed: the first batch is the example
    data = DataLoader(DictDataset(), batch_size=8)
    history = dict_model.train(data, 2, val_loader=data, controller_data=0.5, **QUIET)
    assert dict_model.example_inputs[0]["rgb"].shape == (1, 3, 8, 8)
    assert 0.0 <= history[-1]["val_accuracy"] <= 100.0
    dict_model.prune()

    torch.manual_seed(0)
    tuple_model = atofx.compile(TupleOutput(), images(1, 3))
    history = tuple_model.train(loader(images(32, 3), labels(32, 5)), 2, controller_data=0.5,
                                loss_fn=lambda out, y: nn.functional.cross_entropy(out[0], y), **QUIET)
    assert 0.0 <= history[-1]["train_accuracy"] <= 100.0
    tuple_model.prune()


# ---------------------------------------------------------------------- progress bars (loop.py, plain_training.py)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws its bars into it."""

    def isatty(self) -> bool:
        return True


@pytest.mark.filterwarnings("ignore::atofx.errors.ScheduleWarning")
@pytest.mark.parametrize("tty", [False, True], ids=["file or pipe", "terminal"])
def test_training_draws_bars_on_a_terminal_only_and_always_prints_the_epoch_lines(monkeypatch, capsys, tty) -> None:
    """Into a file, tqdm's carriage-return updates would bury the epoch lines (5.5 KB for 6 digits epochs)."""
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    fresh().train(loader(images(), labels()), 1, target_flops=0.5, progress=True)
    assert ("epoch 1/1" in err.getvalue()) == tty
    assert "epoch   1  loss" in capsys.readouterr().out


@pytest.mark.parametrize("tty", [False, True], ids=["file or pipe", "terminal"])
def test_the_dense_reference_shows_its_batches_within_each_epoch(monkeypatch, tty) -> None:
    """One bar per epoch over its batches, with the loss: a long dense epoch is not a frozen bar."""
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    train_plain(CifarResNet(8, 10, 1, 1), loader(images(), labels(), batch_size=4), 2, torch.device("cpu"),
                progress=True)
    shown = err.getvalue()
    assert ("dense reference, epoch 2/2" in shown and "0/4 [" in shown and "loss=" in shown) == tty
    assert tty or shown == ""
