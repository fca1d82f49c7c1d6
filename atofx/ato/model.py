"""`ATOModel` and `compile()`: the analysed model (`atofx.core.analysis.Analysis`) that also trains itself with ATO,
through `ato.train(...)` or, in a custom loop, `ato.start_training(...)` and its three steps."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atofx.ato import distributed
from atofx.ato.batches import split_batch
from atofx.ato.config import MIN_EPOCHS, MIN_WINDOW_EPOCHS, MIN_WINDOW_STEPS, ATOConfig, check_options
from atofx.ato.controller import controller_batches
from atofx.ato.denormals import flush_denormal_state_
from atofx.ato.loop import fit
from atofx.ato.mixed_precision import StepPrecision
from atofx.ato.projection import ZIGParams
from atofx.ato.trainer import ATOTrainer
from atofx.core.analysis import Analysis
from atofx.core.nested import map_tensors
from atofx.core.report import spaces_table
from atofx.core.visualize import draw_spaces
from atofx.errors import AtofxError, AtofxWarning, ConfigError, DataError, ScheduleWarning
from atofx.passes.tracing import LeafSpec, branching_modules
from atofx.passes.values import device_of

# what a Python user can do about a short schedule (the command line words it in flags: atofx.app.train_command)
SCHEDULE_ADVICE = (f"Train for more epochs (at least {MIN_EPOCHS}), give the controller more data or passes "
                   "(controller_data=..., controller_epochs=...), or use method='static'.")


def schedule_warning(phases: Any, controller_batches: int, passes: int) -> str | None:
    """Why a run's schedule leaves the controller too few epochs or steps to learn its mask, or None."""
    window = phases.end - phases.start
    steps = window * controller_batches * passes
    if window >= MIN_WINDOW_EPOCHS and steps >= MIN_WINDOW_STEPS:
        return None
    return (f"with {phases.epochs} epochs the controller learns the mask in {window} epoch(s) "
            f"({steps} controller steps; it needs about {MIN_WINDOW_EPOCHS} epochs and {MIN_WINDOW_STEPS} steps) and "
            "the mask then freezes: expect a large accuracy loss.")


def _warn_before_fit(trainer: ATOTrainer, train_loader: Any) -> None:
    """What `train` says before `fit` trains the traced graph: a schedule too short, a graph of the eval branch."""
    _warn_if_short(trainer, train_loader)
    branching = branching_modules(trainer.ato.model, trainer.ato.graph)
    if branching and not trainer.ato.traced_in_train_mode:  # a custom loop trains the model itself: not said there
        warnings.warn(AtofxWarning(
            f"{branching} branches on self.training, and the model was compiled in eval mode: torch.fx recorded the "
            "eval branch, and that is what ato.train trains (running BatchNorm statistics, say, where training uses "
            "the batch's). Call model.train() before atofx.compile(...)."), stacklevel=3)


def _warn_if_short(trainer: ATOTrainer, train_loader: Any) -> None:
    """Warn when the schedule leaves the controller too little to learn from (`schedule_warning`)."""
    n = len(train_loader.dataset) if isinstance(getattr(train_loader, "dataset", None), Sized) else None
    if trainer.config.method == "ato" and n:  # without a length, fit says why it cannot train
        batches = controller_batches(n, trainer.config.controller_data, getattr(train_loader, "batch_size", None) or 1,
                                     distributed.current().world)
        window = trainer.phases.end - trainer.phases.start
        steps = len(train_loader) if isinstance(train_loader, Sized) else None
        why = schedule_warning(trainer.phases, batches, trainer.config.passes(window, batches, steps))
        if why is not None:
            warnings.warn(ScheduleWarning(why, SCHEDULE_ADVICE), stacklevel=4)


# how far above target_flops the final mask may keep FLOPs before a run says so: the benchmark's "on target" is 1 point
BUDGET_SLACK = 0.01


