"""`atofx train`'s options: the parser is built without torch, and its names match what the app builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from atofx.app.options import CIFAR_MODEL_NAMES, DATASETS

ROOT = Path(__file__).resolve().parents[2]

BUILD_PARSERS = "from atofx.app import cli; cli.build_parser(); cli.build_parser('train')"
TRAIN_HELP = ("import runpy; sys.argv = ['atofx', 'train', '--help']\n"
              "try:\n    runpy.run_module('atofx', run_name='__main__')\nexcept SystemExit:\n    pass")


@pytest.mark.parametrize("code", [BUILD_PARSERS, TRAIN_HELP], ids=["build_parser", "python -m atofx train --help"])
def test_the_train_parser_and_its_help_never_import_torch(code):
    probe = f"import sys\n{code}\nprint('torch imported:', 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_the_parsers_names_are_those_the_app_builds():
    from atofx.app.cifar_models import CIFAR_MODELS

    assert tuple(CIFAR_MODELS) == CIFAR_MODEL_NAMES
    assert "digits" in DATASETS and "folder" in DATASETS


# ------------------------------------------------------------------------- checks in command-line words


def test_a_seed_out_of_numpys_range_names_the_flag():
    """scikit-learn's random_state takes 0..2**32-1: -1 was its InvalidParameterError traceback."""
    from atofx.app.options import TrainJob, validate_job
    from atofx.errors import ConfigError

    for seed in (-1, 2**32, True):
        with pytest.raises(ConfigError, match=r"^--seed must be a whole number from 0 to 4294967295"):
            validate_job(TrainJob(seed=seed))
    validate_job(TrainJob(seed=2**32 - 1))


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CPU", "cuda:"])
def test_a_device_torch_does_not_know_names_the_flag(device):
    from atofx.app.options import TrainJob, validate_job
    from atofx.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--device must be cpu, cuda, cuda:N \(a GPU's number\) or auto"):
        validate_job(TrainJob(device=device))


def test_cuda_without_a_gpu_is_answered_in_flags(monkeypatch):
    """resolve_device says device='cpu' (Python words); the command line says --device cpu."""
    import torch

    from atofx.app.options import TrainJob, validate_job
    from atofx.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=r"use --device cpu or --device auto\.$") as exc:
            validate_job(TrainJob(device=device))
        assert "device=" not in str(exc.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"--device cuda:1: this machine has 1 CUDA GPU\(s\), cuda:0 to cuda:0"):
        validate_job(TrainJob(device="cuda:1"))
    for device in ("cpu", "auto", "cuda", "cuda:0"):
        validate_job(TrainJob(device=device))


def test_a_round_to_no_space_is_wider_than_is_refused():
    """ResNet-20's spaces are 16, 32 and 64 wide: --round-to 1000 (or 64) would change nothing, silently."""
    from atofx.app.options import check_round_to
    from atofx.ato.config import ATOConfig
    from atofx.errors import ConfigError

    widths = [16, 16, 32, 32, 64, 64]
    for round_to in (1000, 64):
        with pytest.raises(ConfigError, match=rf"^--round-to {round_to} has no effect on this model: its widest "
                                              r"prunable channel space has 64 channels"):
            check_round_to(ATOConfig(round_to=round_to), widths)
        with pytest.raises(ConfigError, match=rf"^round_to {round_to} has no effect"):  # the Python API's words
            ATOConfig(round_to=round_to).check_round_to(widths)
    for round_to in (1, 8, 16, 63):
        check_round_to(ATOConfig(round_to=round_to), widths)


@pytest.mark.parametrize(("text", "message"), [
    ("epochs: 6.5", "epochs must be a whole number, got 6.5."),
    ("epochs: true", "epochs must be a whole number, got True."),
    ("epochs:", "epochs must be a whole number, got nothing (leave the key out for its default)."),
    ("num_workers: two", "num_workers must be a whole number, got 'two'."),  # an optional field is checked too
    ("lr: fast", "lr must be a number, got 'fast'."),
    ("head_bias: 1", "head_bias must be true or false, got 1."),
    ("device: 0", "device must be a string, got 0."),
])
def test_a_recipe_value_of_the_wrong_type_is_named_in_words(tmp_path, text, message):
    from atofx.app.options import load_recipe
    from atofx.errors import AtofxError

    (tmp_path / "r.yaml").write_text(text + "\n")
    with pytest.raises(AtofxError) as exc:
        load_recipe(tmp_path / "r.yaml")
    assert str(exc.value).endswith(message), str(exc.value)


def test_a_whole_float_is_taken_for_a_whole_number_field(tmp_path):
    """`epochs: 6.0` (or 1e2 written as 100.0) means 6 epochs; an int for a float field is a float."""
    from atofx.app.options import TrainJob, load_recipe, validate_job

    (tmp_path / "r.yaml").write_text("epochs: 6.0\nbatch_size: 32.0\nlr: 1\ndata_dir: null\nhead_bias: false\n")
    values = load_recipe(tmp_path / "r.yaml")
    assert values == {"epochs": 6, "batch_size": 32, "lr": 1.0, "data_dir": None, "head_bias": False}
    assert type(values["epochs"]) is int and type(values["lr"]) is float
    validate_job(TrainJob(**values))
