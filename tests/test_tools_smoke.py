"""Smoke tests for the bench tools (latency, accuracy, overhead) and their plots: core functions on tiny settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import atofx
from atofx.app.cifar_models import resnet20
from tests.bench_tools import load_tool

bench_latency = load_tool("bench_latency")
bench_accuracy = load_tool("bench_accuracy")
bench_overhead = load_tool("bench_overhead")
bench_plots = load_tool("bench_plots")
bench_ablation = load_tool("bench_ablation")
bench_machine = load_tool("bench_machine")
bench_widths = load_tool("bench_widths")


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


@pytest.mark.parametrize("method", ["tp_l1", "tp_group_norm", "random"])
@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_torch_pruning_methods_are_bisected_to_the_flops_target(method, keep):
    torch.manual_seed(0)
    model = resnet20(10, 1)
    x = torch.randn(1, 1, 8, 8)
    small, kept = bench_accuracy.tp_prune_to_flops(method, model, x, keep, seed=1)
    assert kept == pytest.approx(atofx.count_flops(small, x) / atofx.count_flops(model, x))
    assert keep - 0.01 <= kept <= keep  # within 1% of the target, never above it
    assert small.fc.out_features == 10 and model.conv1.out_channels == 16  # classifier kept, original untouched
    assert small(x).shape == (1, 10)


def test_a_target_the_pruner_cannot_reach_is_an_error_that_shows_what_it_tried():
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"tp_l1 could not reach 0.000 of the FLOPs \(ratio: FLOPs kept 0.5: 0\.\d{3}, "):
        bench_accuracy.tp_prune_to_flops("tp_l1", resnet20(10, 1), torch.randn(1, 1, 8, 8), 0.0)


@pytest.mark.parametrize(("version", "fixed"), [("1.6.1", True), ("1.10.0", True), ("2.0", True), ("1.6.0", False),
                                                 ("1.5.2", False)])
def test_torch_pruning_releases_before_1_6_1_have_the_broken_random_importance(version, fixed):
    assert bench_accuracy.random_is_fixed(version) is fixed


def test_random_with_an_old_torch_pruning_is_refused_before_any_run(monkeypatch, capsys):
    monkeypatch.setattr(bench_accuracy, "torch_pruning_version", lambda: "1.6.0")
    monkeypatch.setattr(bench_accuracy, "run_all", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        bench_accuracy.main(["--quick", "--methods", "random"])
    assert "pip install 'torch-pruning>=1.6.1', or leave random out of --methods" in capsys.readouterr().err


def test_the_installed_random_importance_keeps_fewer_flops_the_higher_the_ratio():
    """What the bisection assumes, and what Torch-Pruning 1.6.0 broke (0.25 / 0.5 / 0.75 kept 0.41 / 0.56 / 0.76)."""
    model, x = resnet20(10, 1), torch.randn(1, 1, 8, 8)
    dense, kept = atofx.count_flops(model, x), []
    for ratio in (0.25, 0.5, 0.75):
        kept.append(atofx.count_flops(bench_accuracy.tp_pruned_at("random", model, x, ratio, seed=0), x) / dense)
    assert kept[0] > kept[1] > kept[2], kept


def test_tp_l1_drops_the_smallest_groups_first():
    torch.manual_seed(0)
    model = resnet20(10, 1)
    block = model.layer3[1]
    with torch.no_grad():  # the block's inner channels 0-15 (conv1 rows, bn1, conv2 columns) made tiny
        for t in (block.conv1.weight[:16], block.bn1.weight[:16], block.bn1.bias[:16], block.conv2.weight[:, :16]):
            t.mul_(1e-6)
    small, _ = bench_accuracy.tp_prune_to_flops("tp_l1", model, torch.randn(1, 1, 8, 8), 0.9)
    inner = small.layer3[1].bn1.weight.detach().abs()
    assert len(inner) <= 48 and float(inner.min()) > 1e-3  # all 16 went, none of the others' size survived them


def _runs(rows: list[tuple[str, float, float, float]]) -> list[dict]:
    return [{"method": m, "pruned_flops_target": t, "flops_kept": k, "accuracy": a, "val_accuracy": a - 1, "seed": i,
             "seconds_total": 10.0} for i, (m, t, k, a) in enumerate(rows)]


def test_summary_and_figures():
    runs = _runs([("dense", 0.0, 1.0, 98.0), ("dense", 0.0, 1.0, 99.0), ("ato", 0.5, 0.50, 98.4), ("ato", 0.5, 0.51, 98.8),
                  ("static", 0.5, 0.49, 97.0), ("tp_l1", 0.5, 0.5, 97.5), ("tp_group_norm", 0.5, 0.5, 98.5),
                  ("random", 0.5, 0.5, 96.0)])
    rows = bench_accuracy.summarize(runs, (0.5,))
    ato = next(r for r in rows if r["method"] == "ato")
    assert ato["acc_mean"] == pytest.approx(98.6) and ato["flops_kept_mean"] == pytest.approx(0.505)
    assert ato["acc_std"] == pytest.approx(float(np.std([98.4, 98.8], ddof=1)))
    assert ato["val_acc_mean"] == pytest.approx(97.6) and ato["seconds_mean"] == 10.0
    checks = bench_accuracy.figures(rows, (0.5,))
    assert checks["ato_best_at_0.50"] and checks["ato_within_0.5pt_of_dense_at_0.50"]
    assert all(checks[f"{m}_meets_flops_at_0.50"] and checks[f"{m}_matches_flops_at_0.50"] for m in bench_accuracy.PRUNED)
    # 3.7 points under the target: within the budget, but not matched
    next(r for r in rows if r["method"] == "static")["flops_kept_mean"] = 0.463
    checks = bench_accuracy.figures(rows, (0.5,))
    assert checks["static_meets_flops_at_0.50"] and not checks["static_matches_flops_at_0.50"]
    # an ATO mask that misses the FLOPs target does not win, however accurate
    next(r for r in rows if r["method"] == "ato")["flops_kept_mean"] = 0.6
    checks = bench_accuracy.figures(rows, (0.5,))
    assert checks["ato_best_at_0.50"] is False and checks["ato_meets_flops_at_0.50"] is False
    # a peer ahead by 0.1 point beats it; dense 0.6 points ahead breaks the 0.5-point figure
    runs = _runs([("dense", 0.0, 1.0, 99.2), ("ato", 0.5, 0.5, 98.6), ("tp_group_norm", 0.5, 0.5, 98.7)])
    checks = bench_accuracy.figures(bench_accuracy.summarize(runs, (0.5,)), (0.5,))
    assert checks["ato_best_at_0.50"] is False and checks["ato_within_0.5pt_of_dense_at_0.50"] is False
    assert "dense" in bench_accuracy.table(bench_accuracy.summarize(runs, (0.5,)))


SMALL_FASHION = bench_accuracy.Protocol("fashion-mnist", "resnet20", 2, 16, 64, 32, 0.25, test_images=48)


def test_accuracy_benchmark_runs_every_method_on_fashion_mnist_files(tmp_path):
    """Every method, validation split and test set, on Fashion-MNIST files this test writes."""
    from tests.app.test_datasets import write_fashion_mnist

    write_fashion_mnist(tmp_path, train=120, test=48)
    runs = bench_accuracy.run_all([0], (0.5,), SMALL_FASHION, data_dir=str(tmp_path), lam=1.0)
    assert sorted(r["method"] for r in runs) == sorted(bench_accuracy.METHODS)
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 100.0 and 0.0 <= r["val_accuracy"] <= 100.0 and 0.0 < r["flops_kept"] <= 1.0
        assert r["seconds_total"] >= r["seconds"] > 0
        if r["method"] in ("ato", "static"):  # one per epoch, inside the run's time
            assert len(r["epoch_seconds"]) == SMALL_FASHION.epochs and 0 < sum(r["epoch_seconds"]) < r["seconds"]
    for r in runs:
        if r["method"] in bench_accuracy.TP_METHODS:
            # at most the target; the bisected global ratio moves whole channels, ~1 point a step on this tiny net
            assert 0.48 <= r["flops_kept"] <= 0.5 and r["seconds_total"] > r["seconds"]  # + the shared first half


def test_a_run_takes_its_thread_count_on_any_device():
    """--jobs N gives each run one thread, on a GPU box too (meta stands in for the GPU: no CPU compute)."""
    proto = bench_accuracy.Protocol("digits", "resnet20", 2, 64, None, 0, 0.5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        task = bench_accuracy.base_task(proto, device="meta", threads=1) | {"method": "dense", "seed": 0, "target": 0.0}
        *_, model, _, device = bench_accuracy.prepared(task)
        assert torch.get_num_threads() == 1 and device.type == "meta" and next(model.parameters()).is_meta
    finally:
        torch.set_num_threads(before)


def test_accuracy_benchmark_runs_second_halves_in_its_process_pool_from_the_shared_first_half():
    """--jobs 2: a seed's first half is trained once in a worker and both second halves start from it."""
    proto = bench_accuracy.Protocol("digits", "resnet20", 2, 64, None, 0, 0.5)
    runs = bench_accuracy.run_all([0], (0.5,), proto, jobs=2, methods=("tp_l1", "random"))
    assert sorted(r["method"] for r in runs) == ["random", "tp_l1"]
    assert all(0.48 <= r["flops_kept"] <= 0.5 and r["seconds_total"] > r["seconds"] for r in runs)
    first, second = (r["seconds_total"] - r["seconds"] for r in runs)
    assert first == pytest.approx(second, abs=1e-6)  # the same first half's time in both


