"""Data-parallel training: the helpers on one rank, the collectives on 2 gloo ranks, and `atofx train` under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import atofx
from atofx.ato import checkpoint as ckpt
from atofx.ato import distributed
from atofx.ato.controller import controller_subset
from atofx.ato.loop import evaluate
from atofx.errors import AtofxError, ConfigError
from tests.app.test_datasets import write_image_folder

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
RUN_LIMIT_S, WAIT_LIMIT_S, POLL_S = 300.0, 240.0, 0.05


# ------------------------------------------------------------------------------------ one rank
def test_without_a_process_group_there_is_one_rank():
    ranks = distributed.current()
    assert ranks == distributed.Ranks(0, 1, 0) and ranks.main and not ranks.parallel


@pytest.mark.parametrize("n", [10, 11, 1])
def test_shards_cover_the_dataset_once_without_padding(n):
    data = list(range(n))
    shards = [list(distributed.ShardSampler(data, distributed.Ranks(r, 3, r))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data
    assert [len(s) for s in shards] == [len(distributed.ShardSampler(data, distributed.Ranks(r, 3, r)))
                                        for r in range(3)]


def test_mask_digest_tells_masks_apart():
    mask = {0: torch.tensor([1.0, 0.0, 1.0]), 3: torch.ones(4)}
    same = {3: torch.ones(4, dtype=torch.bool), 0: torch.tensor([True, False, True])}
    other = {0: torch.tensor([1.0, 1.0, 1.0]), 3: torch.ones(4)}
    assert distributed.mask_digest(mask) == distributed.mask_digest(same)
    assert distributed.mask_digest(mask) != distributed.mask_digest(other)


def test_several_ranks_refuse_an_unsharded_training_loader(monkeypatch):
    data = TensorDataset(torch.zeros(8, 1))
    distributed.require_sharded(DataLoader(data, shuffle=True), "training")  # one rank: anything goes
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(0, 2, 0))
    with pytest.raises(ConfigError, match="DistributedSampler"):
        distributed.require_sharded(DataLoader(data, shuffle=True), "training")
    distributed.require_sharded(DataLoader(data, sampler=distributed.training_sampler(data, 0)), "training")


# ------------------------------------------------------------------------------ two gloo ranks
def _tiny_data(n: int = 37) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _collectives(rank: int, world: int, store: str, out: str) -> None:
    """Runs on each rank; writes what it saw to out/rank<r>.json (or the traceback)."""
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        torch.manual_seed(0)
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))
        distributed.average_gradients([p])
        result["grad"] = p.grad.tolist()
        result["sum"] = float(distributed.sum_across(torch.tensor(float(rank + 1)))[0])

        same = {0: torch.tensor([1.0, 0.0, 1.0])}
        result["digests"] = distributed.agreed_mask_digests(same, epoch=1)
        differ = {0: torch.tensor([1.0, float(rank), 1.0])}
        try:
            distributed.agreed_mask_digests(differ, epoch=2)
            result["differing_masks_refused"] = False
        except AtofxError as exc:
            result["differing_masks_refused"] = "epoch 2" in str(exc)

        data = _tiny_data()
        model = nn.Linear(4, 3)
        shard = DataLoader(data, batch_size=5, sampler=distributed.ShardSampler(data, distributed.current()))
        result["eval_sharded"] = evaluate(model, shard, torch.device("cpu"), nn.functional.cross_entropy)
        result["eval_whole"] = evaluate(model, DataLoader(data, batch_size=5), torch.device("cpu"),
                                        nn.functional.cross_entropy)
        train = DataLoader(data, batch_size=4, sampler=distributed.training_sampler(data, seed=0))
        result["cn_indices"] = [i for i in controller_subset(train, 0.5, seed=0).sampler]
        result["cn_subset"] = list(controller_subset(train, 0.5, seed=0).dataset.indices)
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gloo")
    mp.start_processes(_collectives, args=(WORLD, str(out / "store"), str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return results


def test_gradients_are_averaged_and_sums_add_up(two_ranks):
    for res in two_ranks:
        assert res["grad"] == [1.5, 1.5, 1.5]
        assert res["sum"] == 3.0


def test_ranks_compare_masks_and_stop_when_they_differ(two_ranks):
    assert two_ranks[0]["digests"] == two_ranks[1]["digests"] and len(set(two_ranks[0]["digests"])) == 1
    assert all(res["differing_masks_refused"] for res in two_ranks)


def test_sharded_evaluation_equals_evaluating_everything_on_one_rank(two_ranks):
    for res in two_ranks:
        assert res["eval_sharded"]["accuracy"] == res["eval_whole"]["accuracy"]
        assert res["eval_sharded"]["loss"] == pytest.approx(res["eval_whole"]["loss"], rel=1e-6)


def test_ranks_share_one_controller_subset_and_split_it(two_ranks):
    assert two_ranks[0]["cn_subset"] == two_ranks[1]["cn_subset"]
    first, second = (set(res["cn_indices"]) for res in two_ranks)
    assert first | second == set(range(len(two_ranks[0]["cn_subset"])))
    assert len(two_ranks[0]["cn_indices"]) == len(two_ranks[1]["cn_indices"])  # same number of controller steps


# ---------------------------------------------------------------------------- atofx train under torchrun
def torchrun(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
            "-m", "atofx", "train", "--model", "resnet20", "--dataset", "folder", "--data-dir", str(data),
            "--epochs", "3", "--target-flops", "0.6", "--device", "cpu", "--out", str(out), "--quiet",
            "--no-dense-reference", "--num-workers", "0"]


def environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"), train=40, val=10, size=36, classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 2-rank run and, alongside it, one killed after its first epoch and run again."""
    root = tmp_path_factory.mktemp("torchrun")
    ref_out, out = root / "uninterrupted", root / "killed"
    opts = {"cwd": ROOT, "env": environment(), "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True,
            "start_new_session": True}
    reference = subprocess.Popen(torchrun(folder, ref_out), **opts)
    victim = subprocess.Popen(torchrun(folder, out), **opts)
    try:
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not (out / "checkpoints" / ckpt.CHECKPOINT).exists():
            assert victim.poll() is None, f"the run ended before it could be killed:\n{victim.communicate()[0]}"
            assert time.monotonic() < deadline, "no epoch checkpointed in time"
            time.sleep(POLL_S)
        os.killpg(victim.pid, signal.SIGKILL)  # torchrun and both ranks
        victim.wait(timeout=60)
        assert not (out / "summary.json").exists(), "killed mid-run: the job must not have finished"
        saved, _ = ckpt.read_latest(out / "checkpoints")
        assert saved is not None and 1 <= saved["epoch"] < 3
        rerun = subprocess.run(torchrun(folder, out), timeout=RUN_LIMIT_S, **opts)
        assert rerun.returncode == 0, rerun.stdout
        stdout, _ = reference.communicate(timeout=RUN_LIMIT_S)
        assert reference.returncode == 0, stdout
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"uninterrupted": ref_out, "resumed": out, "history_at_kill": saved["history"]}


