"""`atofx train`: one ATO run from data to a pruned model on disk, with a summary table."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import atofx
from atofx.cifar_models import CIFAR_MODELS
from atofx.errors import AtofxError
from atofx.model import resolve_device
from atofx.plain_training import train_plain
from atofx.report import format_table
from atofx.trainer import evaluate

DATASETS = ("digits",)
# digits has 1437 training images: the paper's 5% would give the controller two steps an epoch
CONTROLLER_DATA = {"digits": 0.5}


@dataclass
class TrainJob:
    """Everything `atofx train` needs; the defaults are the embedded digits run."""

    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 30
    batch_size: int = 64
    target_flops: float = 0.5
    method: str = "ato"
    projection: str = "prox"
    device: str = "cpu"
    seed: int = 0
    out: str = "atofx-out"
    dense_reference: bool = True
    progress: bool = True
    controller_data: float | None = None  # None: the dataset's recipe (0.05 as in the paper, 0.5 on digits)


def _data(job: TrainJob) -> tuple[Any, Any, int, int, tuple[int, ...]]:
    """(train loader, val loader, classes, input channels, example input shape)."""
    if job.dataset == "digits":
        from atofx.datasets import digits_loaders

        train, val = digits_loaders(job.batch_size, job.seed)
        return train, val, 10, 1, (1, 1, 8, 8)
    raise AtofxError(f"unknown dataset {job.dataset!r}; available: {', '.join(DATASETS)}.")


def _model(job: TrainJob, classes: int, channels: int) -> nn.Module:
    torch.manual_seed(job.seed)
    if job.model in CIFAR_MODELS:
        return CIFAR_MODELS[job.model](num_classes=classes, in_channels=channels)
    from atofx.model_zoo import resolve_model

    model, _ = resolve_model(job.model)
    return model


def run(job: TrainJob) -> dict[str, Any]:
    """Train the dense reference (optional) and ATO, prune, and write OUT/: pruned model, summary, log, picture."""
    started = time.perf_counter()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(job.device, nn.Linear(1, 1))
    train_loader, val_loader, classes, channels, example_shape = _data(job)
    loss_fn = nn.functional.cross_entropy
    model = _model(job, classes, channels)
    dense_model = copy.deepcopy(model)
    example = (torch.randn(example_shape, generator=torch.Generator().manual_seed(job.seed)),)

    accuracy_dense = None
    dense_file = out / "dense.json"
    if job.dense_reference:
        if dense_file.exists():
            accuracy_dense = json.loads(dense_file.read_text())["accuracy_dense"]
        else:
            train_plain(dense_model, train_loader, job.epochs, device, job.seed, loss_fn, job.progress)
            accuracy_dense = evaluate(dense_model, val_loader, device, loss_fn)["accuracy"]
            dense_file.write_text(json.dumps({"accuracy_dense": accuracy_dense}))

    ato = atofx.compile(model, example)
    flops_before, params_before = atofx.count_flops(model, example), atofx.count_params(model)
    ato.visualize(out / "zigs.svg")
    ato.train(train_loader, job.epochs, target_flops=job.target_flops, val_loader=val_loader, method=job.method,
              projection=job.projection, device=device, seed=job.seed, checkpoint_dir=out / "checkpoints",
              log_path=out / "log.jsonl", progress=job.progress,
              controller_data=job.controller_data or CONTROLLER_DATA.get(job.dataset, 0.05))
    accuracy_trained = evaluate(model, val_loader, device, loss_fn)["accuracy"]
    small = ato.prune()
    accuracy_pruned = evaluate(small, val_loader, device, loss_fn)["accuracy"]
    small_cpu = copy.deepcopy(small).cpu()
    flops_after, params_after = atofx.count_flops(small_cpu, example), atofx.count_params(small_cpu)
    atofx.save(small_cpu, out / "pruned.pt", example)
    summary = {
        "model": job.model,
        "dataset": job.dataset,
        "method": job.method,
        "target_flops": job.target_flops,
        "flops_kept": flops_after / flops_before,
        "pruned_flops": 1.0 - flops_after / flops_before,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "params_before": params_before,
        "params_after": params_after,
        "accuracy_dense": accuracy_dense,
        "accuracy_trained": accuracy_trained,
        "accuracy_pruned": accuracy_pruned,
        "epochs": job.epochs,
        "seconds": time.perf_counter() - started,
        "job": asdict(job),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_table(s: dict[str, Any]) -> str:
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    rows = [
        ["dense", acc(s["accuracy_dense"]), f"{s['flops_before'] / 1e6:.2f}", f"{s['params_before'] / 1e3:.1f}", "1.000"],
        ["ATO trained", acc(s["accuracy_trained"]), f"{s['flops_before'] / 1e6:.2f}", f"{s['params_before'] / 1e3:.1f}",
         "1.000"],
        ["ATO pruned", acc(s["accuracy_pruned"]), f"{s['flops_after'] / 1e6:.2f}", f"{s['params_after'] / 1e3:.1f}",
         f"{s['flops_kept']:.3f}"],
    ]
    table = format_table(["model", "accuracy", "MFLOPs", "kparams", "FLOPs kept"], rows)
    return (f"{s['model']} on {s['dataset']}, {s['epochs']} epochs, target {s['target_flops']:.2f} of FLOPs kept "
            f"({s['seconds']:.0f} s)\n{table}")