def test_accuracy_benchmark_passes_ato_options_and_runs_only_the_methods_asked_for(monkeypatch):
    seen = {}
    original = atofx.ATOModel.train

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(atofx.ATOModel, "train", spy)
    proto = bench_accuracy.Protocol("digits", "resnet20", 2, 64, None, 0, 0.5)
    runs = bench_accuracy.run_all([0], (0.5,), proto, methods=("ato",), ato_options={"tau": 0.5, "controller_data": 0.25})
    assert [r["method"] for r in runs] == ["ato"] and seen["tau"] == 0.5
    assert seen["controller_data"] == 0.25  # an option overrides the protocol's D_CN share (0.5)
    assert set(bench_accuracy.figures(bench_accuracy.summarize(runs, (0.5,)), (0.5,))) == {"ato_meets_flops_at_0.50",
                                                                                         "ato_matches_flops_at_0.50"}
    assert bench_accuracy._option("projection=hsp") == ("projection", "hsp")
    assert bench_accuracy._option("lam_boost=100") == ("lam_boost", 100)


def test_accuracy_benchmark_resumes_from_its_stored_runs(tmp_path, monkeypatch):
    """Each finished run is on disk at once; a rerun trains only what is missing (here: one damaged file)."""
    proto = bench_accuracy.Protocol("digits", "resnet20", 2, 64, None, 0, 0.5)
    store = bench_accuracy.RunStore(tmp_path / "runs", "code-a")
    first = bench_accuracy.run_all([0], (0.5,), proto, methods=("ato", "tp_l1"), store=store)
    files = sorted((tmp_path / "runs").glob("*.json"))
    assert len(files) == 2 and {r["method"] for r in first} == {"ato", "tp_l1"}

    trained = []
    original = bench_accuracy.run_task
    monkeypatch.setattr(bench_accuracy, "run_task", lambda task: trained.append(task["method"]) or original(task))
    again = bench_accuracy.run_all([0], (0.5,), proto, methods=("ato", "tp_l1"), store=store)
    assert trained == [] and sorted(r["accuracy"] for r in again) == sorted(r["accuracy"] for r in first)
    assert all(r["stored"] for r in again)

    next(f for f in files if f.name.startswith("tp_l1")).write_text("{ cut short")
    bench_accuracy.run_all([0], (0.5,), proto, methods=("ato", "tp_l1"), store=store)
    assert trained == ["half", "tp_l1"]  # the shared first half again, for the one run it unlocks
    assert bench_accuracy.RunStore(tmp_path / "runs", "code-b").get({**first[0], "target": 0.5}) is None


