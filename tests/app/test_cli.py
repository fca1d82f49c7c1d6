"""`atofx inspect` on a torchvision model and on a user's `package.module:factory`; one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from atofx.app import cli

USER_MODULE = '''
import torch
from torch import nn


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def with_example():
    return small_cnn(), torch.randn(2, 3, 12, 12)


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A module `atofx_user_models` on sys.path, as a user's own code would be."""
    (tmp_path / "atofx_user_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "atofx_user_models", raising=False)
    return "atofx_user_models"


def test_inspect_torchvision_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inspect", "squeezenet1_1", "--input-size", "3x32x32"]) == 0
    out = capsys.readouterr().out
    assert "squeezenet1_1: input (1, 3, 32, 32)" in out
    assert "features.0" in out and "prunable" in out and "pinned: model input" in out
    written = tmp_path / "squeezenet1_1-zigs.svg"
    if not written.exists():  # no graphviz `dot` on this machine
        written = written.with_suffix(".dot")
    assert written.exists() and f"wrote {written.name}" in out


def test_inspect_user_factory_into_out_dir(user_module, tmp_path, capsys):
    out_dir = tmp_path / "pictures"
    assert cli.main(["inspect", f"{user_module}:small_cnn", "--input-size", "3x16x16", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "input (1, 3, 16, 16)" in out
    assert "2 prunable (24 ZIGs)" in out
    assert list(out_dir.glob("atofx_user_models-small_cnn-zigs.*"))


def test_inspect_factory_returning_its_example(user_module, tmp_path, capsys):
    assert cli.main(["inspect", f"{user_module}:with_example", "--out", str(tmp_path)]) == 0
    assert "input (2, 3, 12, 12)" in capsys.readouterr().out


def test_inspect_without_dot_prints_the_warning(user_module, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("atofx.core.visualize.shutil.which", lambda name: None)
    assert cli.main(["inspect", f"{user_module}:small_cnn", "--input-size", "3x16x16", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "atofx: warning:" in captured.err and "apt-get install graphviz" in captured.err
    assert "-zigs.dot" in captured.out and (tmp_path / "atofx_user_models-small_cnn-zigs.dot").exists()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("resnet81", "did you mean resnet18"),
        ("no_such_package_xyz:make", "cannot import module 'no_such_package_xyz'"),
        ("{mod}:smal_cnn", "did you mean small_cnn"),
        ("{mod}:NOT_CALLABLE", "not a callable"),
        ("{mod}:small_cnn --input-size 1x16x16", "failed on the example inputs"),
    ],
)
def test_errors_are_one_line_exit_2(user_module, tmp_path, capsys, model, message):
    argv = ["inspect", *model.format(mod=user_module).split(), "--out", str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("atofx: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*zigs*"))


def test_bad_input_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["inspect", "resnet18", "--input-size", "3xAx32"])
    assert exc.value.code == 2
    assert "cannot read input size '3xAx32'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["inspect", "resnet18", "--input-size", "3x0x32"])
    assert "input size '3x0x32' has a dimension of 0" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "{inspect,train,report,recipes,export}" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(tmp_path):
    """`python -m atofx` reaches the same main(): an error exits 2 with one line and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "atofx", "inspect", "resnet81"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "did you mean resnet18" in proc.stderr


def test_train_numbers_out_of_range_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "--batch-size", "0", "--out", str(tmp_path), "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("atofx: error: --batch-size must be") and err.count("\n") == 1


def test_a_two_number_input_size_is_answered_with_cxhxw(user_module, tmp_path, capsys):
    assert cli.main(["inspect", f"{user_module}:small_cnn", "--input-size", "16x16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "batch of shape (1, 16, 16)" in err and "CxHxW" in err and "example_inputs" not in err


def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr("atofx.app.train_job.run", interrupted)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "Rerun the same command to resume" in err and str(tmp_path / "run" / "checkpoints") in err


def test_atofx_warnings_print_as_one_line(tmp_path, monkeypatch, capsys):
    import warnings

    import atofx

    def warns_then_fails(job):
        warnings.warn("few controller steps", atofx.AtofxWarning, stacklevel=1)
        raise atofx.AtofxError("stopped")

    monkeypatch.setattr("atofx.app.train_job.run", warns_then_fails)
    assert cli.main(["train", "--out", str(tmp_path)]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.splitlines() == ["atofx: warning: few controller steps", "atofx: error: stopped"]


def test_a_factory_next_to_the_command_imports_without_python_dash_m(tmp_path, monkeypatch, capsys):
    """The `atofx` script does not put the current folder on sys.path as `python -m` does."""
    (tmp_path / "atofx_here_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "atofx_here_models", raising=False)
    assert cli.main(["inspect", "atofx_here_models:small_cnn", "--input-size", "3x16x16", "--no-picture"]) == 0
    assert "2 prunable" in capsys.readouterr().out
    assert not list(tmp_path.glob("*zigs*")), "--no-picture draws nothing"


def test_a_factory_that_needs_arguments_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "atofx_args_models.py").write_text("def make(width, depth=2):\n    raise AssertionError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["inspect", "atofx_args_models:make", "--out", str(tmp_path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "needs arguments" in err and "'width'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["inspect", "atofx_raising_models:broken", "--no-picture"],
                                     ["train", "--model", "atofx_raising_models:broken", "--quiet"]])
def test_a_factory_that_raises_is_named_in_one_line(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "atofx_raising_models.py").write_text("def broken():\n    raise ValueError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "atofx_raising_models", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert cli.main([*command, "--out", str(out)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("atofx: error: atofx_raising_models:broken raised ValueError: boom. ") and err.count("\n") == 1
    assert "atofx_raising_models.broken()" in err and "second line" not in err and not out.exists()


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["report", "--help"], ["train", "--help"],
                                  ["nosuchcommand"],
                                  ["inspect", "resnet18", "--no-such-flag"]])
def test_help_and_argument_errors_import_no_torch(argv):
    """torch takes seconds to import: `atofx --help` and a mistyped flag must not wait for it."""
    code = ("import sys\nfrom atofx.app import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip().splitlines()[-1] == "no torch", proc.stdout + proc.stderr


USER_MODELS_FOR_DIGITS = '''
import torch
from torch import nn


def three_channels():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = 2 * y
        return self.fc(y.mean((2, 3)))
'''


@pytest.mark.parametrize(("factory", "message"), [
    ("three_channels", r"--model \w+:three_channels does not take digits images \(1x8x8\): give a model made"),
    ("Branchy", r"cannot trace .*--model \w+:Branchy must trace with torch.fx"),
])
def test_train_refuses_a_model_that_does_not_fit_before_any_epoch(tmp_path, monkeypatch, capsys, factory, message):
    """The model is traced on a batch shaped like the data's before the dense reference trains, and nothing is
    left on disk; the message speaks in flags (no example_inputs, no leaf_modules=)."""
    (tmp_path / "digits_models.py").write_text(textwrap.dedent(USER_MODELS_FOR_DIGITS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "digits_models", raising=False)
    trained = []
    monkeypatch.setattr("atofx.app.train_job.train_plain", lambda *a, **k: trained.append(a))
    out = tmp_path / "run"
    assert cli.main(["train", "--model", f"digits_models:{factory}", "--out", str(out), "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.count("\n") == 1 and "example_inputs" not in err and "concrete_args" not in err
    assert not trained and not out.exists()


def test_inspect_words_an_untraceable_model_for_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "digits_models.py").write_text(textwrap.dedent(USER_MODELS_FOR_DIGITS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "digits_models", raising=False)
    argv = ["inspect", "digits_models:Branchy", "--input-size", "1x8x8", "--no-picture"]
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "MODEL digits_models:Branchy must trace with torch.fx" in err and "concrete_args" not in err
    assert err.count("\n") == 1


def test_an_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("")
    for argv in (["train", "--out", str(taken), "--quiet"], ["train", "--out", str(taken / "sub"), "--quiet"],
                 ["inspect", "resnet18", "--out", str(taken)]):
        assert cli.main(argv) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith(f"atofx: error: cannot make the folder {taken}") and "give another --out" in err, err
        assert err.count("\n") == 1


def test_an_out_of_range_option_is_named_by_its_flag(tmp_path, capsys):
    for argv, flag in ((["--target-flops", "1.5"], "--target-flops"), (["--round-to", "0"], "--round-to"),
                       (["--controller-data", "2"], "--controller-data")):
        assert cli.main(["train", *argv, "--out", str(tmp_path / "o"), "--quiet"]) == cli.EXIT_ERROR
        assert capsys.readouterr().err.startswith(f"atofx: error: {flag} ")
    assert cli.main(["inspect", "resnet18", "--prune-random", "1.5", "--no-picture"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("atofx: error: --prune-random ") and "ChannelSpace" not in err  # refused before the report


def test_a_misspelled_flag_gets_the_subcommands_usage_and_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--targetflops", "0.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: atofx train" in err and "--targetflops: did you mean --target-flops?" in err
    with pytest.raises(SystemExit):
        cli.main(["inspect", "resnet18", "--zzzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzz" in err and "did you mean" not in err


def test_a_short_schedule_warning_gives_the_command_lines_advice(tmp_path, capsys):
    """The warning `ato.train` raises in Python words (controller_data=..., method='static') reads in flags."""
    assert cli.main(["train", "--epochs", "2", "--no-dense-reference", "--no-picture", "--quiet",
                     "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("atofx: warning:"))
    assert "--epochs" in warning and "--controller-data" in warning and "--method static" in warning
    assert "method='static'" not in warning and "controller_data=" not in warning


def test_a_bad_device_or_seed_is_a_one_line_error_naming_the_flag(tmp_path, capsys):
    """Were torch's RuntimeError (device string: tpu) and scikit-learn's InvalidParameterError (random_state)."""
    for argv, start in ((["--device", "tpu"], "--device must be cpu, cuda, cuda:N"),
                        (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295")):
        assert cli.main(["train", *argv, "--out", str(tmp_path / "o"), "--quiet"]) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith(f"atofx: error: {start}") and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("rank", "shown"), [("0", True), ("1", False)])
def test_atofx_warnings_are_printed_by_the_main_rank_only(monkeypatch, capsys, rank, shown):
    """Under torchrun every rank meets the same warning; one line is enough."""
    from atofx.errors import AtofxWarning

    monkeypatch.setenv("RANK", rank)
    cli._show_warning(AtofxWarning("the same on every rank"), AtofxWarning, "f.py", 1)
    assert ("atofx: warning: the same on every rank" in capsys.readouterr().err) == shown