def test_two_rank_run_writes_the_summary_once(runs):
    summary = json.loads((runs["uninterrupted"] / "summary.json").read_text())
    assert summary["ranks"] == WORLD
    assert summary["accuracy_pruned"] == summary["accuracy_trained"], "the pruned model equals the trained one"
    assert (runs["uninterrupted"] / "pruned.pt").is_file()
    assert len(records(runs["uninterrupted"])) == 3, "rank 0 alone writes the log"


def test_both_ranks_hold_the_same_mask_at_every_epoch(runs):
    for r in records(runs["uninterrupted"]):
        assert len(r["mask_digests"]) == WORLD and len(set(r["mask_digests"])) == 1, r
    final = ckpt.read_latest(runs["uninterrupted"] / "checkpoints")[0]
    assert len(final["rng"]) == WORLD, "each rank's random streams are checkpointed"


def test_a_killed_two_rank_run_resumes_to_the_uninterrupted_result(runs):
    done = runs["history_at_kill"]
    logged = [json.loads(line) for line in (runs["resumed"] / "log.jsonl").read_text().splitlines()]
    assert logged[: len(done)] == done, "the rerun resumed from the checkpoint instead of starting over"
    assert records(runs["resumed"]) == records(runs["uninterrupted"])
    small, ref_small = (atofx.load(runs[k] / "pruned.pt") for k in ("resumed", "uninterrupted"))
    state, ref_state = small.state_dict(), ref_small.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


def test_a_two_rank_checkpoint_resumed_as_one_process_says_to_rerun_it_under_torchrun(runs, folder, tmp_path):
    out = tmp_path / "one"
    shutil.copytree(runs["uninterrupted"], out)  # its job.json says the same flags: only the processes differ
    job = torchrun(folder, out)
    one = [sys.executable, "-m", *job[job.index("atofx"):]]  # the same job without torchrun
    result = subprocess.run(one, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=RUN_LIMIT_S)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("atofx: error:") and "written by 2 processes and this run has one process" in error
    assert "torchrun --nproc_per_node 2" in error and "differs in" not in error and "checkpoint_dir" not in error
    assert "resuming" not in result.stdout + result.stderr  # refused before it says it resumes
