"""`atofx train` as a function: one job writes its summary, log, picture and pruned model, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import atofx
import atofx.app.train_job as train_job
from atofx.app.datasets import digits_loaders
from atofx.app.options import TrainJob
from atofx.app.run_summary import summary_table
from atofx.ato.checkpoint import read_latest
from atofx.ato.loop import evaluate
from atofx.ato.trainer import ATOTrainer

EPOCHS = 3
KEYS = {"target_flops", "flops_kept", "flops_before", "flops_after", "params_before", "params_after", "accuracy_dense",
        "accuracy_trained", "accuracy_pruned", "epochs", "seconds"}


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    job = TrainJob(model="resnet20", epochs=EPOCHS, out=str(out), progress=False, dense_reference=True)
    return job, out, train_job.run(job)


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_summary_has_every_key(job_run):
    job, out, summary = job_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) >= KEYS
    assert on_disk["epochs"] == EPOCHS and on_disk["target_flops"] == job.target_flops
    assert on_disk["job"]["model"] == "resnet20" and on_disk["seconds"] > 0
    assert on_disk["flops_kept"] == pytest.approx(on_disk["flops_after"] / on_disk["flops_before"])
    assert 0 < on_disk["flops_after"] <= on_disk["flops_before"]
    assert 0 < on_disk["params_after"] <= on_disk["params_before"]
    for k in ("accuracy_dense", "accuracy_trained", "accuracy_pruned"):
        assert 50.0 < on_disk[k] <= 100.0, f"{k} = {on_disk[k]}: 3 epochs on the digits must learn something"
    # the pruned model is the trained model with the dropped channels removed: no accuracy change at all
    assert on_disk["accuracy_pruned"] == on_disk["accuracy_trained"]
    table = summary_table(on_disk)
    assert "ATO pruned" in table and "resnet20 on digits" in table


def test_outputs_on_disk(job_run):
    job, out, summary = job_run
    records = log_records(out)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    assert all(set(r) >= {"train_loss", "flops_kept", "val_accuracy", "mask_frozen"} for r in records)
    assert records[-1]["val_accuracy"] == pytest.approx(summary["accuracy_trained"])
    pictures = [p for p in out.iterdir() if p.name in ("zigs.svg", "zigs.dot")]
    assert pictures and pictures[0].stat().st_size > 100
    text = pictures[0].read_text()
    assert ("<svg" in text) if pictures[0].suffix == ".svg" else ("digraph" in text)
    saved, note = read_latest(out / "checkpoints")
    assert note is None and saved["epoch"] == EPOCHS


def test_pruned_file_loads_and_scores_the_same(job_run):
    job, out, summary = job_run
    model = atofx.load(out / "pruned.pt")
    assert atofx.count_params(model) == summary["params_after"]
    assert atofx.count_flops(model, (torch.zeros(1, 1, 8, 8),)) == summary["flops_after"]
    _, val = digits_loaders(job.batch_size, job.seed)
    accuracy = evaluate(model, val, torch.device("cpu"), nn.functional.cross_entropy)["accuracy"]
    assert accuracy == pytest.approx(summary["accuracy_pruned"])


def test_rerunning_the_job_resumes_instead_of_retraining(job_run, monkeypatch):
    job, out, summary = job_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished job was trained again")

    monkeypatch.setattr(train_job, "train_plain", no_training)  # the dense reference comes from dense.json
    monkeypatch.setattr(ATOTrainer, "after_optimizer_step", no_training)  # no ATO batch runs
    again = train_job.run(job)
    assert [r["epoch"] for r in log_records(out)] == list(range(1, EPOCHS + 1))
    strip = ("seconds", "seconds_this_invocation", "job")
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in summary.items() if k not in strip}
    assert json.loads((out / "summary.json").read_text())["accuracy_pruned"] == summary["accuracy_pruned"]


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(atofx.AtofxError, match=r"unknown dataset 'mnist'; available: digits"):
        train_job.run(TrainJob(dataset="mnist", out=str(tmp_path), progress=False))


@pytest.mark.parametrize("option", [{"round_to": 0}, {"target_flops": 1.5}, {"method": "l1"}])
def test_bad_ato_options_are_refused_before_any_training(tmp_path, monkeypatch, option):
    monkeypatch.setattr(train_job, "train_plain", lambda *a, **k: pytest.fail("trained before checking the options"))
    flag = "--" + next(iter(option)).replace("_", "-")  # named as the user typed it, not as ATOConfig's keyword
    with pytest.raises(atofx.ConfigError, match=f"^{flag} "):
        train_job.run(TrainJob(out=str(tmp_path), progress=False, **option))



def test_atofx_train_on_fashion_mnist_files(tmp_path, capsys):
    """`atofx train --dataset fashion-mnist --data-dir DIR`: a one-channel CIFAR ResNet on the IDX files, unchanged."""
    from atofx.app import cli
    from tests.app.test_datasets import write_fashion_mnist

    write_fashion_mnist(tmp_path / "fm", train=48, test=16)
    out = tmp_path / "out"
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "fm"), "--epochs", "2",
            "--batch-size", "16", "--num-workers", "0", "--no-dense-reference", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fashion-mnist" and summary["job"]["data_dir"] == str(tmp_path / "fm")
    small = atofx.load(out / "pruned.pt")
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert "resnet20 on fashion-mnist" in capsys.readouterr().out


TINY = """
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
"""


@pytest.fixture
def tiny_job(tmp_path, monkeypatch):
    """A TrainJob factory for a two-layer CNN on the digits (an epoch takes a fraction of a second)."""
    (tmp_path / "atofx_tiny_models.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(**kw) -> TrainJob:
        return TrainJob(**({"model": "atofx_tiny_models:tiny", "out": str(tmp_path / "out"), "progress": False,
                            "batch_size": 256} | kw))

    return make


def counting_dense(monkeypatch) -> list[int]:
    """Replace train_plain by a counter of the epochs asked for (the dense model stays as built)."""
    calls: list[int] = []
    monkeypatch.setattr(train_job, "train_plain", lambda model, loader, epochs, *a, **k: calls.append(epochs))
    return calls


def test_the_dense_reference_is_reused_only_with_the_same_settings(tiny_job, monkeypatch):
    calls = counting_dense(monkeypatch)
    job = tiny_job(epochs=2)
    train_job.run(job)
    with pytest.raises(atofx.ConfigError) as err:  # other settings, same --out: refused before any training
        train_job.run(tiny_job(epochs=3))
    message = str(err.value)
    assert "--epochs 2 -> 3" in message and "another --out" in message and "checkpoints" in message
    with pytest.raises(atofx.ConfigError, match=r"--controller-data unset -> 0\.4\)"):  # not Python's None
        train_job.run(tiny_job(epochs=2, controller_data=0.4))
    train_job.run(tiny_job(epochs=2, controller_data=0.5, step_size="share"))  # the defaults typed: the same run
    assert calls == [2]
    for f in (Path(job.out) / "checkpoints").iterdir():  # as the refusal says
        f.unlink()
    train_job.run(tiny_job(epochs=3))
    assert calls == [2, 3], "the 2-epoch dense accuracy was reused for a 3-epoch run"
    train_job.run(tiny_job(epochs=3, lr=0.05, out=str(Path(job.out).parent / "other")))
    assert calls == [2, 3, 3]


@pytest.mark.parametrize("option, message", [
    ({"batch_size": 0}, r"--batch-size must be a whole number >= 1, got 0"),
    ({"epochs": 0}, r"--epochs must be a whole number >= 1, got 0"),
    ({"num_workers": -1}, r"--num-workers must be"),
    ({"lr": 0.0}, r"--lr must be a positive"),
])
def test_numbers_out_of_range_are_refused_before_the_dense_stage(tiny_job, monkeypatch, option, message):
    calls = counting_dense(monkeypatch)
    with pytest.raises(atofx.ConfigError, match=message):
        train_job.run(tiny_job(**option))
    assert calls == []


def test_an_interrupted_run_keeps_its_dense_stage_and_says_where_it_resumes(tiny_job, monkeypatch, capsys):
    calls = counting_dense(monkeypatch)
    job = tiny_job(epochs=3, progress=True)
    real_end_epoch = ATOTrainer.end_epoch

    def interrupt_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_end_epoch(self, epoch)

    monkeypatch.setattr(ATOTrainer, "end_epoch", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_job.run(job)
    monkeypatch.setattr(ATOTrainer, "end_epoch", real_end_epoch)
    capsys.readouterr()
    summary = train_job.run(job)
    assert calls == [3], "the finished dense stage was trained again"
    assert "resuming from epoch 2 of 3 (epoch 1 is checkpointed in" in capsys.readouterr().out  # not "epochs 1-1"
    first = log_records(Path(job.out))[0]["seconds"]
    assert summary["seconds"] >= summary["seconds_this_invocation"] + first
    assert "in all" in summary_table(summary | {"seconds": summary["seconds_this_invocation"] + 5})


def test_the_last_line_names_the_picture_actually_written(tiny_job, monkeypatch, capsys):
    from atofx.app import cli
    from atofx.core import visualize

    out = Path(tiny_job().out)
    argv = ["train", "--model", "atofx_tiny_models:tiny", "--epochs", "1", "--batch-size", "256", "--quiet",
            "--no-dense-reference", "--out", str(out)]
    monkeypatch.setattr(visualize.shutil, "which", lambda name: None)
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "zigs.dot" in captured.out.splitlines()[-1] and "zigs.svg" not in captured.out
    assert "atofx: warning: graphviz's 'dot' program is not installed" in captured.err
    assert cli.main([*argv, "--no-picture", "--out", str(out.parent / "bare")]) == 0
    assert "zigs" not in capsys.readouterr().out and not list((out.parent / "bare").glob("zigs*"))


def test_ato_trains_on_the_same_batches_whether_the_dense_reference_ran_in_this_process_or_not(tiny_job, tmp_path):
    """The dense epochs draw from the training loader's shuffle: ATO must not start where they left it, or a rerun
    that reads dense.json (or --no-dense-reference) trains another model."""
    with_dense = train_job.run(tiny_job(epochs=2, out=str(tmp_path / "a")))
    without = train_job.run(tiny_job(epochs=2, out=str(tmp_path / "b"), dense_reference=False))
    losses = [[r["train_loss"] for r in log_records(tmp_path / run)] for run in ("a", "b")]
    assert losses[0] == losses[1]
    assert with_dense["accuracy_pruned"] == without["accuracy_pruned"]
    assert with_dense["flops_kept"] == without["flops_kept"]
    assert with_dense["ato"]["controller_data"] == 0.5  # what digits runs with, not ATOConfig's 0.05


def interrupt_in_epoch(monkeypatch, at: int) -> None:
    """Ctrl-C at the end of ATO's epoch index `at` (its checkpoint is not written)."""
    real_end_epoch = ATOTrainer.end_epoch

    def end_epoch(self, epoch):
        if epoch == at:
            raise KeyboardInterrupt
        return real_end_epoch(self, epoch)

    monkeypatch.setattr(ATOTrainer, "end_epoch", end_epoch)


