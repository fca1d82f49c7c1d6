"""Smoke tests for the bench tools (latency, accuracy, overhead) and their plots: core functions on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import atofx
from atofx.cifar_models import resnet20

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str):
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))  # bench_accuracy imports bench_latency as a sibling module
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_latency = _load("bench_latency")
bench_accuracy = _load("bench_accuracy")
bench_overhead = _load("bench_overhead")
bench_plots = _load("bench_plots")


@pytest.fixture(scope="module")
def digits_ato() -> atofx.ATOModel:
    torch.manual_seed(0)
    return atofx.compile(resnet20(10, 1), (torch.randn(1, 1, 8, 8),))


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_uniform_mask_meets_flops_target(digits_ato, keep):
    mask, kept = bench_latency.uniform_mask(digits_ato, keep, seed=1)
    mask.validate(digits_ato.zigs)
    assert abs(kept - keep) <= 0.01
    assert kept == pytest.approx(digits_ato.flops(mask) / digits_ato.flops())
    # the same share of every space (up to rounding to whole channels)
    shares = [float(b.float().mean()) for b in mask.bits.values()]
    assert max(shares) - min(shares) < 0.2


def test_uniform_mask_flops_agree_with_counter_after_pruning(digits_ato):
    mask, kept = bench_latency.uniform_mask(digits_ato, 0.5)
    x = digits_ato.example_inputs
    small = digits_ato.prune(mask)
    counted = atofx.count_flops(small, x) / atofx.count_flops(digits_ato.model, x)
    assert counted == pytest.approx(kept, abs=0.01)


def test_uniform_mask_rejects_bad_target(digits_ato):
    with pytest.raises(ValueError):
        bench_latency.uniform_mask(digits_ato, 0.0)


def test_uniform_mask_rounds_to_multiples(digits_ato):
    mask, kept = bench_latency.uniform_mask(digits_ato, 0.45, tol=0.05, round_to=8)  # widths 16/32/64: coarse steps
    for s in digits_ato.zigs.prunable:
        n = int(mask.bits[s.index].sum())
        assert n % 8 == 0 or n == s.width
    assert abs(kept - 0.45) <= 0.05


def test_bench_model_rows(monkeypatch):
    monkeypatch.setitem(bench_latency.MODELS, "tiny", (lambda: resnet20(10, 3), (3, 16, 16)))
    rows = bench_latency.bench_model("tiny", (0.5,), (1, 4), repeats=2, warmup=1)
    assert [(r["model"], r["memory_format"], r["batch"]) for r in rows] == [
        ("tiny", "contiguous", 1), ("tiny", "contiguous", 4), ("tiny", "channels_last", 1), ("tiny", "channels_last", 4)]
    for r in rows:
        assert abs(r["pruned_flops"] - 0.5) <= 0.01
        assert r["flops_speedup"] == pytest.approx(1.0 / (1.0 - r["pruned_flops"]))
        assert r["latency_speedup"] > 0 and r["dense_ms"] > 0 and r["pruned_ms"] > 0


def test_l1_scores_are_the_l1_norm_of_each_zig(digits_ato):
    scores = bench_accuracy.l1_scores(digits_ato)
    assert set(scores) == {s.index for s in digits_ato.zigs.prunable}
    params = dict(digits_ato.graph_module.named_parameters())
    space = digits_ato.zigs.prunable[0]
    expected = 0.0
    seen = set()
    for module, name, dim, idx in digits_ato.zigs.zig_slices(space.index, 2):
        full = f"{module}.{name}" if module else name
        if full in params and (full, dim) not in seen:
            seen.add((full, dim))
            expected += float(params[full].detach().index_select(dim, torch.as_tensor(idx)).abs().sum())
    assert float(scores[space.index][2]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_l1_mask_respects_target_and_drops_the_smallest(keep):
    torch.manual_seed(0)
    ato = atofx.compile(resnet20(10, 1), (torch.randn(1, 1, 8, 8),))
    widest = max(ato.zigs.prunable, key=lambda s: s.width)
    params = dict(ato.graph_module.named_parameters())
    with torch.no_grad():  # make ZIG 0 of the widest space the least important one
        for module, name, dim, idx in ato.zigs.zig_slices(widest.index, 0):
            full = f"{module}.{name}" if module else name
            if full in params:
                params[full].index_fill_(dim, torch.as_tensor(idx), 0.0)
    scores = bench_accuracy.l1_scores(ato)
    assert float(scores[widest.index][0]) == 0.0
    mask, kept = bench_accuracy.threshold_mask(ato, scores, keep)
    mask.validate(ato.zigs)
    assert kept == pytest.approx(ato.flops(mask) / ato.flops())
    assert keep - 0.03 <= kept <= keep + 1e-9
    assert not bool(mask.bits[widest.index][0])
    for index, bits in mask.bits.items():  # the best ZIG of every space survives
        s = scores[index].numpy()
        assert s[np.asarray(bits)].max() >= s.max() - 1e-12


def test_summary_and_figures():
    runs = [{"method": "dense", "pruned_flops_target": 0.0, "flops_kept": 1.0, "accuracy": a} for a in (98.0, 99.0)]
    runs += [{"method": m, "pruned_flops_target": 0.5, "flops_kept": k, "accuracy": a}
             for m, k, a in [("ato", 0.50, 98.0), ("ato", 0.51, 98.4), ("static", 0.49, 97.0), ("l1", 0.5, 97.5),
                             ("random", 0.5, 96.0)]]
    rows = bench_accuracy.summarize(runs, (0.5,))
    ato = next(r for r in rows if r["method"] == "ato")
    assert ato["acc_mean"] == pytest.approx(98.2) and ato["flops_kept_mean"] == pytest.approx(0.505)
    assert ato["acc_std"] == pytest.approx(float(np.std([98.0, 98.4], ddof=1)))
    assert bench_accuracy.figures(rows, (0.5,)) == {
        "ato_meets_flops_at_0.50": True, "ato_best_at_0.50": True, "ato_within_1pt_of_dense_at_0.50": True}
    # an ATO mask that misses the FLOPs target does not win, however accurate
    for r in rows:
        if r["method"] == "ato":
            r["flops_kept_mean"] = 0.6
    assert bench_accuracy.figures(rows, (0.5,))["ato_best_at_0.50"] is False


def test_accuracy_benchmark_runs_every_method_on_cifar10_files(tmp_path, monkeypatch):
    """--data-dir: the same comparison on CIFAR-10 read by torchvision from files this test writes."""
    from tests.test_datasets import write_cifar10

    write_cifar10(tmp_path, monkeypatch)
    runs = bench_accuracy.run_all([0], (0.5,), epochs=2, data_dir=str(tmp_path), model="resnet20", lam=1.0)
    assert sorted(r["method"] for r in runs) == sorted(bench_accuracy.METHODS)
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 100.0 and 0.0 < r["flops_kept"] <= 1.0
    assert all(abs(r["flops_kept"] - 0.5) <= 0.011 for r in runs if r["method"] in ("l1", "random"))


def test_accuracy_benchmark_runs_only_the_methods_asked_for():
    runs = bench_accuracy.run_all([0], (0.5,), epochs=2, methods=("ato",))
    assert [r["method"] for r in runs] == ["ato"]
    assert set(bench_accuracy.figures(bench_accuracy.summarize(runs, (0.5,)), (0.5,))) == {"ato_meets_flops_at_0.50"}


def test_overhead_ratios_are_paired_per_repeat():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=gen)
    r = bench_overhead.measure(resnet20(10, 1), loader, (1, 1, 8, 8), repeats=3)
    times = r["times_s"]
    assert all(len(v) == 3 for v in times.values())
    for kind in ("outside", "inside"):
        paired = sorted(t / p for t, p in zip(times[kind], times["plain"], strict=True))
        assert r[f"ratio_{kind}_window"] == paired[1]


PAYLOADS = {
    "plot_accuracy": {"rows": [
        {"method": "dense", "pruned_flops_target": 0.0, "flops_kept_mean": 1.0, "acc_mean": 98.9, "acc_std": 0.5},
        {"method": "ato", "pruned_flops_target": 0.5, "flops_kept_mean": 0.49, "acc_mean": 99.1, "acc_std": 0.2},
        {"method": "ato", "pruned_flops_target": 0.7, "flops_kept_mean": 0.30, "acc_mean": 98.7, "acc_std": 0.3}],
        "model": "resnet20", "dataset": "digits"},
    "plot_latency": {"rows": [
        {"model": "m", "memory_format": fmt, "batch": b, "pruned_flops": 0.5, "flops_speedup": 2.0,
         "latency_speedup": 1.7} for fmt in ("contiguous", "channels_last") for b in (1, 32)]},
    "plot_analysis": {"median_ratio": 0.4, "rows": [{"model": "a", "ratio": 0.3}, {"model": "b", "ratio": 0.5},
                                                    {"model": "c"}]},
    "plot_overhead": {"models": {"m": {"ratio_outside_window": 1.01, "ratio_inside_window": 1.04}},
                      "ratio_outside_window": 1.01, "ratio_inside_window": 1.04},
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_each_bench_json_is_drawn_by_its_own_plot(name, tmp_path):
    payload = PAYLOADS[name]
    assert bench_plots.plot_for(payload).__name__ == name
    out = bench_plots.main([str(_write(tmp_path / "r.json", payload)), str(tmp_path / "r.png")])
    assert out == 0 and (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_json_of_no_bench_is_refused(tmp_path, capsys):
    assert bench_plots.main([str(_write(tmp_path / "x.json", {"rows": [{"x": 1}]})), str(tmp_path / "x.png")]) == 2
    assert "not a JSON file written by tools/bench_" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _write(path, payload):
    path.write_text(json.dumps(payload))
    return path


def test_latency_plot_draws_one_line_per_layout_and_rounding(tmp_path, monkeypatch):
    figures = []
    real = bench_plots._figure
    monkeypatch.setattr(bench_plots, "_figure", lambda w, h: figures.append(real(w, h)) or figures[-1])
    rows = [{"model": "m", "memory_format": fmt, "round_to": n, "batch": 32, "pruned_flops": 0.5,
             "flops_speedup": 2.0, "latency_speedup": 1.7} for n in (1, 16) for fmt in ("contiguous", "channels_last")]
    bench_plots.plot_latency({"rows": rows}, tmp_path / "l.png")
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()][2:]  # after the two guide lines
    assert labels == ["m, contiguous", "m, channels_last", "m, contiguous, round to 16", "m, channels_last, round to 16"]


def _logging_epoch(log: list, name: str, stop_after: int | None = None, fail_at: int | None = None):
    def epoch(data) -> None:
        for n, batch in enumerate(data):
            if n == fail_at:
                raise RuntimeError(f"{name} failed")
            log.append((name, batch))
            if n + 1 == stop_after:
                break
    return epoch


def test_lockstep_takes_turns_one_batch_at_a_time():
    log: list = []
    elapsed = bench_overhead.Lockstep(3, first=1).run([_logging_epoch(log, k) for k in "abc"], [0, 1, 2])
    assert log == [(k, b) for b in (0, 1, 2) for k in "bca"]
    assert len(elapsed) == 3 and all(t > 0 for t in elapsed)


def test_lockstep_goes_on_past_an_early_finish_and_reraises_a_failure():
    log: list = []
    epochs = [_logging_epoch(log, "a", stop_after=1), _logging_epoch(log, "b", fail_at=2), _logging_epoch(log, "c")]
    with pytest.raises(RuntimeError, match="b failed"):
        bench_overhead.Lockstep(3).run(epochs, [0, 1, 2, 3])
    assert log == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("c", 2), ("c", 3)]
