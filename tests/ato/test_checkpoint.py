"""Training checkpoints: atomic writes, fallback on damage, refusal of code, RNG state round trip."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("names", [(ckpt.CHECKPOINT, ckpt.PREVIOUS), (ckpt.CHECKPOINT,), (ckpt.PREVIOUS,)])
def test_read_latest_with_no_readable_file(tmp_path, names):
    for name in names:
        (tmp_path / name).write_bytes(b"garbage")
    saved, note = ckpt.read_latest(tmp_path)
    assert saved is None and note is not None
    assert all(f"{tmp_path / name} is damaged" in note for name in names)
    assert "no checkpoint can be read" in note and "from epoch 1" in note
    assert "resuming" not in note  # nothing is resumed: the run starts afresh


def flip(path: Path, data: bytes) -> None:
    """Invert 64 bytes inside the stored bytes `data` of `path` (torch.save keeps tensors uncompressed)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(data)
    assert at > 0
    raw[at + 64: at + 128] = bytes(b ^ 0xFF for b in raw[at + 64: at + 128])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_whose_tensor_bytes_changed_falls_back_to_the_previous_one(tmp_path):
    weights = {e: torch.arange(1000, dtype=torch.float32) * e for e in (1, 2)}
    for e in (1, 2):
        ckpt.write(tmp_path, payload(e) | {"big": weights[e]})
    latest = tmp_path / ckpt.CHECKPOINT
    flip(latest, weights[2].numpy().tobytes())
    loaded = torch.load(latest, weights_only=True)  # torch itself notices nothing
    assert not torch.equal(loaded["big"], weights[2])
    saved, note = ckpt.read_latest(tmp_path)
    assert saved["epoch"] == 1 and torch.equal(saved["big"], weights[1])
    assert f"{latest} is damaged" in note and "checksum" in note
    assert "resuming from the previous checkpoint" in note and "(epoch 1)" in note


def test_the_checksum_covers_the_numbers_and_a_checkpoint_without_one_loads_unchecked(tmp_path):
    base = payload(2) | {"rng": [{"python": (3, tuple(range(5)), None)}], "lr": 0.1}
    assert ckpt.checksum(base) == ckpt.checksum(base | {"checksum": "ignored"})
    for changed in (base | {"epoch": 3}, base | {"lr": 0.2}, base | {"rng": [{"python": (3, (0, 1, 2, 3, 5), None)}]},
                    base | {"weights": torch.full((3,), 2.5)}):
        assert ckpt.checksum(changed) != ckpt.checksum(base)
    ckpt.write(tmp_path, base)
    assert torch.load(tmp_path / ckpt.CHECKPOINT, weights_only=True)["checksum"] == ckpt.checksum(base)
    assert set(ckpt.read_latest(tmp_path)[0]) == set(base)  # returned as written, without the checksum
    torch.save(payload(3), tmp_path / ckpt.CHECKPOINT)  # as atofx wrote them before checksums
    saved, note = ckpt.read_latest(tmp_path)
    assert saved["epoch"] == 3 and note is None


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


class Blocked:
    """Unpickling this calls os.getcwd (harmless, but from a module torch's weights-only reader blocks)."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("previous", [True, False])
def test_a_refused_checkpoint_says_why_in_one_line_without_torchs_advice(tmp_path, previous):
    if previous:
        ckpt.write(tmp_path, payload(1))
        (tmp_path / ckpt.CHECKPOINT).replace(tmp_path / ckpt.PREVIOUS)
    torch.save({"epoch": 2, "model": Blocked()}, tmp_path / ckpt.CHECKPOINT)
    with pytest.raises(atofx.UnsafeCheckpointError) as err:
        ckpt.read_latest(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message and "PyTorch 2.6" not in message
    assert "getcwd" in message and "refused without running it" in message
    advice = f"Delete it to resume from {ckpt.PREVIOUS}" if previous else f"Delete it (or the folder {tmp_path})"
    assert advice in message
    with pytest.raises(atofx.UnsafeCheckpointError) as err:  # atofx.load gives the same one-line reason
        atofx.load(tmp_path / ckpt.CHECKPOINT)
    assert "getcwd" in str(err.value) and "weights_only" not in str(err.value)


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
    with pytest.raises(atofx.AtofxError, match=r"differs in: batches_per_epoch, epochs\)") as err:
        ckpt.check_compatible({"fingerprint": fp | {"epochs": 4, "batches_per_epoch": 8}}, fp, tmp_path)
    assert "checkpoint_dir" in str(err.value) and "another --out" in str(err.value)  # words for both interfaces
    with pytest.raises(atofx.AtofxError, match=r"differs in: batches_per_epoch, config, epochs, model\)"):
        ckpt.check_compatible({}, fp, tmp_path)


@pytest.mark.parametrize("batches", [7, 4])  # a sharded loader has fewer batches per process
def test_a_checkpoint_of_another_number_of_processes_says_how_to_resume_it(tmp_path, batches):
    fp = {"model": "abc", "config": "{}", "epochs": 3, "batches_per_epoch": 7, "ranks": 1}
    two = {"fingerprint": fp | {"ranks": 2, "batches_per_epoch": batches}}
    with pytest.raises(atofx.ConfigError) as err:
        ckpt.check_compatible(two, fp, tmp_path)
    message = str(err.value)
    assert "written by 2 processes and this run has one process" in message
    assert "torchrun --nproc_per_node 2" in message and "differs in" not in message
    assert "checkpoint_dir" not in message and str(tmp_path) in message
    with pytest.raises(atofx.ConfigError, match=r"written by one process and this run has 2 processes.*without "
                                                r"torchrun"):
        ckpt.check_compatible({"fingerprint": fp}, fp | {"ranks": 2, "batches_per_epoch": batches}, tmp_path)
    with pytest.raises(atofx.ConfigError, match=r"differs in: config, ranks\)"):  # not only the processes differ
        ckpt.check_compatible({"fingerprint": fp | {"ranks": 2, "config": "{x}"}}, fp, tmp_path)
