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
