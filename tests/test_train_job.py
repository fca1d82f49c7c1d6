"""`atofx train` as a function: one job writes its summary, log, picture and pruned model, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import atofx
import atofx.train_job as train_job
from atofx.checkpoint import read_latest
from atofx.datasets import digits_loaders
from atofx.train_job import TrainJob, summary_table
from atofx.trainer import ATOTrainer, evaluate

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
    strip = ("seconds", "job")
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in summary.items() if k not in strip}
    assert json.loads((out / "summary.json").read_text())["accuracy_pruned"] == summary["accuracy_pruned"]


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(atofx.AtofxError, match=r"unknown dataset 'mnist'; available: digits"):
        train_job.run(TrainJob(dataset="mnist", out=str(tmp_path), progress=False))


@pytest.mark.parametrize("option", [{"round_to": 0}, {"target_flops": 1.5}, {"method": "l1"}])
def test_bad_ato_options_are_refused_before_any_training(tmp_path, monkeypatch, option):
    monkeypatch.setattr(train_job, "train_plain", lambda *a, **k: pytest.fail("trained before checking the options"))
    with pytest.raises(atofx.ConfigError, match=next(iter(option))):
        train_job.run(TrainJob(out=str(tmp_path), progress=False, **option))



def test_atofx_train_on_fashion_mnist_files(tmp_path, capsys):
    """`atofx train --dataset fashion-mnist --data-dir DIR`: a one-channel CIFAR ResNet on the IDX files, unchanged."""
    from atofx import cli
    from tests.test_datasets import write_fashion_mnist

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