_RUN_TASK = bench_accuracy.run_task


def _random_fails(task: dict) -> dict:
    if task["method"] == "random":
        raise RuntimeError("Torch-Pruning's random could not reach 0.500 of the FLOPs")
    return _RUN_TASK(task)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_loses_none_of_the_others(tmp_path, monkeypatch, jobs):
    """One run raises: the others still finish and are stored, and the benchmark then fails naming the run."""
    proto = bench_accuracy.Protocol("digits", "resnet20", 2, 64, None, 0, 0.5)
    store = bench_accuracy.RunStore(tmp_path / "runs", "code-a")
    monkeypatch.setattr(bench_accuracy, "run_task", _random_fails)  # module level: the workers unpickle it
    with pytest.raises(RuntimeError, match="1 run.*random seed 0 target 0.50: RuntimeError: Torch-Pruning's random"):
        bench_accuracy.run_all([0], (0.5,), proto, jobs=jobs, methods=("static", "tp_l1", "random"), store=store)
    assert sorted(f.name.split("-")[0] for f in (tmp_path / "runs").glob("*.json")) == ["static", "tp_l1"]


def test_ablation_runs_each_variant_with_its_options_and_static_beside_the_defaults(tmp_path, monkeypatch):
    from tests.app.test_datasets import write_fashion_mnist

    write_fashion_mnist(tmp_path, train=120, test=48)
    seen = []
    original = atofx.ATOModel.train
    monkeypatch.setattr(atofx.ATOModel, "train", lambda self, *a, **kw: seen.append(kw) or original(self, *a, **kw))
    rows = bench_ablation.run(["defaults", "hsp"], 1, 1, None, SMALL_FASHION, data_dir=str(tmp_path))
    assert [r["variant"] for r in rows] == ["defaults", "static", "hsp"]
    assert [kw.get("projection") for kw in seen] == [None, None, "hsp"] and seen[1]["method"] == "static"
    assert {kw["controller_data"] for kw in seen} == {SMALL_FASHION.controller_data}  # the protocol's D_CN share
    for r in rows:
        assert 0.0 < r["flops_kept_mean"] <= 0.51 and r["revived_max_mean"] >= 0 and len(r["runs"]) == 1
    assert "static" in bench_ablation.table(rows)


