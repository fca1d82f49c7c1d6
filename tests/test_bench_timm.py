"""Smoke test for tools/bench_timm.py (the timm zoo sweep): one small model end to end, and the sample."""

from __future__ import annotations

import json

import pytest

from tests.bench_tools import load_tool

pytest.importorskip("timm")

bench_timm = load_tool("bench_timm")


def test_sweep_writes_a_row_per_model(tmp_path):
    out = tmp_path / "sweep.json"
    assert bench_timm.main(["--models", "resnet10t", "--size", "32", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["status"] == "ok" and row["prunable"] > 0 and 0 < row["flops_removed"] < 1
    assert payload["exact"] == payload["built"] == 1 and row["input"] == [2, 3, 32, 32]


def test_sample_starts_with_the_required_models_and_is_fixed_by_the_seed():
    names = bench_timm.cnn_names()
    assert not any("vit" in n or "swin" in n for n in names)
    first = bench_timm.sample(names, 2, seed=0, max_params=30e6)
    assert first[: len(bench_timm.REQUIRED)] == bench_timm.REQUIRED
    assert len(first) == len(bench_timm.REQUIRED) + 2
    assert first == bench_timm.sample(names, 2, seed=0, max_params=30e6)


def test_a_model_too_big_for_the_input_is_tried_at_twice_the_size():
    row = bench_timm.sweep_model("inception_v3", 32)  # its stem needs at least 75x75: 64 is still too small
    assert row["status"] == "does not run at this input" and row["input"] == [2, 3, 32, 32]
    row = bench_timm.sweep_model("resnet10t", 16)
    assert row["status"] == "ok" and row["input"] == [2, 3, 16, 16]
