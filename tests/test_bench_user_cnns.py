"""tools/bench_user_cnns.py (issue 16's user-style CNN sweep): every zoo model compiles and prunes exactly in eval and
train mode, and a failure is reported as a failed row and a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.bench_tools import load_tool

bench = load_tool("bench_user_cnns")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[int, dict]:
    """The whole zoo once (about 10 s of one core): the exit status and the JSON it wrote."""
    out = tmp_path_factory.mktemp("sweep") / "user-cnns.json"
    status = bench.main(["--json", str(out)])
    return status, json.loads(out.read_text())


def test_every_zoo_model_prunes_exactly_in_eval_and_train_mode(sweep):
    status, payload = sweep
    rows = payload["rows"]
    assert len(rows) == len(bench.zoo()) >= 30
    failed = {r["model"]: r.get("error", r["status"]) for r in rows if r["status"] != "ok"}
    assert not failed
    assert status == 0 and payload["exact"] == payload["models"] == len(rows)
    for r in rows:
        assert r["eval_diff"] <= bench.TOL and r["train_diff"] <= bench.TOL and r["train_ok"], r["model"]
        assert r["prunable"] > 0 and 0 < r["flops_removed"] < 1 and r["flops_pruned"] < r["flops_dense"], r["model"]
    assert payload["command"].startswith("python tools/bench_user_cnns.py")


def test_the_sweep_sees_what_the_zoo_is_built_to_show(sweep):
    """Models with dropout stay random in train mode; CBAM's channel mean pins its stream, not its MLP."""
    rows = {r["model"]: r for r in sweep[1]["rows"]}
    assert rows["dropout_droppath"]["stochastic"] and rows["mobilenetv2"]["stochastic"]
    assert not rows["unet"]["stochastic"]
    assert any("over the channel dim" in reason for reason in rows["cbam"]["pinned_reasons"])
    assert rows["cbam"]["prunable"] >= 2
    assert 0 < sweep[1]["flops_removed_min"] <= sweep[1]["flops_removed_median"] <= sweep[1]["flops_removed_max"]


class Branchy(nn.Module):
    """Data-dependent control flow: atofx refuses it with a TraceError."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


class Counting(nn.Module):
    """Its output depends on how often any instance ran (a class-level counter): the pruned copy cannot match."""

    calls = 0

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counting.calls += 1
        return self.b(torch.relu(self.a(x))) * Counting.calls


@pytest.mark.parametrize(("make", "status"), [(Branchy, "TraceError"), (Counting, "EquivalenceError")])
def test_a_failing_model_gives_a_failed_row_and_a_nonzero_exit(monkeypatch, tmp_path, make, status):
    monkeypatch.setitem(bench.zoo(), "broken", bench.Entry("broken", make, ((2, 3, 8, 8),)))
    out = tmp_path / "broken.json"
    assert bench.main(["--models", "broken", "unet", "--json", str(out)]) == 1
    payload = json.loads(out.read_text())
    broken, unet = payload["rows"]
    assert broken["status"] == status and broken["error"].startswith(status)
    assert unet["status"] == "ok" and payload["exact"] == 1 and payload["models"] == 2


class Noisy(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 4, 1), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x))


def test_the_train_check_catches_unequal_outputs_and_lost_randomness():
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 4),)
    noisy = Noisy(0.5)
    twin, quiet = Noisy(0.5), Noisy(0.0)
    twin.load_state_dict(noisy.state_dict())
    quiet.load_state_dict({k: 2 * v for k, v in noisy.state_dict().items()})  # what p=0.5 gives with every unit kept
    assert bench.train_check(noisy, twin, x, 0)["train_ok"]
    assert bench.train_check(noisy, Noisy(0.5), x, 0)["train_diff"] > bench.TOL  # other weights
    lost = bench.train_check(noisy, quiet, x, 0)  # equal with every draw kept, but the dropout is gone
    assert lost["train_diff"] <= bench.TOL and lost["stochastic"] and not lost["train_ok"]