def test_ablation_variants_change_one_point_each_on_the_issue_time_behaviour():
    """Issue 14's table: each point alone on `before`, all six together, and today's defaults."""
    from atofx.ato.config import ATOConfig

    configs = {name: ATOConfig.of(**options) for name, (_, options) in bench_ablation.VARIANTS.items()}
    before = dataclasses.asdict(configs["before"])
    changed = {name: {k for k, v in dataclasses.asdict(c).items() if v != before[k]} for name, c in configs.items()}
    assert changed["decay"] == {"step_size", "lam_schedule", "lam_boost"}
    assert changed["regularizer"] == {"regularizer", "controller_optimizer", "head_bias"}
    for name, key in [("hsp", "projection"), ("sampling", "sampling"), ("freeze", "freeze_mask"),
                      ("internal", "search_space")]:
        assert changed[name] == {key}
    assert changed["official"] == set().union(*(changed[n] for n in ("decay", "sampling", "regularizer", "freeze",
                                                                    "internal")))  # hsp is not the authors' default
    assert configs["defaults"] == ATOConfig() and changed["defaults"] >= {"step_size", "window_mask"}


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_accuracy_benchmark_trains_on_the_real_fashion_mnist():
    """CI installs Debian's dataset-fashion-mnist: one short run of ATO on a subset of the real files."""
    proto = bench_accuracy.Protocol("fashion-mnist", "resnet20", 2, 64, 1024, 256, 0.125, test_images=500)
    (run,) = bench_accuracy.run_all([0], (0.5,), proto, methods=("ato",))
    assert run["flops_kept"] <= 0.51
    assert run["val_accuracy"] > 20.0 and run["accuracy"] > 20.0  # well above chance (10%) after 1,024 images x 2


def test_overhead_ratios_are_paired_per_repeat():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=gen)
    r = bench_overhead.measure(resnet20(10, 1), loader, (1, 1, 8, 8), repeats=3)
    times = r["times_s"]
    assert all(len(v) == 3 for v in times.values())
    for kind in ("outside", "inside"):
        in_order = [t / p for t, p in zip(times[kind], times["plain"], strict=True)]
        assert r[f"ratio_{kind}_window"] == sorted(in_order)[1]
        assert r[f"ratio_{kind}_by_third"] == in_order  # three repeats: one a third


def test_overhead_thirds_are_medians_of_the_runs_start_middle_and_end():
    assert bench_overhead.by_third([1.0, 1.2, 1.1, 2.0, 2.2, 2.1, 3.0, 3.1, 2.9]) == [1.1, 2.1, 3.0]
    assert bench_overhead.by_third([1.0, 3.0]) == [1.0, 3.0]


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


