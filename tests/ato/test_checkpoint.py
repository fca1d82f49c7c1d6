"""Training checkpoints: atomic writes, fallback on damage, refusal of code, RNG state round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.app.cifar_models import CifarResNet
from atofx.ato import checkpoint as ckpt


def payload(epoch: int) -> dict:
    return {"epoch": epoch, "weights": torch.full((3,), float(epoch)), "history": [{"epoch": e} for e in range(epoch)]}


class Evil:
    """Unpickling this calls open(marker, 'w'): a file that runs code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_write_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "run"  # created on first write
    first = ckpt.write(folder, payload(1))
    assert first == folder / ckpt.CHECKPOINT and not (folder / ckpt.PREVIOUS).exists()
    ckpt.write(folder, payload(2))
    latest = torch.load(folder / ckpt.CHECKPOINT, weights_only=True)
    previous = torch.load(folder / ckpt.PREVIOUS, weights_only=True)
    assert latest["epoch"] == 2 and previous["epoch"] == 1
    assert torch.equal(latest["weights"], torch.full((3,), 2.0))
    ckpt.write(folder, payload(3))
    assert torch.load(folder / ckpt.PREVIOUS, weights_only=True)["epoch"] == 2
    assert {p.name for p in folder.iterdir()} == {ckpt.CHECKPOINT, ckpt.PREVIOUS}  # no temporary file left


def test_a_crash_while_writing_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    ckpt.write(tmp_path, payload(1))
    ckpt.write(tmp_path, payload(2))

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.write(tmp_path, payload(3))
    monkeypatch.undo()
    saved, note = ckpt.read_latest(tmp_path)
    assert note is None and saved["epoch"] == 2
    assert torch.load(tmp_path / ckpt.PREVIOUS, weights_only=True)["epoch"] == 1


def test_read_latest_of_an_empty_or_missing_folder(tmp_path):
    assert ckpt.read_latest(tmp_path) == (None, None)
    assert ckpt.read_latest(tmp_path / "missing") == (None, None)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_read_latest_falls_back_on_a_damaged_file(tmp_path, damage):
    ckpt.write(tmp_path, payload(1))
    ckpt.write(tmp_path, payload(2))
    latest = tmp_path / ckpt.CHECKPOINT
    data = latest.read_bytes()
    latest.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10, "empty": b""}[damage])
    saved, note = ckpt.read_latest(tmp_path)
    assert saved is not None and saved["epoch"] == 1
    assert torch.equal(saved["weights"], torch.ones(3))
    assert str(latest) in note and "damaged" in note and "previous checkpoint" in note


def test_read_latest_with_both_files_damaged(tmp_path):
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (tmp_path / name).write_bytes(b"garbage")
    saved, note = ckpt.read_latest(tmp_path)
    assert saved is None and note is not None and "damaged" in note


def test_only_the_previous_file_left(tmp_path):
    ckpt.write(tmp_path, payload(1))
    (tmp_path / ckpt.CHECKPOINT).replace(tmp_path / ckpt.PREVIOUS)
    saved, note = ckpt.read_latest(tmp_path)
    assert saved["epoch"] == 1 and note is None


@pytest.mark.parametrize("where", [ckpt.CHECKPOINT, ckpt.PREVIOUS])
def test_a_checkpoint_that_runs_code_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    if where == ckpt.PREVIOUS:  # a damaged latest file must not lead to loading the evil previous one
        (tmp_path / ckpt.CHECKPOINT).write_bytes(b"garbage")
    else:  # a good previous file must not hide the evil latest one
        torch.save(payload(1), tmp_path / ckpt.PREVIOUS)
    torch.save({"epoch": 2, "model": Evil(marker)}, tmp_path / where)
    with pytest.raises(atofx.UnsafeCheckpointError, match=r"carries code.*refused without running it.*Delete it") as err:
        ckpt.read_latest(tmp_path)
    assert str(tmp_path / where) in str(err.value)
    assert not marker.exists()
    assert isinstance(err.value, atofx.AtofxError)


def test_training_refuses_a_checkpoint_folder_with_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"model": Evil(marker)}, folder / ckpt.CHECKPOINT)
    torch.manual_seed(0)
    ato = atofx.compile(CifarResNet(8, 10, 1), (torch.zeros(1, 1, 8, 8),))
    loader = DataLoader(TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    before = {k: v.clone() for k, v in ato.model.state_dict().items()}
    with pytest.raises(atofx.UnsafeCheckpointError):
        ato.train(loader, 2, target_flops=0.5, checkpoint_dir=folder, progress=False)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in ato.model.state_dict().items())


def draws() -> tuple:
    return (torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist(), np.random.rand(3).tolist(),
            np.random.randn(3).tolist(), random.random(), random.gauss(0, 1), random.randrange(10**9))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")  # as it travels in a checkpoint
    expected = draws()
    assert draws() != expected  # the generators moved on
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected
    ckpt.set_rng_state(state)
    assert draws() == expected


def test_check_compatible(tmp_path):
    fp = {"model": "abc", "config": "{}", "epochs": 3, "batches_per_epoch": 7}
    ckpt.check_compatible({"fingerprint": dict(fp)}, fp, tmp_path)
    with pytest.raises(atofx.AtofxError, match=r"differs in: batches_per_epoch, epochs\)"):
        ckpt.check_compatible({"fingerprint": fp | {"epochs": 4, "batches_per_epoch": 8}}, fp, tmp_path)
    with pytest.raises(atofx.AtofxError, match=r"differs in: batches_per_epoch, config, epochs, model\)"):
        ckpt.check_compatible({}, fp, tmp_path)
