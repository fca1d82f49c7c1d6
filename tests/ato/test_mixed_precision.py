"""Mixed precision and channels_last: options checked, and ATO runs under each to an exact pruned model."""

from __future__ import annotations

import pytest
import torch
from atofx.passes.equivalence import relative_difference, run_eval
from torch.utils.data import DataLoader, Subset

import atofx
from atofx.app.cifar_models import CifarResNet
from atofx.app.datasets import digits
from atofx.ato.mixed_precision import StepPrecision
from atofx.errors import ConfigError

EXAMPLE = (torch.zeros(1, 1, 8, 8),)
FAST = {"controller_data": 0.25, "controller_lr": 0.01, "controller_epochs": 3}


@pytest.fixture(scope="module")
def data():
    train, val = digits(0)
    return (DataLoader(Subset(train, range(256)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(Subset(val, range(128)), batch_size=64))


def trained(data, **options) -> tuple[atofx.ATOModel, list[dict]]:
    torch.manual_seed(0)
    ato = atofx.compile(CifarResNet(8, 10, 1, 1), EXAMPLE)
    history = ato.train(data[0], 3, target_flops=0.6, progress=False, **FAST, **options)
    return ato, history


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="'bf16' or 'fp16'"):
        StepPrecision.of("fp8")


def test_only_fp16_gets_a_grad_scaler():
    cpu = torch.device("cpu")
    assert StepPrecision.of("fp16").scaler(cpu) is not None
    assert StepPrecision.of("bf16").scaler(cpu) is None and StepPrecision.of(None).scaler(cpu) is None


def test_channels_last_converts_images_only():
    image, vector = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    out = StepPrecision.of(None, channels_last=True).prepare_inputs((image, vector))
    assert out[0].is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous(
        memory_format=torch.channels_last)
    assert out[1] is vector


@pytest.mark.parametrize("options", [{"amp": "bf16"}, {"amp": "fp16"}, {"channels_last": True}],
                         ids=["bf16", "fp16", "channels_last"])
def test_ato_trains_and_prunes_exactly_under_each_option(data, options):
    ato, history = trained(data, **options)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    x = next(iter(data[1]))[0]
    small = ato.prune()  # check=True: the pruned model equals the trained one
    assert relative_difference(run_eval(ato.model, (x,)), run_eval(small, (x,))) <= 1e-5


def test_bf16_changes_the_arithmetic(data):
    """The option is not ignored: training in bf16 ends with other weights than float32 training."""
    plain, _ = trained(data)
    bf16, _ = trained(data, amp="bf16")
    a, b = plain.model.state_dict(), bf16.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


class _Stopped(Exception):
    pass


def test_an_fp16_run_resumes_with_its_loss_scale(data, tmp_path, monkeypatch):
    scalers: list[torch.amp.GradScaler] = []
    make_scaler = StepPrecision.scaler
    monkeypatch.setattr(StepPrecision, "scaler", lambda self, device: scalers.append(make_scaler(self, device))
                        or scalers[-1])
    write = atofx.ato.trainer.ckpt.write

    def write_then_stop(folder, payload):
        write(folder, payload)
        if payload["epoch"] == 2:
            raise _Stopped

    def run() -> None:
        torch.manual_seed(0)
        ato = atofx.compile(CifarResNet(8, 10, 1, 1), EXAMPLE)
        ato.train(data[0], 3, target_flops=0.6, progress=False, amp="fp16", checkpoint_dir=tmp_path, **FAST)

    monkeypatch.setattr(atofx.ato.trainer.ckpt, "write", write_then_stop)
    with pytest.raises(_Stopped):
        run()
    saved, _ = atofx.ato.trainer.ckpt.read_latest(tmp_path)
    assert saved["grad_scaler"] == scalers[0].state_dict()
    # a scale no fresh scaler starts from (65536, halved at most once a step), then the last epoch's 4 steps
    write(tmp_path, saved | {"grad_scaler": saved["grad_scaler"] | {"scale": 1024.0}})
    monkeypatch.setattr(atofx.ato.trainer.ckpt, "write", write)
    run()
    assert len(scalers) == 2 and scalers[1].get_scale() <= 1024.0