def test_a_run_that_starts_afresh_removes_the_results_of_the_run_before(tiny_job, monkeypatch, capsys):
    """Deleting OUT/checkpoints starts afresh (as the refusal of a changed rerun says): until the new run ends, no
    summary.json or pruned.pt of the old run may pass for its results, in `atofx report` or anywhere."""
    from atofx.app import cli

    counting_dense(monkeypatch)
    out = Path(tiny_job().out)
    train_job.run(tiny_job(epochs=2))
    results = {"summary.json", "pruned.pt", "widths.json", "accuracy_flops.png", "widths.png"}
    assert results <= {p.name for p in out.iterdir()} and list(out.glob("zigs.*"))
    for f in (out / "checkpoints").iterdir():
        f.unlink()
    interrupt_in_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_job.run(tiny_job(epochs=3, picture=False))  # no zigs.svg of its own
    left = {p.name for p in out.iterdir()}
    assert not results & left and not list(out.glob("zigs.*")), left
    assert {"dense.json", "job.json", "checkpoints", "log.jsonl"} <= left  # the new run's, kept to resume
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == cli.EXIT_ERROR
    assert "lacks summary.json, widths.json: not a finished `atofx train` run" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["[1]", "{trunc", "", "high", "null"])
def test_a_damaged_dense_json_is_trained_again(tiny_job, monkeypatch, capsys, damage):
    calls = counting_dense(monkeypatch)
    job = tiny_job(epochs=1)
    train_job.run(job)
    path = Path(job.out) / "dense.json"
    if damage in ("high", "null"):  # the right settings, the wrong type
        path.write_text(json.dumps(json.loads(path.read_text()) | {"accuracy_dense": json.loads(f'"{damage}"')
                                                                    if damage == "high" else None}))
    else:
        path.write_text(damage)
    capsys.readouterr()
    summary = train_job.run(tiny_job(epochs=1, progress=True))
    assert calls == [1, 1]
    assert isinstance(summary["accuracy_dense"], float) and "dense" in summary_table(summary)
    assert f"atofx: {path} is damaged; training the dense reference again" in capsys.readouterr().out
    assert json.loads(path.read_text())["accuracy_dense"] == summary["accuracy_dense"]  # whole again


