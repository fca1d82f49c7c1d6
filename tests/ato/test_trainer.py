"""ATO training: exact equivalence after train(), projections, resume, checkpoints, custom loops, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from atofx.passes.equivalence import relative_difference
from torch import nn
from torch.utils.data import DataLoader, Subset

import atofx
from atofx.app.cifar_models import CifarResNet
from atofx.app.datasets import digits
from atofx.ato import checkpoint as ckpt
from atofx.ato.loop import evaluate
from atofx.ato.trainer import ATOTrainer
from atofx.core.mask import rounded_count

EPOCHS = 5
# a small, fast controller schedule that really drops channels in a few epochs
FAST = {"controller_data": 0.25, "controller_lr": 0.01, "controller_epochs": 3}
EXAMPLE = (torch.zeros(1, 1, 8, 8),)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data():
    return digits(0)


def loaders(data, n_train: int = 512) -> tuple[DataLoader, DataLoader]:
    """Fresh loaders built the same way each time, as a rerun of a script would build them."""
    train, val = data
    return (DataLoader(Subset(train, range(n_train)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(Subset(val, range(128)), batch_size=64))


def fresh(width: int = 1, depth: int = 8) -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(CifarResNet(depth, 10, 1, width), EXAMPLE)


def run(data, checkpoint_dir=None, epochs: int = EPOCHS, ato: atofx.ATOModel | None = None, **kw):
    ato = ato or fresh()
    train, val = loaders(data)
    options = {"target_flops": 0.5, "progress": False, **FAST} | kw
    history = ato.train(train, epochs, val_loader=val, checkpoint_dir=checkpoint_dir, **options)
    return ato, history


def strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def same_state(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa, sb = (m.state_dict() if isinstance(m, nn.Module) else m for m in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def same_mask(a: atofx.Mask, b: atofx.Mask) -> bool:
    return a.bits.keys() == b.bits.keys() and all(torch.equal(a.bits[k], b.bits[k]) for k in a.bits)


def dropped_out_slices(ato: atofx.ATOModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dropped, kept) parameter entries of every 'out' slice of a prunable space."""
    zigs = ato.zigs
    keep = ato.mask.component_keep(zigs)
    tensors = dict(ato.model.named_parameters()) | dict(ato.model.named_buffers())
    dropped, kept = [], []
    for s in zigs.slices:
        if s.role != "out" or s.name not in ("weight", "bias"):
            continue
        t = tensors[f"{s.module}.{s.name}" if s.module else s.name].detach()
        k = torch.as_tensor(keep[zigs.labels[s.ids]])
        dropped.append(t.index_select(s.dim, torch.as_tensor(np.flatnonzero(~k.numpy()), dtype=torch.long)))
        kept.append(t.index_select(s.dim, torch.as_tensor(np.flatnonzero(k.numpy()), dtype=torch.long)))
    return dropped, kept


class Stop(Exception):
    """Stands in for a crash or a pre-empted job."""


