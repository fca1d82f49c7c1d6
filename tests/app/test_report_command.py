"""`atofx train` on an ImageFolder end to end, `--config` recipes with command-line overrides, `atofx report`."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import atofx
from atofx.app import cli, train_command
from atofx.app.cifar_models import CIFAR_MODELS, resnet20
from atofx.app.model_zoo import torchvision_models
from atofx.app.options import DATASETS, RECIPES, TrainJob, load_recipe
from tests.app.test_datasets import write_image_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), train=6, val=2)


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> tuple[Path, str]:
    """The command of the issue, one epoch: resnet20 on a 3-class folder, no dense reference."""
    out = tmp_path_factory.mktemp("run") / "out"
    buf = io.StringIO()  # capsys is function-scoped: a module fixture captures stdout itself
    with contextlib.redirect_stdout(buf):
        status = cli.main(["train", "--model", "resnet20", "--dataset", "folder", "--data-dir", str(images),
                           "--epochs", "1", "--device", "cpu", "--out", str(out), "--no-dense-reference", "--quiet"])
    assert status == 0
    return out, buf.getvalue()


def test_train_on_a_folder_writes_summary_and_plots(trained):
    out, printed = trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "folder" and summary["model"] == "resnet20" and summary["epochs"] == 1
    assert summary["accuracy_dense"] is None and 0.0 <= summary["accuracy_pruned"] <= 100.0
    # the CIFAR model sees CIFAR resolution (32x32) and gets a 3-class head
    assert summary["flops_before"] == atofx.count_flops(resnet20(num_classes=3), (torch.zeros(1, 3, 32, 32),))
    assert summary["job"]["data_dir"] and summary["job"]["num_workers"] is None
    for name in ("pruned.pt", "log.jsonl", "accuracy_flops.png", "widths.png", "widths.json"):
        assert (out / name).is_file(), name
    layers = json.loads((out / "widths.json").read_text())["layers"]
    assert layers[0] == {"name": "conv1", "type": "Conv2d", "before": 16, "after": layers[0]["after"]}
    assert layers[-1] == {"name": "fc", "type": "Linear", "before": 3, "after": 3}  # 3 classes, never pruned
    assert len(layers) == 22 and all(0 < row["after"] <= row["before"] for row in layers)
    assert "resnet20 on folder, 1 epochs" in printed and "accuracy_flops.png, widths.png" in printed


def test_report_prints_the_table_and_redraws(trained, capsys):
    out, printed = trained
    for png in out.glob("*.png"):
        png.unlink()
    assert cli.main(["report", str(out)]) == 0
    shown = capsys.readouterr().out
    table = printed.split("\nwrote")[0].splitlines()
    assert shown.splitlines()[: len(table)] == table  # the table `atofx train` printed, again
    assert (out / "accuracy_flops.png").stat().st_size > 5000 and (out / "widths.png").stat().st_size > 5000
    assert f"wrote {out / 'accuracy_flops.png'}, {out / 'widths.png'}" in shown


def test_report_names_missing_files(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert cli.main(["report", str(tmp_path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("atofx: error: ") and "lacks log.jsonl, widths.json" in err and err.count("\n") == 1
    assert cli.main(["report", str(tmp_path / "missing")]) == cli.EXIT_ERROR
    assert "does not exist; give the --out folder" in capsys.readouterr().err


def _set(path: Path, key: str, value: object) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))


DAMAGES = {  # file -> what is written there, and the complaint
    "summary-empty": ("summary.json", lambda p: p.write_text(""), "not JSON"),
    "summary-truncated": ("summary.json", lambda p: p.write_text(p.read_text()[:100]), "not JSON"),
    "summary-{}": ("summary.json", lambda p: p.write_text("{}"), "no 'model'"),
    "summary-[]": ("summary.json", lambda p: p.write_text("[]"), "a JSON list where an object belongs"),
    "summary-flops_kept": ("summary.json", lambda p: _set(p, "flops_kept", "x"), "'flops_kept' is \"x\", not a number"),
    "summary-binary": ("summary.json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not"),
    "widths-truncated": ("widths.json", lambda p: p.write_text(p.read_text()[:30]), "not JSON"),
    "widths-{}": ("widths.json", lambda p: p.write_text("{}"), "no list of layers"),
    "log-no-keys": ("log.jsonl", lambda p: p.write_text('{"epoch": 1}\n'), "line 1: no 'train_accuracy'"),
    "log-list": ("log.jsonl", lambda p: p.write_text("[1,2]\n"), "line 1: a JSON list"),
    "log-half-line": ("log.jsonl", lambda p: p.write_text(p.read_text() + '{"epoch": 2, "tr'), "line 2 is not JSON"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_report_names_a_damaged_file_and_what_to_do(trained, tmp_path, capsys, damage):
    out = tmp_path / "rp"
    shutil.copytree(trained[0], out)
    name, write, complaint = DAMAGES[damage]
    write(out / name)
    assert cli.main(["report", str(out)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"atofx: error: {out / name} is damaged (") and err.count("\n") == 1, err
    assert complaint in err and "rerun the same `atofx train` command to rewrite it" in err


def test_report_takes_a_runs_summary_file_and_refuses_other_paths_clearly(trained, tmp_path, capsys):
    out = trained[0]
    assert cli.main(["report", str(out / "summary.json")]) == 0  # the run's folder meant
    assert capsys.readouterr().out.startswith("resnet20 on folder")
    assert cli.main(["report", str(out / "widths.json")]) == cli.EXIT_ERROR
    assert "widths.json is a file: give the run folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == cli.EXIT_ERROR  # an empty folder is no unfinished run
    err = capsys.readouterr().err
    assert "holds no `atofx train` run; give the --out folder of one" in err and "rerun" not in err


def test_config_file_with_an_override(images, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    out = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"model": "resnet20", "dataset": "folder", "data_dir": str(images), "epochs": 1,
                                      "target_flops": 0.7, "num_workers": 0, "batch_size": 8, "out": str(tmp_path / "x"),
                                      "dense_reference": False, "progress": False}))
    assert cli.main(["train", "--config", str(recipe), "--out", str(out), "--target-flops", "0.8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_flops"] == 0.8 and summary["job"]["batch_size"] == 8 and summary["job"]["num_workers"] == 0
    assert not (tmp_path / "x").exists()
    assert "resnet20 on folder, 1 epochs, target 0.80" in capsys.readouterr().out


def job_for(argv: list[str]) -> TrainJob:
    return train_command.train_job_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_flags_given_override_the_file_even_at_their_default(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"epochs": 5, "seed": 3, "dense_reference": True, "progress": True, "lr": 0.05}))
    assert job_for([]) == TrainJob()  # no file, no flags: the digits defaults
    job = job_for(["--config", str(recipe), "--epochs", "30", "--no-dense-reference"])
    assert (job.epochs, job.seed, job.dense_reference, job.progress, job.lr) == (30, 3, False, True, 0.05)
    assert job_for(["--config", str(recipe), "--quiet", "--num-workers", "1", "--download"]).progress is False
    assert job_for(["--dataset", "cifar10", "--download"]).download is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: 3\nlearning_rate: 0.1\n", r"unknown key\(s\) learning_rate; known: model, dataset"),
        ("target_flop: 0.5\n", r"unknown key\(s\) target_flop \(did you mean target_flops\?\)"),
        ("no_dense_reference: true\n", r"no_dense_reference \(the flag --no-dense-reference; as a key: "
                                       r"dense_reference: false\)"),
        ("epochs: three\n", r"epochs must be a (int|whole number), got 'three'"),  # options.py's wording, old or new
        ("- epochs\n", r"must be a mapping"),
        ("epochs: [\n", r"cannot be read"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, capsys, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert cli.main(["train", "--config", str(recipe)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(message, err), err


def test_missing_recipe_and_missing_data_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == cli.EXIT_ERROR
    assert f"does not exist; the recipes shipped with atofx are in {RECIPES}" in capsys.readouterr().err
    assert cli.main(["train", "--config", "cifar10-resnet56-5"]) == cli.EXIT_ERROR
    assert "did you mean 'cifar10-resnet56-65'? The recipes shipped" in capsys.readouterr().err
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == cli.EXIT_ERROR
    assert "does not exist; create it and put train/<class>/ and val/<class>/ image folders in it" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid_jobs(recipe):
    job = TrainJob(**load_recipe(recipe))
    assert job.dataset in DATASETS and job.dataset != "digits"
    assert job.model in CIFAR_MODELS or job.model in torchvision_models()
    assert (job.model in CIFAR_MODELS) == job.dataset.startswith("cifar")
    assert 0.0 < job.target_flops < 1.0 and job.epochs >= 100 and job.device == "auto"
    assert recipe.read_text().startswith("# "), "each recipe says where its numbers come from"


def test_small_datasets_give_the_controller_enough_data():
    from atofx.app.options import controller_share

    digits, cifar, tiny = TrainJob(), TrainJob(dataset="cifar10", batch_size=128), TrainJob(dataset="folder")
    assert controller_share(digits, 1437) == 0.5 and controller_share(cifar, 50_000) == 0.05  # the paper's 5%
    assert controller_share(tiny, 120) == 0.5 and controller_share(tiny, 1_000_000) == 0.05


def test_resolution_and_head_follow_the_model(images):
    from atofx.app import train_job

    for model, size in (("resnet20", 32), ("mobilenetv2_cifar", 32), ("resnet18", 224)):
        job = TrainJob(model=model, dataset="folder", data_dir=str(images), num_workers=0)
        train, val, classes, channels, shape = train_job._data(job)
        assert (classes, channels, shape) == (3, 3, (1, 3, size, size))
        assert next(iter(val))[0].shape[-2:] == (size, size)
        head = train_job._model(job, classes, channels)
        assert [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].out_features == 3
    job = TrainJob(model="resnet18", dataset="folder", data_dir=str(images), image_size=64, num_workers=0)
    assert train_job._data(job)[4] == (1, 3, 64, 64)
    with pytest.raises(atofx.AtofxError, match=r"unknown model 'resnet18_cifr': did you mean resnet18_cifar"):
        train_job._model(TrainJob(model="resnet18_cifr"), 3, 3)
    with pytest.raises(atofx.AtofxError, match=r"takes 3-channel images but digits has 1"):
        train_job._model(TrainJob(model="resnet18"), 10, 1)


@pytest.mark.parametrize("given", ["cifar10-resnet56-55", "cifar10-resnet56-55.yaml", "recipes/cifar10-resnet56-55.yaml"])
def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch, given):
    """What `atofx recipes` prints (`--config <recipe>`) works outside the repository too."""
    monkeypatch.chdir(tmp_path)
    assert load_recipe(given) == load_recipe(RECIPES / "cifar10-resnet56-55.yaml")
