"""Deploying a pruned model: ONNX export (`atofx export`, `export_onnx`) and torch.compile."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import atofx
from atofx.app import cli
from atofx.core.export import export_onnx
from atofx.errors import AtofxError


def small_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    ato = atofx.compile(model, x)
    return ato.prune(ato.random_mask(keep=0.5, seed=0)), x


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    small, x = small_and_input()
    return atofx.save(small, tmp_path_factory.mktemp("export") / "small.pt"), small, x


def test_atofx_export_writes_an_onnx_file_with_a_dynamic_batch(saved, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    path, small, _ = saved
    assert cli.main(["export", str(path), str(tmp_path / "model.onnx")]) == 0
    assert "outputs match PyTorch" in capsys.readouterr().out
    graph = onnx.load(str(tmp_path / "model.onnx"))
    x5 = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    got = ReferenceEvaluator(graph).run(None, {"input": x5.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(got), small.eval()(x5), atol=1e-5)


def test_export_onnx_of_the_users_classes_returns_the_difference(saved, tmp_path):
    pytest.importorskip("onnxscript")
    _, small, x = saved
    assert export_onnx(small, tmp_path / "m.onnx", x) <= 1e-4


def test_export_onnx_gives_back_the_model_in_the_modes_it_had(saved, tmp_path):
    pytest.importorskip("onnxscript")
    _, small, x = saved
    small.train()
    frozen = next(m for m in small.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a user's frozen BN
    export_onnx(small, tmp_path / "m.onnx", x, check=False)
    assert small.training and not frozen.training
    assert sum(not m.training for m in small.modules()) == 1
    small.eval()


def test_without_the_onnx_packages_the_error_says_what_to_install(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    assert cli.main(["export", str(saved[0]), str(tmp_path / "m.onnx")]) == cli.EXIT_ERROR
    assert "pip install onnx onnxscript" in capsys.readouterr().err


def test_an_onnx_path_in_a_missing_folder_is_refused_before_the_export(saved, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "m.onnx"
    assert cli.main(["export", str(saved[0]), str(target)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert f"the folder {target.parent} does not exist" in err and ".data." not in err and not target.parent.exists()


def test_a_file_without_its_input_shape_asks_for_input_size(tmp_path, capsys):
    small, _ = small_and_input()
    path = atofx.save(nn.Sequential(*small), tmp_path / "bare.pt")  # no example inputs known
    assert cli.main(["export", str(path), str(tmp_path / "m.onnx")]) == cli.EXIT_ERROR
    assert "give --input-size CxHxW" in capsys.readouterr().err


def test_a_missing_model_file_or_a_folder_is_a_one_line_error(saved, tmp_path, capsys):
    """Not FileNotFoundError or IsADirectoryError tracebacks: the argument is named, with what to give."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pruned.pt").write_bytes(saved[0].read_bytes())
    cases = {(str(tmp_path / "nosuch.pt"), "m.onnx"): "MODEL_FILE " + str(tmp_path / "nosuch.pt") + " does not exist",
             (str(tmp_path / "run"), "m.onnx"): f"is a folder: give the model file in it ({tmp_path / 'run' / 'pruned.pt'})",
             (str(saved[0]), str(tmp_path)): f"ONNX_FILE {tmp_path} is a folder"}
    for (model_file, onnx_file), message in cases.items():
        assert cli.main(["export", model_file, str(tmp_path / onnx_file)]) == cli.EXIT_ERROR
        err = capsys.readouterr().err
        assert err.startswith("atofx: error: ") and message in err and err.count("\n") == 1, err


def test_an_input_size_the_model_does_not_take_is_named_before_the_exporter_runs(saved, tmp_path, capfd):
    """3 channels for a 1-channel model: the model's own error and the saved shape, not torch.export's log lines."""
    pytest.importorskip("onnxscript")
    assert cli.main(["export", str(saved[0]), str(tmp_path / "m.onnx"), "--input-size", "1x12x12"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("atofx: error: --input-size 1x12x12 does not fit the model in") and err.count("\n") == 1
    assert "expected input[2, 1, 12, 12] to have 3 channels" in err and "saved with 3x12x12" in err, err
    assert "torch.onnx.export" not in err and not (tmp_path / "m.onnx").exists()


def test_the_exporters_message_is_shown_without_terminal_colour_codes(saved, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")

    def coloured(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export. \x1b[96mThis is step 1/3\x1b[0m of it.\nmore")

    monkeypatch.setattr(torch.onnx, "export", coloured)
    with pytest.raises(AtofxError) as exc:
        export_onnx(saved[1], tmp_path / "m.onnx", saved[2])
    assert str(exc.value) == ("torch.onnx.export failed: Failed to export the model with torch.export. This is step "
                              "1/3 of it.")


def test_the_pruned_model_runs_under_torch_compile(saved):
    """One graph, no breaks (fullgraph); aot_eager checks the capture without minutes of C++ code generation."""
    path, small, x = saved
    for model in (small.eval(), atofx.load(path).eval()):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-6)