def interrupt_after(monkeypatch, epoch: int) -> None:
    """Make the run stop right after the checkpoint of `epoch` (1-based) is on disk."""
    write = ckpt.write

    def write_then_stop(folder, payload):
        path = write(folder, payload)
        if payload["epoch"] == epoch:
            raise Stop
        return path

    monkeypatch.setattr(ckpt, "write", write_then_stop)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run with checkpoints: (ato, history, checkpoint folder)."""
    folder = tmp_path_factory.mktemp("reference")
    ato, history = run(data, folder)
    return ato, history, folder


# ---------------------------------------------------------------------- (a), (b): the trained model


def test_trained_model_equals_its_pruned_version(data, reference):
    ato, history, _ = reference
    assert isinstance(ato.mask, atofx.Mask)
    assert ato.mask.kept_fraction() < 1.0, "the run must drop channels for this test to mean anything"
    small = ato.prune()
    assert atofx.count_params(small) < atofx.count_params(ato.model)
    _, val = loaders(data)
    ato.model.eval()
    small.eval()
    with torch.no_grad():
        for x, _ in val:
            assert relative_difference(ato.model(x), small(x)) <= 1e-5
    dev = torch.device("cpu")
    loss = nn.functional.cross_entropy
    assert evaluate(small, val, dev, loss)["accuracy"] == evaluate(ato.model, val, dev, loss)["accuracy"]
    assert len(history) == EPOCHS and [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["val_accuracy"] > 50.0, "training must learn the digits"
    # the FLOPs the log reports are the FLOPs of the final mask
    assert history[-1]["flops_kept"] == pytest.approx(ato.flops(ato.mask) / ato.flops())
    assert history[-1]["mask_frozen"] and history[-1]["mask_bits_changed"] == 0


def test_dropped_zig_parameters_are_exactly_zero(reference):
    ato, _, _ = reference
    dropped, kept = dropped_out_slices(ato)
    assert sum(t.numel() for t in dropped) > 0
    assert all(torch.count_nonzero(t) == 0 for t in dropped)
    assert sum(int(torch.count_nonzero(t)) for t in kept) > 0.9 * sum(t.numel() for t in kept)


def test_half_space_projection_also_ends_exact(data):
    ato, _ = run(data, epochs=4, projection="hsp")
    dropped, _ = dropped_out_slices(ato)
    assert sum(t.numel() for t in dropped) > 0
    assert all(torch.count_nonzero(t) == 0 for t in dropped)
    ato.prune()  # check=True: raises EquivalenceError if the trained model differs from the pruned one


# ---------------------------------------------------------------------- (c), (e): resume


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resume_equals_an_uninterrupted_run(data, reference, tmp_path, monkeypatch, stop_after):
    ref, ref_history, _ = reference
    with monkeypatch.context() as m:
        interrupt_after(m, stop_after)
        with pytest.raises(Stop):
            run(data, tmp_path)
    saved, note = ckpt.read_latest(tmp_path)
    assert note is None and saved["epoch"] == stop_after
    ato, history = run(data, tmp_path)  # the same call again, as after a restart
    assert strip(history) == strip(ref_history)
    assert [r["seconds"] for r in history[:stop_after]] == [r["seconds"] for r in saved["history"]]
    assert same_mask(ato.mask, ref.mask)
    assert same_state(ato.model, ref.model)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS + 1))


def test_finished_run_is_not_retrained(data, reference):
    ref, ref_history, folder = reference
    ato = fresh()
    before = {k: v.clone() for k, v in ato.model.state_dict().items()}
    history = run(data, folder, ato=ato)[1]
    assert history == ref_history  # every record read back, "seconds" included
    assert same_state(ato.model, ref.model) and not same_state(ato.model, before)
    assert same_mask(ato.mask, ref.mask)


def damage(latest: Path, how: str) -> None:
    """Cut `latest` in half, or invert 64 bytes of its largest weight tensor (a file that torch.load accepts)."""
    raw = bytearray(latest.read_bytes())
    if how == "truncate":
        latest.write_bytes(bytes(raw[: len(raw) // 2]))
        return
    before = torch.load(latest, weights_only=True)["model"]
    at = raw.find(max(before.values(), key=lambda t: t.numel()).numpy().tobytes()[:256])
    assert at > 0
    raw[at: at + 64] = bytes(b ^ 0xFF for b in raw[at: at + 64])
    latest.write_bytes(bytes(raw))
    after = torch.load(latest, weights_only=True)["model"]  # loads without a word: only the checksum tells
    assert not same_state(before, after)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(data, reference, tmp_path, monkeypatch, capsys, how):
    ref, ref_history, _ = reference
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(Stop):
            run(data, tmp_path)
    latest = tmp_path / ckpt.CHECKPOINT
    assert (tmp_path / ckpt.PREVIOUS).exists()
    damage(latest, how)
    saved, note = ckpt.read_latest(tmp_path)
    assert saved["epoch"] == 2 and "damaged" in note
    capsys.readouterr()
    ato, history = run(data, tmp_path)
    assert "damaged" in capsys.readouterr().out
    assert strip(history) == strip(ref_history)
    assert same_mask(ato.mask, ref.mask) and same_state(ato.model, ref.model)
    assert ckpt.read_latest(tmp_path)[0]["epoch"] == EPOCHS
    assert logged_epochs(tmp_path / "log.jsonl") == list(range(1, EPOCHS + 1))


def logged_epochs(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def test_a_run_that_resumes_no_checkpoint_starts_its_log_afresh(data, tmp_path, capsys):
    run(data, tmp_path, epochs=2)
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (tmp_path / name).write_bytes(b"garbage")
    capsys.readouterr()
    run(data, tmp_path, epochs=2)
    assert "no checkpoint can be read, so training starts afresh from epoch 1" in capsys.readouterr().out
    assert logged_epochs(tmp_path / "log.jsonl") == [1, 2]  # not the first run's lines and then these
    log = tmp_path / "plain" / "log.jsonl"  # a log without checkpoints: every run is a fresh start
    for _ in range(2):
        run(data, None, epochs=1, log_path=log)
    assert logged_epochs(log) == [1]


def test_fingerprint_is_the_same_in_a_new_process():
    """A resumed run is usually a new process: the checkpoint fingerprint must not depend on hash seeds."""
    ato = fresh()
    trainer = ato.start_training(3, 0.5)
    here = trainer.fingerprint(8)
    code = (
        "import json, torch, atofx\n"
        "from atofx.app.cifar_models import CifarResNet\n"
        "torch.set_num_threads(1)\n"
        "ato = atofx.compile(CifarResNet(8, 10, 1), (torch.zeros(1, 1, 8, 8),))\n"
        "print(json.dumps(ato.start_training(3, 0.5).fingerprint(8)))\n"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}  # another hash seed than this process
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(here))


def test_a_space_the_controller_empties_keeps_one_channel(data):
    """An aggressive controller drops whole spaces (its own mask: no floor at the budget); the run must still end in
    a model that can be pruned."""
    ato, history = run(data, epochs=4, controller_lr=0.1, controller_epochs=2, window_mask="controller")
    assert history[-1]["flops_kept"] < 0.1
    assert all(int(b.sum()) >= 1 for b in ato.mask.bits.values())
    ato.mask.validate(ato.zigs)
    small = ato.prune()
    assert atofx.count_flops(small, EXAMPLE) < 0.1 * atofx.count_flops(ato.model, EXAMPLE)


def test_current_mask_keeps_the_largest_logit_of_an_emptied_space():
    ato = fresh()
    trainer = ato.start_training(4, 0.5)
    key = ato.zigs.prunable[1].index
    head = trainer.controller.heads[1]
    with torch.no_grad():
        head.bias.fill_(-100.0)
    logits = trainer.controller()[key]
    mask = trainer.current_mask()
    assert int(mask[key].sum()) == 1 and mask[key][logits.argmax()] == 1
    assert all(bool((m == 1).all()) for k, m in mask.items() if k != key)


def test_frozen_mask_meets_the_target_by_raising_the_logit_threshold():
    """A controller whose noiseless mask keeps too much at the window's end is cut to the budget: one threshold
    over its logits, so no dropped ZIG outscores a kept one (bar the best ZIG every space keeps)."""
    ato = fresh()
    trainer = ato.start_training(4, 0.5)
    assert trainer.flops_kept() == 1.0  # a fresh controller keeps every ZIG
    info = trainer.end_epoch(trainer.phases.end - 1)
    assert trainer.state.frozen and 0.45 <= info["flops_kept"] <= 0.5
    logits = trainer.controller()
    kept, dropped = [], []
    for k, m in trainer.mask.items():
        scores = logits[k].clone()
        scores[scores.argmax()] = float("nan")
        kept += scores[(m == 1) & ~scores.isnan()].tolist()
        dropped += scores[m == 0].tolist()
    assert dropped and max(dropped) < min(kept)


@pytest.mark.parametrize("method", ["ato", "static"])
def test_round_to_keeps_multiples_per_space_within_the_target(method):
    ato = fresh(width=2)  # spaces of 32, 64 and 128 channels
    trainer = ato.start_training(4, 0.5, round_to=16, method=method)
    trainer.end_epoch(trainer.phases.start if method == "static" else trainer.phases.end - 1)
    widths = {s.index: s.width for s in ato.zigs.prunable}
    counts = {k: int(m.sum()) for k, m in trainer.mask.items()}
    assert all(n % 16 == 0 or n == widths[k] for k, n in counts.items())
    assert any(n < widths[k] for k, n in counts.items())
    assert trainer.flops_kept() <= 0.5


@pytest.mark.parametrize(("n", "width", "multiple", "expected"), [
    (1, 64, 16, 16), (23, 64, 16, 16), (24, 64, 16, 16), (25, 64, 16, 32), (60, 64, 16, 64), (70, 72, 16, 72),
    (66, 72, 16, 64), (5, 12, 16, 5), (5, 64, 1, 5)])
def test_rounded_count(n, width, multiple, expected):
    assert rounded_count(n, width, multiple) == expected


def test_a_frozen_mask_within_the_target_is_left_alone(data):
    """The freeze's bisection only acts above the budget (the controller's own mask here: no floor under it)."""
    ato, history = run(data, epochs=4, controller_lr=0.1, controller_epochs=2, window_mask="controller")
    trainer = ato._trainer
    assert history[-1]["flops_kept"] < 0.5
    assert all(torch.equal(trainer.mask[k], m) for k, m in trainer.current_mask().items())


# ---------------------------------------------------------------------- (d): a folder of another run


def test_checkpoint_of_another_run_is_refused(data, tmp_path):
    run(data, tmp_path, epochs=1)
    with pytest.raises(atofx.AtofxError, match=r"different run \(differs in: config\).*new checkpoint_dir"):
        run(data, tmp_path, epochs=1, target_flops=0.4)
    with pytest.raises(atofx.AtofxError, match=r"differs in: model\b"):
        run(data, tmp_path, epochs=1, ato=fresh(width=2))
    with pytest.raises(atofx.AtofxError, match=r"differs in: epochs\b"):
        run(data, tmp_path, epochs=2)
    with pytest.raises(atofx.AtofxError, match=r"batches_per_epoch"):
        ato = fresh()
        train, _ = loaders(data, n_train=256)
        ato.train(train, 1, target_flops=0.5, checkpoint_dir=tmp_path, progress=False, **FAST)
    assert ckpt.read_latest(tmp_path)[0]["epoch"] == 1, "a refused run must leave the checkpoint alone"


# ---------------------------------------------------------------------- (f): NaN loss


def test_nan_loss_stops_with_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    poisoned = {"on": False}
    end_epoch = ATOTrainer.end_epoch

    def end_epoch_then_poison(self, epoch):
        info = end_epoch(self, epoch)
        poisoned["on"] = epoch == 1  # from the third epoch on, the loss is NaN
        return info

    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        return loss * math.nan if poisoned["on"] else loss

    monkeypatch.setattr(ATOTrainer, "end_epoch", end_epoch_then_poison)
    path = tmp_path / ckpt.CHECKPOINT
    with pytest.raises(atofx.AtofxError, match=r"loss became nan in epoch 3") as err:
        run(data, tmp_path, epochs=4, loss_fn=loss_fn)
    message = str(err.value)
    assert str(path) in message and "(epoch 2)" in message and "learning rate" in message
    saved, note = ckpt.read_latest(tmp_path)
    assert note is None and saved["epoch"] == 2 and len(saved["history"]) == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert all(math.isfinite(r["train_loss"]) for r in saved["history"])
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == 2


def test_nan_loss_without_checkpoints_names_the_epoch(data):
    def loss_fn(out, y):
        return nn.functional.cross_entropy(out, y) * math.nan

    with pytest.raises(atofx.AtofxError, match=r"loss became nan in epoch 1; training stopped\. Lower"):
        run(data, epochs=2, loss_fn=loss_fn)


# ---------------------------------------------------------------------- (g): static baseline


@pytest.mark.parametrize("epochs", [4, 6])
def test_static_mask_is_picked_once_and_meets_the_target(data, monkeypatch, epochs):
    masks = []
    end_epoch = ATOTrainer.end_epoch

    def recording(self, epoch):
        info = end_epoch(self, epoch)
        masks.append({k: v.clone() for k, v in self.mask.items()})
        return info

    monkeypatch.setattr(ATOTrainer, "end_epoch", recording)
    ato, history = run(data, epochs=epochs, method="static")
    phases = ato._trainer.phases
    pick = max(phases.start, 1)  # the first epoch end at or after the window start
    assert len(masks) == epochs
    assert all(bool((v == 1).all()) for m in masks[: pick - 1] for v in m.values())
    picked = masks[pick - 1]
    assert any(bool((v == 0).any()) for v in picked.values())
    for m in masks[pick:]:
        assert all(torch.equal(m[k], picked[k]) for k in picked)
    assert [r["mask_bits_changed"] > 0 for r in history] == [e == pick for e in range(1, epochs + 1)]
    assert all(r["controller_loss"] is None for r in history)
    kept = ato.flops(ato.mask) / ato.flops()
    assert 0.4 <= kept <= 0.5
    assert all(torch.count_nonzero(t) == 0 for t in dropped_out_slices(ato)[0])
    ato.prune()


# ---------------------------------------------------------------------- (h), (j): custom loops


def test_custom_loop_hooks(data):
    ato = fresh()
    model = ato.model
    train, val = loaders(data)
    cn = DataLoader(Subset(data[0], range(128)), batch_size=64)
    epochs = 4
    ato.start_training(epochs, 0.5, controller_lr=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    infos, steps = [], []
    for e in range(epochs):
        model.train()
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ato.after_optimizer_step(opt)
        for _ in range(3):
            steps.append([ato.controller_step(b) for b in cn])
        infos.append(ato.end_epoch(e))
        assert isinstance(ato.mask, atofx.Mask)
    # window: epochs 0 and 1 of 4 (0.1 and 0.5 of the epochs); a no-op outside it
    in_window = [all(s and set(s) == {"controller_loss", "sampled_flops_kept"} for s in group) for group in steps]
    assert in_window == [True] * 6 + [False] * 6
    assert all(s == {} for group in steps[6:] for s in group)
    assert [i["frozen"] for i in infos] == [False, True, True, True]
    assert all(set(i) == {"frozen", "flops_kept", "zigs_dropped", "zigs_zero", "zigs_revived"} for i in infos)
    assert infos[-1]["flops_kept"] == pytest.approx(ato.flops(ato.mask) / ato.flops())
    assert ato.mask.kept_fraction() < 1.0
    assert all(torch.count_nonzero(t) == 0 for t in dropped_out_slices(ato)[0])
    small = ato.prune().eval()
    model.eval()
    with torch.no_grad():
        for x, _ in val:
            assert relative_difference(model(x), small(x)) <= 1e-5


def test_hooks_need_a_run():
    ato = fresh()
    with pytest.raises(atofx.AtofxError, match=r"start_training"):
        ato.after_optimizer_step(torch.optim.SGD(ato.model.parameters(), lr=0.1))
    with pytest.raises(atofx.AtofxError, match=r"start_training"):
        ato.end_epoch(0)


def test_controller_step_changes_the_controller_only(data):
    ato = fresh()
    trainer = ato.start_training(4, 0.5, controller_lr=0.01)
    model = ato.model
    model.train()
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and BN statistics
    ctrl_before = {k: v.clone() for k, v in trainer.controller.state_dict().items()}
    batch = next(iter(loaders(data)[0]))
    info = ato.controller_step(batch)
    assert info and math.isfinite(info["controller_loss"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training and trainer.gm.training
    ctrl_after = trainer.controller.state_dict()
    assert any(not torch.equal(ctrl_before[k], ctrl_after[k]) for k in ctrl_before)
    # the embeddings are fixed, the GRU and heads learn
    assert all(not p.requires_grad or p.grad is not None for p in trainer.controller.parameters())
    # the mask nodes are back to the identity
    assert all(m.scale is None for m in trainer.slots.masks)


# ---------------------------------------------------------------------- (i): bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"target_flops": 0.0}, r"target_flops .* must be in \(0, 1\], got 0\.0"),
    ({"target_flops": 1.5}, r"target_flops .* must be in \(0, 1\], got 1\.5"),
    ({"target_flops": -0.2}, r"target_flops"),
    ({"method": "oto"}, r"method must be 'ato' or 'static', got 'oto'"),
    ({"projection": "l1"}, r"projection must be 'prox' or 'hsp', got 'l1'"),
    ({"controller_window": (0.6, 0.5)}, r"controller_window must satisfy"),
    ({"controller_data": 0.0}, r"controller_data must be in \(0, 1\]"),
    ({"epochs": 0}, r"epochs must be at least 1, got 0"),
])
def test_bad_arguments_are_refused(data, kwargs, message):
    ato = fresh()
    before = {k: v.clone() for k, v in ato.model.state_dict().items()}
    train, _ = loaders(data)
    options = {"target_flops": 0.5, "epochs": 2} | kwargs
    with pytest.raises(atofx.AtofxError, match=message):
        ato.train(train, progress=False, **options)
    assert same_state(ato.model, before)
    assert ato.mask is None


def test_empty_loader_is_refused(data):
    empty = DataLoader(Subset(data[0], []), batch_size=64)
    with pytest.raises(atofx.AtofxError, match=r"training loader yielded no batch"):
        fresh().train(empty, 2, target_flops=0.5, progress=False)
    ato = atofx.compile(CifarResNet(8, 10, 1))  # not analysed: the first batch would be the example
    with pytest.raises(atofx.AtofxError, match=r"training loader yielded no batch"):
        ato.train(empty, 2, target_flops=0.5, progress=False)


def test_empty_validation_loader_is_refused(data):
    train, _ = loaders(data, n_train=64)
    empty = DataLoader(Subset(data[1], []), batch_size=64)
    with pytest.raises(atofx.AtofxError, match=r"validation loader yielded no batch"):
        fresh().train(train, 1, target_flops=0.5, val_loader=empty, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(data):
    train, _ = loaders(data)
    with pytest.raises(atofx.AtofxError, match=r"no CUDA GPU is available; use device='cpu' or 'auto'"):
        fresh().train(train, 2, target_flops=0.5, device="cuda", progress=False)


def test_training_analyses_an_uncompiled_model_from_its_first_batch(data):
    torch.manual_seed(0)
    ato = atofx.compile(CifarResNet(8, 10, 1))
    train, _ = loaders(data, n_train=128)
    ato.train(train, 1, target_flops=0.5, progress=False, **FAST)
    assert ato.example_inputs[0].shape == (1, 1, 8, 8)
    assert isinstance(ato.mask, atofx.Mask)


@pytest.mark.parametrize(("n", "share", "size"), [(1437, 0.05, 64), (1437, 0.5, 704), (1437, 0.01, 15),
                                                   (100, 1.0, 100), (50000, 0.05, 2496)])
def test_controller_subset_is_whole_batches_beyond_one(n, share, size):
    from torch.utils.data import TensorDataset

    from atofx.ato.controller import controller_subset

    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=64)
    cn = controller_subset(loader, share, seed=0)
    assert len(cn.dataset) == size and len(set(cn.dataset.indices)) == size
    assert controller_subset(loader, share, seed=0).dataset.indices == cn.dataset.indices  # fixed for a seed


def test_a_round_to_no_prunable_space_is_wider_than_is_refused_before_training():
    """ato.train(round_to=1000) would change nothing, silently: refused, in the keyword's words."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    ato = atofx.compile(model, torch.randn(2, 1, 6, 6))
    with pytest.raises(atofx.ConfigError, match=r"^round_to 8 has no effect on this model: .* 8 channels"):
        ato.start_training(epochs=2, target_flops=0.5, round_to=8)
    ato.start_training(epochs=2, target_flops=0.5, round_to=4)
