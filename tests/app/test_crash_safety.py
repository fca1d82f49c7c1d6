"""Crash safety: `atofx train` killed with SIGKILL mid-run and rerun ends equal to an uninterrupted run.

A truncated checkpoint at resume is covered in tests/test_trainer.py
(test_truncated_checkpoint_falls_back_to_the_previous_one) and tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import atofx
from atofx.ato import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 6
# enough controller steps that 6 epochs on digits really drop channels (about 0.3 of the FLOPs kept)
RECIPE = {"controller_epochs": 15}
POLL_S, WAIT_LIMIT_S, RUN_LIMIT_S = 0.05, 180.0, 300.0

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def command(out: Path, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "atofx", "train", "--config", str(recipe), "--epochs", str(EPOCHS),
            "--target-flops", "0.3", "--batch-size", "128", "--device", "cpu", "--seed", "0",
            "--out", str(out), "--quiet", "--no-dense-reference"]


def environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def log_lines(out: Path) -> int:
    path = out / "log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def records(out: Path, seconds: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return rows if seconds else [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    opts = {"cwd": ROOT, "env": environment(), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    reference = subprocess.Popen(command(ref_out, recipe), **opts)  # runs alongside the killed one
    victim = subprocess.Popen(command(out, recipe), **opts)
    try:
        deadline = time.monotonic() + WAIT_LIMIT_S
        while log_lines(out) < 2:
            assert victim.poll() is None, f"the run ended before it could be killed:\n{victim.communicate()[0]}"
            assert time.monotonic() < deadline, "no two epochs logged in time"
            time.sleep(POLL_S)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        assert not (out / "pruned.pt").exists(), "killed mid-run: the job must not have finished"
        saved, note = ckpt.read_latest(out / "checkpoints")
        assert note is None and saved is not None and 1 <= saved["epoch"] < EPOCHS

        rerun = subprocess.run(command(out, recipe), timeout=RUN_LIMIT_S, **opts)
        assert rerun.returncode == 0, rerun.stdout
        stdout, _ = reference.communicate(timeout=RUN_LIMIT_S)
        assert reference.returncode == 0, stdout
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # it resumed: the epochs done before the kill are the checkpoint's records, timings included
    assert records(out, seconds=True)[: saved["epoch"]] == saved["history"]
    assert records(out) == records(ref_out)
    assert [r["epoch"] for r in records(out)] == list(range(1, EPOCHS + 1))

    # the same mask: the controller's final bits, and the widths of every layer of the pruned model
    masks = [ckpt.read_latest(o / "checkpoints")[0]["mask"] for o in (out, ref_out)]
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert json.loads((out / "widths.json").read_text()) == json.loads((ref_out / "widths.json").read_text())
    summary, ref_summary = (json.loads((o / "summary.json").read_text()) for o in (out, ref_out))
    assert summary["flops_kept"] < 0.9, "the run must drop channels for the mask comparison to mean anything"
    for key in ("flops_kept", "flops_after", "params_after", "accuracy_trained", "accuracy_pruned"):
        assert summary[key] == ref_summary[key], key

    # the same weights, bit for bit
    small, ref_small = atofx.load(out / "pruned.pt"), atofx.load(ref_out / "pruned.pt")
    state, ref_state = small.state_dict(), ref_small.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
