"""The training job's recipe options (AdamW, warm-up, label smoothing, mixup), ATO's options from the command
line, the recipes table, and the global-batch rule under torchrun (2 gloo ranks)."""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from atofx.app import cli, train_command
from atofx.app.options import RECIPES, TrainJob, ato_config, check_training, paper_figures, recipes_table
from atofx.app.train_job import SoftTargetLoader, job_optimizer, rank_batch_size, run
from atofx.ato.config import OFFICIAL, ATOConfig
from atofx.ato.controller import controller_subset
from atofx.ato.loop import loader_generators
from atofx.errors import AtofxError, ConfigError

WORLD = 2


def _lrs(job: TrainJob) -> list[float]:
    opt, sched = job_optimizer(job, torch.nn.Linear(2, 2))
    seen = []
    for _ in range(job.epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_adamw_with_warmup_ramps_up_then_follows_the_cosine():
    job = TrainJob(epochs=10, optimizer="adamw", lr=1e-3, warmup_epochs=5)
    lrs = _lrs(job)
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # the authors' GradualWarmupScheduler
    assert lrs[5] == pytest.approx(1e-3) and lrs[5] > lrs[6] > lrs[9] > 0
    opt, _ = job_optimizer(job, torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    sgd, _ = job_optimizer(TrainJob(epochs=10), torch.nn.Linear(2, 2))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 5e-4
    assert _lrs(TrainJob(epochs=4, lr=0.1))[0] == 0.1  # no warm-up: today's cosine from the start


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 3, generator=g), torch.randint(0, 4, (40,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))


def test_label_smoothing_and_mixup_give_class_probabilities():
    smooth = SoftTargetLoader(_loader(), 4, 0.1, 0.0, seed=0)
    x, y = next(iter(smooth))
    assert y.shape == (8, 4) and torch.allclose(y.sum(1), torch.ones(8))
    assert sorted(set(y.flatten().tolist())) == pytest.approx([0.025, 0.925])  # 1 - 0.1 + 0.1 / 4
    mixed = SoftTargetLoader(_loader(), 4, 0.1, 0.2, seed=0)
    (xm, ym), (xp, _) = next(iter(mixed)), next(iter(_loader()))
    assert torch.allclose(ym.sum(1), torch.ones(8)) and not torch.equal(xm, xp)
    again = next(iter(SoftTargetLoader(_loader(), 4, 0.1, 0.2, seed=0)))
    assert torch.equal(again[0], xm) and torch.equal(again[1], ym)  # seeded
    # everything else is the wrapped loader's: the controller's subset is drawn from the clean data
    assert mixed.dataset is mixed.loader.dataset and mixed.batch_size == 8 and len(mixed) == 5
    assert mixed.generator in loader_generators(mixed) and len(loader_generators(mixed)) == 2  # checkpointed too
    _, cn_y = next(iter(controller_subset(mixed, 0.5, seed=0)))
    assert cn_y.dtype == torch.long


@pytest.mark.parametrize("bad", [{"optimizer": "adam"}, {"warmup_epochs": 30}, {"label_smoothing": 1.0},
                                 {"mixup": -1.0}, {"weight_decay": -1.0}])
def test_bad_training_options_are_refused(bad):
    with pytest.raises(AtofxError, match=next(iter(bad)).replace("_", "[_-]")):
        check_training(TrainJob(**bad))


def test_command_line_sets_the_flavour_and_overrides_it():
    args = cli.build_parser().parse_args(["train", "--flavour", "official", "--freeze-mask", "dead", "--head-bias",
                                          "off", "--hsp-eps", "0.2", "--optimizer", "adamw", "--mixup", "0.2"])
    job = train_command.train_job_from_args(args)
    config = ato_config(job)
    assert config.freeze_mask == "dead" and config.hsp_eps == 0.2 and config.head_bias is False
    assert all(getattr(config, k) == v for k, v in OFFICIAL.items() if k != "freeze_mask")
    assert (job.optimizer, job.mixup) == ("adamw", 0.2)
    assert ato_config(TrainJob()).sampling == ATOConfig.sampling == "atofx"  # no flag: atofx's default
    with pytest.raises(ConfigError, match="search_space"):
        ato_config(TrainJob(search_space="blocks"))


def test_bad_choice_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--sampling", "gumbel"])
    assert "--sampling" in capsys.readouterr().err


def test_recipes_table_lists_every_recipe_with_the_papers_figures(capsys):
    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) == 11
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    for f in files:
        assert f.stem in out
    assert paper_figures(RECIPES / "cifar10-resnet56-55.yaml") == {"baseline": "93.50%", "pruned": "93.74%"}
    assert "76.07%" in recipes_table() and "0.383" in recipes_table()
    for f in files:
        assert paper_figures(f)["pruned"] != "?", f"{f.name} has no '# paper:' header line"
        text = f.read_text()
        if "imagenet" in f.stem:
            assert all(k in text for k in ("optimizer: adamw", "label_smoothing: 0.1", "mixup: 0.2",
                                           "warmup_epochs: 5", "weight_decay: 0.05"))


def test_a_job_with_the_official_recipe_options_trains_and_prunes_exactly(tmp_path):
    job = TrainJob(epochs=3, out=str(tmp_path), progress=False, dense_reference=False, optimizer="adamw", lr=1e-3,
                   warmup_epochs=1, label_smoothing=0.1, mixup=0.2, flavour="official", search_space="all")
    summary = run(job)
    assert summary["accuracy_pruned"] == summary["accuracy_trained"] > 30.0
    assert summary["ato"]["step_size"] == "share" and summary["ato"]["search_space"] == "all"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all({"zigs_dropped", "zigs_zero", "zigs_revived"} <= set(r) for r in log)


# ------------------------------------------------------------------------------ global batch, 2 gloo ranks
def test_rank_batch_is_the_global_batch_over_the_ranks():
    assert rank_batch_size(64, 1) == 64 and rank_batch_size(64, 2) == 32 and rank_batch_size(1024, 8) == 128
    with pytest.raises(AtofxError, match="multiple of 2"):
        rank_batch_size(63, 2)


def _batches(rank: int, world: int, store: str, out: str) -> None:
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        from atofx.app import train_job

        train, _, _, _, _ = train_job._data(TrainJob(batch_size=64))
        result["batch"] = train.batch_size
        result["steps"] = len(train)
        result["samples"] = len(train.sampler)
        result["cn_steps"] = len(controller_subset(train, 0.5, seed=0))
        try:
            train_job._data(TrainJob(batch_size=63))
            result["odd_refused"] = False
        except AtofxError:
            result["odd_refused"] = True
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_split_the_global_batch_and_take_the_same_steps(tmp_path):
    from atofx.app import train_job

    mp.start_processes(_batches, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single, _, _, _, _ = train_job._data(TrainJob(batch_size=64))
    for res in results:
        assert "error" not in res, res.get("error")
        assert res["batch"] == 32 and res["odd_refused"]
        assert res["steps"] == len(single) == math.ceil(len(single.dataset) / 64)  # as many steps as one rank
        assert res["cn_steps"] == len(controller_subset(single, 0.5, seed=0))  # and as many controller steps
    assert sum(r["samples"] for r in results) >= len(single.dataset)