def test_a_report_of_several_kinds_of_machine_is_drawn(tmp_path):
    """`--report` records machine None when its sources ran on different kinds of machine."""
    payload = PAYLOADS["plot_accuracy"] | {"machine": None, "date": "2026-12-04"}
    assert "more than one kind of machine" in bench_plots._caption(payload)
    assert bench_plots.main([str(_write(tmp_path / "r.json", payload)), str(tmp_path / "r.png")]) == 0


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


def test_paired_differences_are_per_seed():
    runs = _runs([("ato", 0.5, 0.5, 90.0), ("ato", 0.5, 0.5, 91.0), ("static", 0.5, 0.5, 90.5), ("static", 0.5, 0.5, 90.5)])
    for r, seed in zip(runs, (0, 1, 0, 1), strict=True):
        r["seed"] = seed
    (pair,) = bench_accuracy.paired(runs, (0.5,))
    assert pair["method"] == "static" and pair["seeds"] == [0, 1]
    assert pair["test"] == pytest.approx([-0.5, 0.5]) and pair["val"] == pytest.approx([-0.5, 0.5])
    assert "-0.50/+0.50 (mean +0.00, 95% interval" in bench_accuracy.paired_lines([pair])[0]
    runs[0]["val_accuracy"] = None  # a run without a validation split: no validation difference
    assert bench_accuracy.paired(runs, (0.5,))[0]["val"] is None
    # a baseline at other seeds only pairs with nothing
    assert bench_accuracy.paired([runs[0], {**runs[2], "seed": 7}], (0.5,)) == []


def test_the_paired_interval_is_student_s_t_over_the_seeds():
    # differences 1, 2, 3: mean 2, standard deviation 1, t(0.975, 2 degrees of freedom) = 4.303 from the tables
    assert bench_accuracy.interval95([1.0, 2.0, 3.0]) == pytest.approx([2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5],
                                                                        abs=1e-3)
    assert bench_accuracy.interval95([0.4, 0.4]) == pytest.approx([0.4, 0.4])  # no spread, no width
    assert bench_accuracy.interval95([0.4]) is None and bench_accuracy.interval95(None) is None
    runs = _runs([("ato", 0.5, 0.5, 91.0), ("ato", 0.5, 0.5, 92.0), ("ato", 0.5, 0.5, 93.0),
                  ("static", 0.5, 0.5, 90.0), ("static", 0.5, 0.5, 90.0), ("static", 0.5, 0.5, 90.0)])
    for r, seed in zip(runs, (0, 1, 2, 0, 1, 2), strict=True):
        r["seed"] = seed
    (pair,) = bench_accuracy.paired(runs, (0.5,))
    assert pair["test_interval95"] == pytest.approx(bench_accuracy.interval95([1.0, 2.0, 3.0]))
    assert "(mean +2.00, 95% interval -0.48 to +4.48)" in bench_accuracy.paired_lines([pair])[0]


def _saved(path: Path, runs: list[dict], **protocol) -> Path:
    path.write_text(json.dumps({"runs": runs, "protocol": {"epochs": 10, **protocol}, "ato_options": {}, "lam": 10.0,
                                "finetune_lr": 0.01}))
    return path