@pytest.mark.parametrize("record", [None, "{", "[1]"])
def test_a_changed_rerun_without_job_json_is_refused_before_anything_is_written(tiny_job, monkeypatch, record):
    """Without OUT/job.json, the checkpoint's own record of its run decides, before the dense reference trains and
    before dense.json, job.json or the checkpoints change; in flags."""
    calls = counting_dense(monkeypatch)
    job = tiny_job(epochs=2)
    out = Path(job.out)
    train_job.run(job)
    (out / "job.json").unlink()
    if record is not None:
        (out / "job.json").write_text(record)
    before = {p: p.read_bytes() for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.is_file()}
    for changed, said in (({"epochs": 3}, "--epochs 2 -> 3"), ({"target_flops": 0.7}, "--target-flops 0.5 -> 0.7"),
                          ({"batch_size": 128}, "--batch-size")):
        with pytest.raises(atofx.ConfigError) as err:
            train_job.run(tiny_job(**{"epochs": 2, **changed}))
        message = str(err.value)
        assert said in message and "another --out" in message and f"delete {out / 'checkpoints'}" in message
        assert "checkpoint_dir" not in message and "job.json" in message
    assert calls == [2], "the dense reference trained before the refusal"
    assert before == {p: p.read_bytes() for p in before}, "a file changed before the refusal"
    monkeypatch.setattr(ATOTrainer, "after_optimizer_step", lambda *a: pytest.fail("trained again"))
    train_job.run(job)  # the same settings still resume the finished run, and write job.json again
    assert calls == [2] and json.loads((out / "job.json").read_text())["epochs"] == 2


def test_ctrl_c_names_the_dense_reference_only_once_it_is_kept(tiny_job, monkeypatch, capsys):
    from atofx.app import cli

    out = Path(tiny_job().out)
    argv = ["train", "--model", "atofx_tiny_models:tiny", "--epochs", "2", "--batch-size", "256", "--quiet",
            "--no-picture", "--out", str(out)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_job, "train_plain", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "Rerun the same command" in err and "dense.json" not in err and not (out / "dense.json").exists()
    counting_dense(monkeypatch)
    interrupt_in_epoch(monkeypatch, 1)
    assert cli.main(argv) == 130
    assert f"the finished dense reference is kept in {out / 'dense.json'})" in capsys.readouterr().err


def test_a_round_to_wider_than_every_prunable_space_is_refused_before_anything_is_written(tiny_job, monkeypatch):
    calls = counting_dense(monkeypatch)
    job = tiny_job(epochs=2, round_to=8)  # the tiny model's one prunable space has 8 channels
    with pytest.raises(atofx.ConfigError, match=r"--round-to 8 has no effect on this model: .* 8 channels"):
        train_job.run(job)
    assert calls == [] and not Path(job.out).exists()
    train_job.run(tiny_job(epochs=2, round_to=4))
    assert calls == [2]