def _warn_if_over_budget(kept: float, config: ATOConfig) -> None:
    """Say so when the final mask keeps more FLOPs than the run asked for: caps and pins left too little to prune,
    or the controller's own mask froze above the budget (`freeze_mask="controller"`)."""
    if kept > config.target_flops + BUDGET_SLACK:
        why = ("the controller's mask froze there (the freeze mask 'controller', the official flavour's, takes it as "
               "it is; 'bisect' holds it to the budget)"
               if config.freeze_mask == "controller" else
               "what is left prunable (after max_pruned, pin and the spaces atofx pins) cannot go lower")
        warnings.warn(AtofxWarning(f"the pruned model keeps {kept:.3f} of the FLOPs, above the {config.target_flops:.3f} "
                                   f"asked for: {why}."), stacklevel=3)


class ATOModel(Analysis):
    """A model traced and analysed by atofx (`Analysis`: graph, ZIGs, channel spaces, masks, pruning) that trains
    itself once with ATO: afterwards `ato.mask` is set and `ato.prune()` gives the small model."""

    def group_norms(self) -> dict[int, torch.Tensor]:
        """Importance of every ZIG of every prunable space: the L2 norm of all its parameters (for Mask.from_scores)."""
        norms = ZIGParams.of(self).group_norms().detach().cpu()
        return {s.index: norms[torch.as_tensor(s.components)] for s in self.zigs.prunable}

    # ------------------------------------------------------------------ training
    def start_training(self, epochs: int, target_flops: float, device: str | torch.device | None = None, *,
                       ignored_layers: Iterable[Any] = (), pin: Iterable[Any] = (),
                       max_pruned: float | dict[Any, float] | None = None, **config: Any) -> ATOTrainer:
        """Set up an ATO run for a custom loop; then call after_optimizer_step, controller_step, end_epoch.

        `ignored_layers` / `pin`: layers (modules or paths) or spaces never pruned (`ato.pin`). `max_pruned`: the
        largest share of a space's channels that may go, for every space (a float) or per layer or space (a dict).
        Other keywords are ATOConfig fields (`flavour="official"` starts from `ATOConfig.official()`); an unknown one is a
        ConfigError naming the nearest valid option.
        """
        if not self.analysed:
            raise AtofxError("analyse the model first: atofx.compile(model, example_inputs) or ato.analyze(batch).")
        check_options(config, suggest=_TRAIN_KEYWORDS)
        if epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {epochs}.")
        self.pin(*ignored_layers, *pin)
        config["min_keep"] = self.min_keep(max_pruned)
        dev = resolve_device(device, self.model)
        self.model.to(dev)
        flavour = config.pop("flavour", "atofx")
        self._trainer = ATOTrainer(self, ATOConfig.of(flavour, target_flops=target_flops, **config), epochs, dev)
        self._stepped_optimizer: torch.optim.Optimizer | None = None  # the custom loop's, flushed at end_epoch
        return self._trainer

    def _active(self) -> ATOTrainer:
        if getattr(self, "_trainer", None) is None:
            raise AtofxError("no training run: call ato.train(...) or ato.start_training(...) first.")
        return self._trainer

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """ATO's projection; call it right after every `optimizer.step()` of your own loop."""
        self._active().after_optimizer_step(optimizer)
        self._stepped_optimizer = optimizer

    def controller_step(self, batch: Any, loss_fn: Any = None) -> dict[str, float]:
        """One controller update on an (inputs, targets) batch of D_CN; a no-op outside the window."""
        return self._active().controller_step(batch, loss_fn)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Close epoch `epoch` (0-based) of your own loop; updates `ato.mask` and zeroes the denormal state of the
        optimiser `after_optimizer_step` last saw, as `train` does after each epoch (`denormals`)."""
        info = self._active().end_epoch(epoch)
        self.mask = self._active().final_mask()
        if self._stepped_optimizer is not None:
            flush_denormal_state_(self._stepped_optimizer)
        return info

    def train(
        self,
        train_loader: Any,
        epochs: int,
        *,
        target_flops: float,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        loss_fn: Any = None,
        val_loader: Any = None,
        lam: float = ATOConfig.lam,
        gamma: float = ATOConfig.gamma,
        warmup: float = ATOConfig.warmup,
        controller_window: tuple[float, float] = ATOConfig.controller_window,
        controller_data: float = ATOConfig.controller_data,
        projection: str = ATOConfig.projection,
        method: str = ATOConfig.method,
        device: str | torch.device | None = None,
        amp: str | None = None,
        channels_last: bool = False,
        checkpoint_dir: str | Path | None = None,
        seed: int = ATOConfig.seed,
        log_path: str | Path | None = None,
        progress: bool = True,
        **config: Any,
    ) -> list[dict[str, Any]]:
        """Train once with ATO; afterwards `ato.mask` is set and `ato.prune()` gives the small model.

        Any other ATOConfig option goes in `config` (e.g. `step_size="share"`); `flavour="official"` starts from the
        authors' released code's choices. Resumes from `checkpoint_dir` when it holds a checkpoint of the same run.
        Without an optimizer, SGD (lr 0.1, momentum 0.9, nesterov, weight decay 5e-4) with a cosine schedule.
        `scheduler` steps once an epoch (ReduceLROnPlateau on the validation loss, else the training loss); a
        OneCycleLR sized in batches and CyclicLR step after every batch. `amp`: "bf16" autocast, or "fp16" with a
        grad scaler. Under torchrun each rank passes a loader with a DistributedSampler and the model trains through
        DistributedDataParallel. The whole model ends in train mode, as after any training loop.
        """
        torch.manual_seed(seed)
        if not self.analysed:
            first = next(iter(train_loader), None)
            if first is None:
                raise DataError("the training loader yielded no batch; check the dataset and batch_size/drop_last.")
            inputs, _ = split_batch(first)
            self.analyze(map_tensors(lambda t: t[:1], inputs))  # one sample, batch dim kept
        trainer = self.start_training(
            epochs, target_flops, device, lam=lam, gamma=gamma, warmup=warmup, controller_window=controller_window,
            controller_data=controller_data, projection=projection, method=method, seed=seed, **config)
        if optimizer is None:
            from atofx.ato.plain_training import default_optimizer

            optimizer, default_schedule = default_optimizer(self.model, epochs)
            scheduler = scheduler or default_schedule
        _warn_before_fit(trainer, train_loader)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        log = Path(log_path) if log_path is not None else (folder / "log.jsonl" if folder is not None else None)
        history = fit(trainer, train_loader, optimizer, scheduler, loss_fn or nn.functional.cross_entropy,
                      val_loader, folder, log, StepPrecision.of(amp, channels_last), progress)
        self.mask = trainer.final_mask()
        _warn_if_over_budget(self.flops(self.mask) / self.flops_model.total, trainer.config)
        self.model.train()  # the loop trained the GraphModule, whose root is not the model's: no eval root stays
        return history

    # ------------------------------------------------------------------ presentation
    def report(self) -> str:
        """A table: space, width, producers, consumers, share of FLOPs, pinned and why."""
        return spaces_table(self)

    def visualize(self, path: str | Path, view: str = "auto", timeout: float = 60.0) -> Path:
        """Draw the graph, one colour per space; returns the file written.

        `view`: "layers" (one box per layer), "spaces" (one box per channel space, edges through the layers that
        join them) or "auto" (the space view for graphs of over 250 layers). Without graphviz's `dot`, or when
        it needs more than `timeout` seconds, the `.dot` source is written instead, with a warning.
        """
        return draw_spaces(self, Path(path), view, timeout)


# ato.train's own keywords: named in the suggestions for a mistyped option
_TRAIN_KEYWORDS = ["ignored_layers", "pin", "max_pruned",
                   *(p for p in inspect.signature(ATOModel.train).parameters if p not in ("self", "config"))]


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """'auto' picks CUDA when present; None keeps the model where it is; CUDA without a GPU is refused.

    Under torchrun, 'cuda' and 'auto' mean the GPU of this rank's LOCAL_RANK.
    """
    if device is None:
        here = device_of(model)
        return here if here is not None else torch.device("cpu")
    if device == "auto":
        return distributed.rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA GPU is available; use device='cpu' or 'auto'.")
    return distributed.rank_device(dev)


def compile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> ATOModel:
    """Trace `model` with torch.fx and, given example inputs, infer its zero-invariant groups."""
    return ATOModel.traced(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