def test_report_puts_saved_runs_of_one_protocol_in_one_table_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_accuracy, "run_all", lambda *a, **k: pytest.fail("--report must not train"))
    runs = _runs([("dense", 0.0, 1.0, 90.0), ("ato", 0.5, 0.5, 89.0), ("static", 0.5, 0.5, 89.5),
                  ("dense", 0.0, 1.0, 91.0), ("ato", 0.5, 0.5, 90.0), ("static", 0.5, 0.5, 89.0)])
    for r, seed in zip(runs, (0, 0, 0, 1, 1, 1), strict=True):
        r["seed"] = seed
    a = _saved(tmp_path / "a.json", runs[:3])
    b = _saved(tmp_path / "b.json", runs[2:])  # static seed 0 in both files, the same result: kept once
    assert bench_accuracy.main(["--report", str(a), str(b), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "ato - static at 50% pruned, seeds [0, 1]: test -0.50/+1.00 (mean +0.25, 95% interval" in out
    merged = json.loads((tmp_path / "m.json").read_text())
    assert len(merged["runs"]) == 6 and merged["sources"] == [str(a), str(b)]
    assert next(r for r in merged["rows"] if r["method"] == "ato")["acc_mean"] == pytest.approx(89.5)
    assert merged["figures"]["ato_best_at_0.50"] is True and merged["protocol"] == {"epochs": 10}
    assert merged["seeds"] == [0, 1] and merged["machine"] is None  # the sources record no machine


def test_report_keeps_the_machine_only_when_every_source_ran_on_one_kind():
    same = {"cpu": "Xeon", "cpu_capability": "AVX512", "torch": "2.14.1", "load_average_before": [1.0, 1.0, 1.0]}
    merged = bench_accuracy.common_machine([{"machine": same}, {"machine": same | {"load_average_before": [3.0] * 3}}])
    assert merged == {"cpu": "Xeon", "cpu_capability": "AVX512", "torch": "2.14.1"}
    assert bench_accuracy.common_machine([{"machine": same}, {"machine": same | {"cpu_capability": "AVX2"}}]) is None
    assert bench_accuracy.common_machine([{"machine": same}, {}]) is None


@pytest.mark.parametrize("case", ["other result", "other protocol", "not a bench json", "missing"])
def test_report_refuses_runs_that_are_not_one_table(tmp_path, capsys, case):
    run = _runs([("ato", 0.5, 0.5, 89.0)])[0]
    a = _saved(tmp_path / "a.json", [run])
    b = {"other result": lambda: _saved(tmp_path / "b.json", [{**run, "accuracy": 89.1}]),
         "other protocol": lambda: _saved(tmp_path / "b.json", [run], epochs=30),
         "not a bench json": lambda: tmp_path.joinpath("b.json").write_text("[1, 2]") and tmp_path / "b.json",
         "missing": lambda: tmp_path / "b.json"}[case]()
    with pytest.raises(SystemExit):
        bench_accuracy.main(["--report", str(a), str(b)])
    err = capsys.readouterr().err
    expected = {"other result": "another result for ato at 0.5 pruned, seed 0", "other protocol": "differ in protocol",
                "not a bench json": "not a JSON written by tools/bench_accuracy.py", "missing": "cannot read"}[case]
    assert expected in err


def test_the_machine_record_names_the_processor_and_keeps_the_tool_s_own_entries(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 2.0GHz\nflags\t: avx\n")
    assert bench_machine.cpu_model(cpuinfo) == "Test CPU @ 2.0GHz"
    assert bench_machine.cpu_model(tmp_path / "missing")  # no /proc: what platform knows, never empty
    record = bench_machine.machine_record(threads=3, torch="overridden")
    assert record["threads"] == 3 and record["torch"] == "overridden"
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"platform", "cpu", "cpu_count", "python"} <= record.keys()
    json.dumps(record)  # it goes into the tools' JSON as it is


def test_bench_widths_shows_the_channels_each_method_keeps_in_every_prunable_space(capsys):
    protocol = dataclasses.replace(bench_accuracy.PROTOCOLS["digits"], epochs=2)
    static = bench_widths.trained("static", 0, 0.5, protocol)
    assert static.flops(static.mask) / static.flops() <= 0.5 + bench_accuracy.FLOPS_TOLERANCE
    lines = bench_widths.widths_table({"static": static}).splitlines()
    prunable = [s for s in static.spaces if not s.pinned]
    assert len(lines) == 2 + len(prunable) + 1  # header, rule, one row a space, FLOPs kept
    for line, space in zip(lines[2:], prunable, strict=False):
        index, name, width, _, kept = line.split()
        assert (int(index), name, int(width)) == (space.index, space.name, space.width)
        assert int(kept) == int(static.mask.bits[space.index].sum()) <= space.width
    assert lines[-1].split()[-1] == f"{static.flops(static.mask) / static.flops():.3f}"


def test_first_seed_runs_the_seeds_after_a_saved_table(tmp_path, monkeypatch):
    asked = []

    def run_all(seeds, *args, **kwargs):
        asked.append(seeds)
        return []

    monkeypatch.setattr(bench_accuracy, "run_all", run_all)
    monkeypatch.setattr(bench_accuracy, "print_results", lambda *a: ({}, []))
    bench_accuracy.main(["--first-seed", "3", "--seeds", "2", "--methods", "dense", "--runs-dir", str(tmp_path)])
    bench_accuracy.main(["--first-seed", "5", "--quick", "--methods", "dense", "--runs-dir", str(tmp_path)])
    assert asked == [[3, 4], [5]]
    with pytest.raises(SystemExit):
        bench_accuracy.main(["--first-seed", "-1", "--methods", "dense"])
