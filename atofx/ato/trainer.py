"""Auto-Train-Once (Algorithms 1 and 2): train the model and a controller that picks its mask.

Every mini-batch the target model takes an ordinary optimiser step, then (after warm-up) a
group projection shrinks the ZIGs the controller drops (lambda_g = lambda * (1 - w_g)).
Inside the controller window, the controller is trained on a small fixed subset of the data
(D_CN) through the mask nodes, with loss CE + gamma * R_FLOPs. After the window the mask is
frozen, lambda rises, and at the end the dropped ZIGs are exactly zero, so the trained model
equals its pruned version. `method="static"` is the OTO-style baseline: one mask chosen by
group-norm saliency at the window start, never changed.

Controller steps run the model in eval mode (running BN statistics are not disturbed by
masked activations) with the model's parameters frozen; only the controller learns.

Where the paper, the authors' released code and atofx differ, `ATOConfig` has an option for each
choice (atofx's is the default); `ATOConfig.official()` turns on every choice of the released code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from atofx.ato import checkpoint as ckpt
from atofx.ato import distributed
from atofx.ato.controller import Controller, Masks
from atofx.ato.flops_regularizer import controller_loss
from atofx.ato.mixed_precision import StepPrecision
from atofx.ato.projection import ZIGParams
from atofx.core.mask import Mask, keep_at_least, rounded_count
from atofx.errors import AtofxError, ConfigError, DataError, ShapeError
from atofx.passes.instrument import instrument

if TYPE_CHECKING:
    from atofx.ato.model import ATOModel


FLAVOURS = ("atofx", "official")
# ATOConfig.official(): the authors' released code (xidongwu/AutoTrainOnce, ImageNet scripts), choice by choice
OFFICIAL: dict[str, Any] = {
    "step_size": "share",  # project_wegit: lam * r_l * lr
    "lam_schedule": "jump",  # lmd 0: lambda 10, then 1000 from epoch (E-5)/2
    "lam_boost": 100.0,  # 10 -> 1000
    "sampling": "official",  # one Gumbel; soft mask in CE, hard in FLOPs; the mask a sample drawn per epoch
    "regularizer": "official",  # two-sided, +-0.005 dead band, weight 2 * gamma
    "controller_optimizer": "adamw",  # AdamW lr 1e-3 wd 1e-2, lr x0.1 at 98% of the window's end
    "head_bias": False,  # nn.Linear(256, width, bias=False)
    "freeze_mask": "controller",  # no bisection: the frozen mask is the controller's sample
    "search_space": "internal",  # gates inside residual blocks only
}


@dataclass
class ATOConfig:
    """Hyper-parameters of one ATO run; each default is defined here once (paper values, atofx's choices).

    The options after `seed` choose between atofx's behaviour (default) and the authors' released code's
    (`OFFICIAL`; `ATOConfig.official()` sets them all); docs/design-notes.md explains each one.
    """

    target_flops: float = 0.5  # fraction of the dense FLOPs kept
    lam: float = 10.0
    gamma: float = 4.0
    warmup: float = 0.2  # share of epochs before projections start (T_w)
    controller_window: tuple[float, float] = (0.1, 0.5)  # (T_start, T_end) as shares of epochs
    controller_data: float = 0.05  # share of the training set in D_CN
    controller_lr: float = 1e-3
    controller_epochs: int = 1  # passes over D_CN per epoch in the window
    projection: str = "prox"  # "prox" (Eq. 3) or "hsp" (OTO's half-space projector, Eq. 2)
    method: str = "ato"  # "ato" or "static"
    tau: float = 0.4
    offset: float = 3.0
    lam_boost: float = 10.0  # lambda multiplier after the freeze: reached at the last epoch ("ramp") or at once ("jump")
    round_to: int = 1  # the frozen mask keeps a multiple of this many ZIGs per space (1: any number)
    seed: int = 0
    # a dropped ZIG's lambda: "lr" lam (each dropped group shrinks by lr * lam a step); "share" lam * r_l,
    # r_l = its space's share of all dropped ZIGs (official: project_wegit's lam * ratio * lr)
    step_size: str = "lr"
    # "ramp": lambda rises linearly from lam at the freeze to lam * lam_boost at the last epoch;
    # "jump": lambda is lam * lam_boost from epoch round(lam_jump_at * epochs) on (official: (E-5)/2 of E = 245)
    lam_schedule: str = "ramp"
    lam_jump_at: float = 0.49  # "jump" only: 120 / 245, the official epoch as a share of the run
    hsp_eps: float = 0.1  # projection "hsp": OTO's epsilon (the authors' --epsilon)
    # "atofx": logistic noise, the hard mask in both loss terms, the noise-free mask projects and freezes;
    # "official": one Gumbel, soft mask in the CE term, hard straight-through in the FLOPs term, and the mask
    # that projects (and freezes) a hard sample drawn at the end of each window epoch
    sampling: str = "atofx"
    regularizer: str = "paper"  # "paper": gamma * one-sided log; "official": 2 * gamma * two-sided, +-0.005 band
    # "adam": Adam(controller_lr); "adamw": AdamW(controller_lr, weight decay 1e-2 on weights), lr x0.1 from
    # epoch int(0.98 * T_end)
    controller_optimizer: str = "adam"
    head_bias: bool = True  # the controller's heads have a bias (official: none)
    # the mask frozen at T_end: "bisect" raises the logit threshold until the FLOPs model meets the target;
    # "controller" takes the controller's mask as it is; "dead" takes it and drops the kept ZIGs whose
    # parameters are all exactly zero (dead channels cost FLOPs and give nothing); neither bisects
    freeze_mask: str = "bisect"
    search_space: str = "all"  # "all": every prunable space; "internal": only spaces inside one block (official)
    min_keep: dict[int, int] = field(default_factory=dict)  # space index -> fewest ZIGs kept (ato.train's max_pruned)

    @classmethod
    def official(cls, **overrides: Any) -> ATOConfig:
        """Every choice of the authors' released code (`OFFICIAL`), then `overrides`."""
        return cls(**(OFFICIAL | overrides))

    @classmethod
    def of(cls, flavour: str = "atofx", **options: Any) -> ATOConfig:
        """The config of a flavour ("atofx": the defaults; "official": `official()`), then `options`."""
        if flavour not in FLAVOURS:
            raise ConfigError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}.")
        try:
            return cls.official(**options) if flavour == "official" else cls(**options)
        except TypeError as exc:
            known = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"{exc}; ATO's options are: {known}.") from None

    def validate(self) -> None:
        if not 0.0 < self.target_flops <= 1.0:
            raise ConfigError(f"target_flops is the share of FLOPs kept and must be in (0, 1], got {self.target_flops}.")
        if self.method not in ("ato", "static"):
            raise ConfigError(f"method must be 'ato' or 'static', got {self.method!r}.")
        if self.projection not in ("prox", "hsp"):
            raise ConfigError(f"projection must be 'prox' or 'hsp', got {self.projection!r}.")
        start, end = self.controller_window
        if not 0.0 <= start < end <= 1.0:
            raise ConfigError(f"controller_window must satisfy 0 <= start < end <= 1, got {self.controller_window}.")
        if not 0.0 < self.controller_data <= 1.0:
            raise ConfigError(f"controller_data must be in (0, 1], got {self.controller_data}.")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a whole number of channels >= 1 (8 or 16 suit most CPUs and GPUs), "
                              f"got {self.round_to!r}.")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r} "
                                  f"(--{name.replace('_', '-')} on the command line).")
        if not 0.0 <= self.lam_jump_at <= 1.0:
            raise ConfigError(f"lam_jump_at is a share of the epochs, in [0, 1], got {self.lam_jump_at}.")
        if not 0.0 <= self.hsp_eps < 1.0:
            raise ConfigError(f"hsp_eps (OTO's epsilon) must be in [0, 1), got {self.hsp_eps}.")
        if self.lam < 0 or self.lam_boost < 1.0:
            raise ConfigError(f"lam must be >= 0 and lam_boost >= 1, got lam={self.lam}, lam_boost={self.lam_boost}.")
        if not isinstance(self.head_bias, bool):
            raise ConfigError(f"head_bias must be True or False, got {self.head_bias!r}.")


# the values each option with a fixed set of them accepts (defaults: ATOConfig; official: OFFICIAL)
CHOICES: dict[str, tuple[str, ...]] = {
    "step_size": ("lr", "share"),
    "lam_schedule": ("ramp", "jump"),
    "sampling": ("atofx", "official"),
    "regularizer": ("paper", "official"),
    "controller_optimizer": ("adam", "adamw"),
    "freeze_mask": ("bisect", "controller", "dead"),
    "search_space": ("all", "internal"),
}


@dataclass
class Phases:
    """Epoch boundaries of a run: warm-up end, controller window start and end."""

    epochs: int
    warmup: int
    start: int
    end: int

    @classmethod
    def of(cls, config: ATOConfig, epochs: int) -> Phases:
        start = min(round(config.controller_window[0] * epochs), epochs - 1)
        end = min(max(round(config.controller_window[1] * epochs), start + 1), epochs)
        return cls(epochs, round(config.warmup * epochs), start, end)


@dataclass
class TrainState:
    epoch: int = 0
    frozen: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def split_batch(batch: Any) -> tuple[tuple, Tensor]:
    """(model inputs, targets) from a `(inputs, targets)` batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ShapeError("each batch must be an (inputs, targets) pair; wrap your dataset to yield that.")
    x, y = batch
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def loader_length(loader: Any) -> int:
    """Batches per epoch of a training loader; refused when it has no length or no batch."""
    try:
        n = len(loader)
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            len(dataset)
    except TypeError as exc:
        raise DataError(
            "the training loader has no length (an IterableDataset or a generator): ATO needs a map-style dataset "
            "(__len__ and __getitem__) in a DataLoader, to draw the controller's subset and to resume by epoch."
        ) from exc
    if n == 0:
        raise DataError("the training loader yielded no batch; check the dataset and batch_size/drop_last.")
    return n


def main_output(out: Any) -> Any:
    """The logits of a model output: the tensor itself, a tuple's first entry, a dict's 'logits'/'out' or first."""
    if isinstance(out, (tuple, list)) and out:
        return main_output(out[0])
    if isinstance(out, dict) and out:
        key = next((k for k in ("logits", "out") if k in out), next(iter(out)))
        return main_output(out[key])
    return out


def _leaves(x: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(x, dict):
        return [leaf for k, v in x.items() for leaf in _leaves(v, f"{path}[{k!r}]")]
    if isinstance(x, (tuple, list)):
        return [leaf for i, v in enumerate(x) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, x)]


def _kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() or t.is_complex() else "integer"


def _shape(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def check_inputs(example: tuple | None, inputs: tuple) -> list[str]:
    """Refuse batch inputs whose structure, rank or dtype differ from the analysed example inputs.

    Returns the inputs whose sizes (batch dim aside) or precision differ: allowed if the model runs
    on them (another resolution), reported if it does not.
    """
    if example is None:
        return []
    want = [leaf for i, x in enumerate(example) for leaf in _leaves(x, f"input {i}")]
    got = [leaf for i, x in enumerate(inputs) for leaf in _leaves(x, f"input {i}")]
    if [p for p, _ in want] != [p for p, _ in got]:
        raise ShapeError(
            f"the batch inputs ({', '.join(p for p, _ in got)}) do not match the model's example inputs "
            f"({', '.join(p for p, _ in want)}): each batch must be (inputs, targets) with inputs laid out like "
            "the example inputs given to atofx.compile.")
    resized = []
    for (path, e), (_, g) in zip(want, got, strict=True):
        if not isinstance(e, Tensor) or not isinstance(g, Tensor):
            continue
        if _kind(e) != _kind(g):
            raise ShapeError(
                f"batch {path} is {_shape(g)} but the model expects {_kind(e)} values like its example "
                f"{_shape(e)}: convert the batch (x.float() for images, e.g. torchvision's ToTensor).")
        if g.dim() != e.dim():
            raise ShapeError(
                f"batch {path} has shape {tuple(g.shape)} but the model expects {e.dim()} dims like its example "
                f"{tuple(e.shape)} (batch dim first): reshape the batch or pass matching example inputs.")
        if tuple(g.shape[1:]) != tuple(e.shape[1:]) or g.dtype != e.dtype:
            resized.append(f"batch {path} is {_shape(g)} but the model was analysed with {_shape(e)} "
                           "(batch dim aside)")
    return resized


def checked_forward(model: nn.Module, inputs: tuple, example: tuple | None) -> Any:
    """`model(*inputs)` for the first batch of an epoch: a batch that does not fit raises ShapeError."""
    resized = check_inputs(example, inputs)
    if not resized:
        return model(*inputs)
    try:
        return model(*inputs)
    except (RuntimeError, ValueError, IndexError) as exc:
        cause = str(exc).strip().splitlines()
        raise ShapeError(f"{'; '.join(resized)}, and the model fails on it ({type(exc).__name__}: "
                         f"{cause[0] if cause else ''}). Make the batches match the model's input.") from None


def check_targets(out: Any, targets: Any, loss_fn: Any) -> None:
    """With a cross-entropy loss: labels are class indices within the output width, or class probabilities.

    `out` is the model's output or the example output's meta tensors (shapes only). One host sync,
    on the first batch of an epoch only.
    """
    if loss_fn is nn.functional.cross_entropy:
        ignore = -100
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        ignore = loss_fn.ignore_index
    else:
        return
    logits = main_output(out)
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor) or logits.dim() < 2:
        return
    classes = logits.shape[1]
    expected = f"integer class indices of shape (batch,{' ...' if logits.dim() > 2 else ''}) or class " \
               f"probabilities of shape (batch, {classes}{', ...' if logits.dim() > 2 else ''})"
    if targets.is_floating_point():
        if targets.dim() != logits.dim() or targets.shape[1] != classes:
            raise ShapeError(f"the labels are {_shape(targets)}; cross-entropy on the model's {classes} outputs "
                             f"expects {expected}: convert class labels with y.long().")
        return
    if _kind(targets) != "integer" or targets.dim() != logits.dim() - 1:
        raise ShapeError(f"the labels are {_shape(targets)}; cross-entropy on the model's {classes} outputs "
                         f"expects {expected}.")
    bad = (targets != ignore) & ((targets < 0) | (targets >= classes))
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ShapeError(
            f"label {value} is out of range for the model's {classes} outputs (classes 0..{classes - 1}): give the "
            "model as many outputs as the dataset has classes (num_classes), or fix the labels.")


def _hits(out: Any, targets: Tensor) -> Tensor:
    """Correct top-1 predictions in a batch (soft labels: their argmax is the class)."""
    pred = main_output(out).detach().argmax(dim=1 if main_output(out).dim() > 1 else -1)
    if targets.is_floating_point() and targets.dim() > 1:
        targets = targets.argmax(dim=1)
    return (pred == targets).sum()


def gated_spaces(ato: ATOModel, search_space: str) -> list[int]:
    """The indices of the spaces the controller gates: every prunable one ("all"), or those inside one block.

    A space is block-internal when all its producers and consumers lie inside one module that is a block
    (a module with submodules, other than the model itself and the containers Sequential/ModuleList/ModuleDict;
    the innermost such module around them decides): a ResNet block's conv1 -> conv2 channels, a MobileNetV2
    block's expanded width. Residual streams, the stem and the head span several blocks and are not gated:
    the authors' code gates the block-internal spaces only.
    """
    prunable = ato.zigs.prunable
    if search_space == "all":
        return [s.index for s in prunable]
    modules = dict(ato.model.named_modules())
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def internal(space: Any) -> bool:
        names = [n.split(".") for n in (*space.producers, *space.consumers)]
        common: list[str] = []
        for parts in zip(*names, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        while common:  # the innermost block around them; a layer called twice is no block
            module = modules.get(".".join(common))
            if module is not None and not isinstance(module, containers) and next(module.children(), None):
                return True
            common.pop()
        return False

    chosen = [s.index for s in prunable if internal(s)]
    if not chosen:
        raise ConfigError("search_space 'internal' found no channel space inside a block (residual or inverted-"
                          "residual block module) in this model; use search_space='all' (--search-space all).")
    return chosen


class ATOTrainer:
    """The state of one ATO run over an analysed `ATOModel`, step by step."""

    def __init__(self, ato: ATOModel, config: ATOConfig, epochs: int, device: torch.device):
        config.validate()
        self.ato, self.config, self.device = ato, config, device
        self.phases = Phases.of(config, epochs)
        zigs = ato.zigs
        if not zigs.prunable:
            from atofx.errors import NoPrunableSpaceError

            raise NoPrunableSpaceError(
                "the model has no prunable channel space; ato.report() lists why each one is pinned.")
        self.gm = fx.GraphModule(ato.graph_module, copy.deepcopy(ato.graph_module.graph))
        self.slots = instrument(self.gm, zigs)
        self.gm.to(device)
        # target-model steps and evaluation run the graph without mask nodes (same parameters, no overhead)
        self.model = ato.graph_module
        self.params = ZIGParams.of(ato)
        self.flops = ato.flops_model
        self.gated = gated_spaces(ato, config.search_space)
        self.controller = Controller.from_zigs(zigs, seed=config.seed, spaces=self.gated,
                                               head_bias=config.head_bias).to(device)
        self.controller_opt = self._controller_optimizer()
        if config.projection == "hsp":
            self.params.remember_()  # the point before the first step
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.mask: Masks = {s.index: torch.ones(s.width, device=device) for s in zigs.prunable}
        self.state = TrainState()
        ids = [int(c) for s in zigs.prunable for c in s.components]
        self._prunable_ids = torch.as_tensor(ids, dtype=torch.long)
        # ZIGs dropped by a mask that projected in some epoch (for zigs_revived), by position in _prunable_ids
        self.ever_dropped = torch.zeros(len(ids), dtype=torch.bool)
        # what batches are checked against; concrete_args fill some of the example's entries themselves
        self.example_inputs = None if ato.trace_options.get("concrete_args") else ato.example_inputs

    def _controller_optimizer(self) -> torch.optim.Optimizer:
        """Adam, or AdamW with weight decay 1e-2 on the weights only (the authors' `group_weight`).

        The fused kernel where torch has one: the controller has ~35 small tensors, and Adam's loop over them
        cost more than their update (ResNet-20: 1.4 ms a step, fused 0.3 ms).
        """
        fused = self.device.type in ("cpu", "cuda")
        lr = self.config.controller_lr
        if self.config.controller_optimizer == "adam":
            return torch.optim.Adam(self.controller.parameters(), lr=lr, fused=fused)
        decay = [p for n, p in self.controller.named_parameters() if p.ndim > 1]
        rest = [p for n, p in self.controller.named_parameters() if p.ndim <= 1]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 1e-2}, {"params": rest, "weight_decay": 0.0}],
                                 lr=lr, fused=fused)

    # ------------------------------------------------------------------ the three user-facing steps
    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Project the dropped ZIGs after an optimiser step (no-op during warm-up)."""
        hsp = self.config.projection == "hsp"
        lam = self._lambdas() if self.state.epoch >= self.phases.warmup else None
        if lam is not None:  # None: warm-up, or nothing dropped: the projection is the identity
            lr = self._step_size(optimizer)
            if hsp:
                self.params.half_space_project_(lam, lr, self.config.hsp_eps)
            else:
                self.params.proximal_group_lasso_(lam, lr)
        if hsp:  # the point before the next step, which its half-space test compares with
            self.params.remember_()

    def _lambdas(self) -> Tensor | None:
        """lambda_g per ZIG, rebuilt only when the mask or lambda changes (the hot loop stays cheap)."""
        lam_now = self.lam_now()
        cached = getattr(self, "_lam_cache", None)
        if cached is None or cached[0] is not self.mask or cached[1] != lam_now:
            lam = self.params.group_lambdas(self.mask, lam_now, per_space_share=self.config.step_size == "share")
            cached = (self.mask, lam_now, lam if bool((lam > 0).any()) else None)
            self._lam_cache = cached
        return cached[2]

    def _step_size(self, optimizer: torch.optim.Optimizer) -> float:
        """The optimiser's learning rate for the ZIG parameters, looked up again only when a rate changes."""
        rates = tuple(g["lr"] for g in optimizer.param_groups)
        cached = getattr(self, "_lr_cache", None)
        if cached is None or cached[0] is not optimizer or cached[1] != rates:
            cached = (optimizer, rates, self.params.step_size(optimizer))
            self._lr_cache = cached
        return cached[2]

    def _full(self, masks: Masks) -> Masks:
        """`masks` for the gated spaces, completed with all-ones masks for the other prunable spaces."""
        return {s.index: masks[s.index] if s.index in masks else torch.ones(s.width, device=self.device)
                for s in self.ato.zigs.prunable}

    def controller_step(self, batch: Any, loss_fn: Callable[[Any, Tensor], Tensor] | None = None) -> dict[str, float]:
        """One controller update on a D_CN batch (no-op outside the controller window)."""
        if not self.in_window():
            return {}
        inputs, targets = split_batch(_to(batch, self.device))
        loss_fn = loss_fn or nn.functional.cross_entropy
        cfg = self.config
        for g in self.controller_opt.param_groups:
            g["lr"] = self.controller_lr()
        if cfg.sampling == "official":  # two draws, as the authors' forward() and resource_output() make
            soft = self.controller.sample(hard=False, tau=cfg.tau, offset=cfg.offset, generator=self.generator,
                                          noise="gumbel")
            hard = self.controller.sample(hard=True, tau=cfg.tau, offset=cfg.offset, generator=self.generator,
                                          noise="gumbel")
            keep, keep_flops = self.flops.keep_vector(soft), self.flops.keep_vector(hard)
        else:
            masks = self.controller.sample(hard=True, tau=cfg.tau, offset=cfg.offset, generator=self.generator)
            keep = keep_flops = self.flops.keep_vector(masks)
        self.slots.set(keep)
        model_params = [p for p in self.gm.parameters() if p.requires_grad]
        was_training = self.gm.training
        try:
            for p in model_params:
                p.requires_grad_(False)
            self.gm.eval()
            task = loss_fn(self.gm(*inputs), targets)
            p = self.flops.of_vector(keep_flops)
            loss = controller_loss(task, p, cfg.target_flops, self.flops.total, cfg.gamma, cfg.regularizer)
            self.controller_opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.controller.parameters())  # same step, same mask on every rank
            self.controller_opt.step()
        finally:
            self.slots.set(None)
            self.gm.train(was_training)
            for p_ in model_params:
                p_.requires_grad_(True)
        if cfg.sampling != "official":  # official: the mask is drawn once, at the end of the epoch
            self.mask = self.current_mask()
        return {"controller_loss": float(loss.detach()), "sampled_flops_kept": float(p.detach()) / self.flops.total}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Close epoch `epoch` (0-based): pick, freeze or finalise the mask as the schedule says.

        Returns the mask's FLOPs, whether it is frozen, and the ZIG counts (`zig_counts`).
        """
        was_in_window = self.in_window()
        self.state.epoch = epoch + 1
        ph = self.phases
        if self.config.method == "static" and self.state.epoch == max(ph.start, 1):  # window start 0: first epoch end
            self.mask = self.saliency_mask()
        if was_in_window and self.config.sampling == "official":
            self.mask = self.sampled_mask()
        if self.state.epoch >= ph.end and not self.state.frozen:
            self.state.frozen = True
            if self.config.method == "ato":
                self.mask = self.frozen_mask()
        if self.state.epoch >= ph.epochs:
            self.params.zero_(self.params.keep_vector(self.mask) == 0)
        counts = self.zig_counts()
        if self.state.epoch >= ph.warmup:  # the mask now projects in the next epoch
            self.ever_dropped |= self._dropped()
        return {"frozen": self.state.frozen, "flops_kept": self.flops_kept(), **counts}

    # ------------------------------------------------------------------ helpers
    def in_window(self) -> bool:
        ph = self.phases
        return self.config.method == "ato" and ph.start <= self.state.epoch < ph.end and not self.state.frozen

    def controller_lr(self) -> float:
        """The controller's learning rate now: x0.1 from epoch int(0.98 * T_end) with AdamW (the official schedule)."""
        late = self.state.epoch >= int(0.98 * self.phases.end)
        return self.config.controller_lr * (0.1 if self.config.controller_optimizer == "adamw" and late else 1.0)

    def lam_now(self) -> float:
        cfg, ph = self.config, self.phases
        if cfg.lam_schedule == "jump":
            return cfg.lam * (cfg.lam_boost if self.state.epoch >= round(cfg.lam_jump_at * ph.epochs) else 1.0)
        if not self.state.frozen:
            return cfg.lam
        progress = (self.state.epoch - ph.end + 1) / max(ph.epochs - ph.end, 1)
        return cfg.lam * (1.0 + (cfg.lam_boost - 1.0) * min(progress, 1.0))

    def flops_kept(self) -> float:
        return float(self.flops({k: v.double() for k, v in self.mask.items()})) / self.flops.total

    def _dropped(self) -> Tensor:
        """Per prunable ZIG (in `_prunable_ids` order): dropped by the current mask."""
        return (self.params.keep_vector(self.mask) == 0).cpu()[self._prunable_ids]

    @torch.no_grad()
    def zig_counts(self) -> dict[str, int]:
        """zigs_dropped: 0 bits in the mask; zigs_zero: ZIGs whose parameters are all exactly zero;
        zigs_revived: ZIGs kept now that a mask dropped in an earlier epoch after warm-up, and not zero."""
        dropped = self._dropped()
        zero = (self.params.group_norms() == 0).cpu()[self._prunable_ids]
        revived = ~dropped & self.ever_dropped & ~zero
        return {"zigs_dropped": int(dropped.sum()), "zigs_zero": int(zero.sum()), "zigs_revived": int(revived.sum())}

    @torch.no_grad()
    def current_mask(self) -> Masks:
        """The controller's deterministic mask; a space it would empty keeps its channel of largest logit,
        since a layer of width 0 cannot be built (and the pruned model must exist)."""
        return self._full(self._never_empty(self.controller.mask(self.config.offset)))

    @torch.no_grad()
    def sampled_mask(self) -> Masks:
        """A hard mask drawn from the controller with one Gumbel noise (the official code's per-epoch mask)."""
        cfg = self.config
        masks = self.controller.sample(hard=True, tau=cfg.tau, offset=cfg.offset, generator=self.generator,
                                       noise="gumbel")
        return self._full(self._never_empty({k: v.detach() for k, v in masks.items()}))

    def _never_empty(self, masks: Masks) -> Masks:
        empty = [k for k, m in masks.items() if not bool(m.any())]
        if empty:
            logits = self.controller()
            for k in empty:
                masks[k][logits[k].argmax()] = 1.0
        if self.config.min_keep:
            logits = self.controller()
            masks = {k: keep_at_least(m, logits[k], self.config.min_keep.get(k, 0)) for k, m in masks.items()}
        return masks

    def final_mask(self) -> Mask:
        return Mask({k: v.detach().cpu().bool() for k, v in self.mask.items()})

    @torch.no_grad()
    def frozen_mask(self) -> Masks:
        """The mask frozen at the window's end, as `freeze_mask` says: bisected to the budget (`budget_mask`),
        the controller's own, or the controller's less its dead ZIGs (all parameters exactly zero). With
        `round_to`, the last two move each space's count to a multiple of it, keeping the controller's bits
        first, then its best logits."""
        how = self.config.freeze_mask
        if how == "bisect":
            return self.budget_mask()
        mask = {k: v.clone() for k, v in self.mask.items()}
        if how == "dead":
            zero = self.params.group_norms() == 0
            for s in self.ato.zigs.prunable:
                if s.index in self.gated:
                    dead = zero[torch.as_tensor(s.components, device=zero.device)].to(mask[s.index].device)
                    mask[s.index] = torch.where(dead, 0.0, mask[s.index])
        gated = self._never_empty({k: mask[k] for k in self.gated})
        if self.config.round_to > 1:
            logits = self.controller()
            for k, m in gated.items():
                n = rounded_count(int(m.sum()), len(m), self.config.round_to)
                score = m.double() * 1e6 + logits[k].double()
                gated[k] = torch.zeros_like(m).index_fill_(0, score.topk(n).indices, 1.0)
        return self._full(gated)

    @torch.no_grad()
    def budget_mask(self) -> Masks:
        """The mask frozen at the window's end: the controller's, with its logit threshold raised until the
        FLOPs model keeps at most the target. The regulariser brings the *sampled* masks to the budget; the
        noiseless mask can stay above it, and a run must end at the FLOPs it was asked for. With `round_to`,
        each space's kept count moves to a multiple of it (`rounded_count`), best logits first."""
        if self.config.round_to == 1 and self.flops_kept() <= self.config.target_flops:
            return self.mask
        logits = {k: v + self.config.offset for k, v in self.controller().items()}
        return self._threshold_for_target(logits)

    @torch.no_grad()
    def saliency_mask(self) -> Masks:
        """Static baseline: keep the ZIGs of largest relative group norm until the FLOPs target is met."""
        norms = self.params.group_norms()
        rel = {}
        for s in self.ato.zigs.prunable:
            if s.index in self.gated:
                n = norms[torch.as_tensor(s.components, device=norms.device)]
                rel[s.index] = n / n.mean().clamp_min(1e-12)
        return self._threshold_for_target(rel)

    def _threshold_for_target(self, scores: dict[int, Tensor]) -> Masks:
        """Keep the ZIGs whose score exceeds one threshold (>= 0), bisected so that the FLOPs model keeps at most
        the target; every space keeps at least its best-scored ZIG, and a count `rounded_count` allows."""
        multiple = self.config.round_to

        def mask_at(t: float) -> Masks:
            out = {}
            for k, r in scores.items():
                m = (r > t).to(torch.float64)
                m[r.argmax()] = 1.0
                if multiple > 1:
                    n = rounded_count(int(m.sum()), len(r), multiple)
                    m = torch.zeros_like(m).index_fill_(0, r.topk(n).indices, 1.0)
                out[k] = keep_at_least(m, r, self.config.min_keep.get(k, 0))
            return out

        lo, hi = 0.0, max(float(r.max()) for r in scores.values()) + 1.0
        target = self.config.target_flops * self.flops.total
        for _ in range(40):
            mid = (lo + hi) / 2
            if float(self.flops(mask_at(mid))) > target:
                lo = mid
            else:
                hi = mid
        return self._full({k: v.to(self.device, torch.float32) for k, v in mask_at(hi).items()})

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self, n_batches: int) -> dict[str, Any]:
        shapes = [[k, list(v.shape)] for k, v in self.ato.model.state_dict().items()]
        digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]  # hash() differs per process
        return {"model": digest, "config": json.dumps(asdict(self.config), sort_keys=True),
                "epochs": self.phases.epochs, "batches_per_epoch": n_batches, "ranks": distributed.current().world}

    def state_dict(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
        return {
            "model": self.ato.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "controller": self.controller.state_dict(),
            "controller_opt": self.controller_opt.state_dict(),
            "mask": {str(k): v.cpu() for k, v in self.mask.items()},
            "epoch": self.state.epoch,
            "frozen": self.state.frozen,
            "history": self.state.history,
            "ever_dropped": self.ever_dropped.clone(),
            "generator": self.generator.get_state(),
            "rng": distributed.gather_objects(ckpt.rng_state()),  # one per rank: each resumes its own streams
        }

    def load_state_dict(self, saved: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.ato.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved["scheduler"] is not None:
            scheduler.load_state_dict(saved["scheduler"])
        self.controller.load_state_dict(saved["controller"])
        self.controller_opt.load_state_dict(saved["controller_opt"])
        self.mask = {int(k): v.to(self.device) for k, v in saved["mask"].items()}
        self.state = TrainState(saved["epoch"], saved["frozen"], list(saved["history"]))
        self.ever_dropped = saved["ever_dropped"].clone()
        if self.config.projection == "hsp":
            self.params.remember_()  # the loaded weights are the point before the next step, as in the saved run
        self.generator.set_state(saved["generator"])
        ckpt.set_rng_state(saved["rng"][distributed.current().rank])


def controller_subset(loader: DataLoader, share: float, seed: int) -> DataLoader:
    """D_CN: a fixed random `share` of the training set, same batch size and collate as `loader`.

    Beyond one batch, its size is rounded to whole batches: a remainder batch of a few samples would cost
    a full controller step (a masked forward and backward) for a noisy gradient. Under torchrun each rank
    draws the same subset and takes its shard of it.
    """
    dataset = loader.dataset
    n = len(dataset)
    batch = loader.batch_size or 1
    size = max(1, math.ceil(share * n))
    if size > batch:
        size = min(n, round(size / batch) * batch)
    gen = torch.Generator().manual_seed(seed + 1)
    subset = Subset(dataset, torch.randperm(n, generator=gen)[:size].tolist())
    if distributed.current().parallel:
        return DataLoader(subset, batch_size=batch, collate_fn=loader.collate_fn,
                          sampler=distributed.training_sampler(subset, seed + 2))
    return DataLoader(subset, batch_size=batch, shuffle=True,
                      collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(seed + 2))


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The random generators a loader draws its order from (its own and its sampler's), without repeats."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             loss_fn: Callable[[Any, Tensor], Tensor], example_inputs: tuple | None = None) -> dict[str, float]:
    """Mean loss and top-1 accuracy (%) in eval mode; the first batch is checked against `example_inputs`.

    A loader sharded across torchrun's ranks is evaluated by all of them together.
    """
    was = model.training
    model.eval()
    total, correct, loss_sum = 0, torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad():
        for step, batch in enumerate(loader):
            inputs, targets = split_batch(_to(batch, device))
            if step == 0:
                out = checked_forward(model, inputs, example_inputs)
                check_targets(out, targets, loss_fn)  # eval mode: the output itself, no side effect to avoid
            else:
                out = model(*inputs)
            loss_sum += loss_fn(out, targets) * len(targets)
            correct += _hits(out, targets)
            total += len(targets)
    model.train(was)
    if distributed.is_sharded(loader):
        loss_sum, correct, n = distributed.sum_across(loss_sum, correct, torch.tensor(float(total), device=device))
        total = int(n)
    if total == 0:
        raise DataError("the validation loader yielded no batch; check the dataset and batch_size/drop_last.")
    return {"loss": float(loss_sum) / total, "accuracy": 100.0 * float(correct) / total}


def train_one_epoch(trainer: ATOTrainer, loader: Iterable, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable[[Any, Tensor], Tensor], precision: StepPrecision | None = None,
                    progress: bool = False, desc: str = "", model: nn.Module | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
    """One pass of target-model steps, each followed by ATO's projection; returns (mean loss, accuracy %).

    `model` is what takes the steps (the DistributedDataParallel wrapper under torchrun); the figures
    returned are over all ranks. `scaler` is the run's GradScaler when `precision` is fp16 (fit makes one
    per run). The loop itself never waits for the device, except for the progress bar on the CPU.
    """
    device = trainer.device
    model = model if model is not None else trainer.model
    model.train()
    precision = precision or StepPrecision()
    live_postfix = progress and device.type == "cpu"
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        inputs, targets = split_batch(_to(batch, device))
        inputs = precision.prepare_inputs(inputs)
        with precision.autocast(device):
            if step == 0:  # the first batch of each epoch is checked, before it can touch BatchNorm statistics
                check_targets(trainer.ato.example_output, targets, loss_fn)
                out = checked_forward(model, inputs, trainer.example_inputs)
            else:
                out = model(*inputs)
            loss = loss_fn(out, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        trainer.after_optimizer_step(optimizer)
        loss_sum += loss.detach() * len(targets)
        correct += _hits(out, targets)
        seen += len(targets)
        if live_postfix and step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100 * float(correct) / seen:.1f}",
                            flops=f"{trainer.flops_kept():.2f}")
    loss_sum, correct, n = distributed.sum_across(loss_sum, correct, torch.tensor(float(seen), device=device))
    return float(loss_sum) / max(float(n), 1.0), 100.0 * float(correct) / max(float(n), 1.0)


def controller_epoch(trainer: ATOTrainer, cn_loader: Iterable,
                     loss_fn: Callable[[Any, Tensor], Tensor]) -> list[dict[str, float]]:
    """The controller's passes over D_CN for this epoch (nothing outside the window)."""
    steps: list[dict[str, float]] = []
    if trainer.in_window():
        for _ in range(trainer.config.controller_epochs):
            steps.extend(trainer.controller_step(b, loss_fn) for b in cn_loader)
    return steps


def fit(
    trainer: ATOTrainer,
    train_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable[[Any, Tensor], Tensor],
    val_loader: Iterable | None,
    checkpoint_dir: Path | None,
    log_path: Path | None,
    precision: StepPrecision,
    progress: bool,
) -> list[dict[str, Any]]:
    """Run (or resume) the whole schedule; returns one record per epoch.

    Under torchrun every rank calls this with its shard of the data; rank 0 alone writes the log and
    the checkpoints, and all ranks resume from the same checkpoint.
    """
    device, ph = trainer.device, trainer.phases
    ranks = distributed.current()
    distributed.require_sharded(train_loader, "training")
    progress = progress and ranks.main
    n_batches = loader_length(train_loader)
    fingerprint = trainer.fingerprint(n_batches)
    if trainer.config.method == "ato" and not hasattr(train_loader, "dataset"):
        raise DataError(f"the training loader is a {type(train_loader).__name__}, not a DataLoader: ATO draws the "
                        "controller's subset (D_CN) from loader.dataset; wrap your data in a torch DataLoader.")
    cn_loader = controller_subset(train_loader, trainer.config.controller_data, trainer.config.seed) \
        if trainer.config.method == "ato" else None
    # the loaders' own generators decide the batch order: saved and restored so a resumed run is the same run
    generators = loader_generators(train_loader) + (loader_generators(cn_loader) if cn_loader is not None else [])
    scaler = precision.scaler(device)  # one for the run: its loss scale carries over from epoch to epoch
    if checkpoint_dir is not None:
        saved, note = ckpt.read_latest(checkpoint_dir)
        if note:
            tqdm.write(f"atofx: {note}")
        if saved is not None:
            ckpt.check_compatible(saved, fingerprint, checkpoint_dir)
            trainer.load_state_dict(saved, optimizer, scheduler)
            if scaler is not None and saved.get("grad_scaler"):
                scaler.load_state_dict(saved["grad_scaler"])  # a fresh scale would re-learn its backoffs
            loader_rng = saved.get("loader_rng", [])
            if len(loader_rng) == len(generators):
                for g, state in zip(generators, loader_rng, strict=True):
                    g.set_state(state)
            if log_path is not None and ranks.main:
                log_path.write_text("".join(json.dumps(r) + "\n" for r in trainer.state.history))
    model = trainer.model
    precision.prepare_model(model)
    stepping = distributed.wrap(model, device)
    for epoch in range(trainer.state.epoch, ph.epochs):
        started = time.perf_counter()
        for loader in (train_loader, cn_loader):
            distributed.set_epoch(loader, epoch)
        before = {k: v.clone() for k, v in trainer.mask.items()}
        train_loss, train_acc = train_one_epoch(trainer, train_loader, optimizer, loss_fn, precision, progress,
                                                f"epoch {epoch + 1}/{ph.epochs}", stepping, scaler)
        distributed.share_buffers(model)  # rank 0's BN statistics everywhere: one model to evaluate and save
        if scheduler is not None:
            scheduler.step()
        if not math.isfinite(train_loss):
            last = checkpoint_dir / ckpt.CHECKPOINT if checkpoint_dir is not None else None
            raise AtofxError(
                f"the training loss became {train_loss} in epoch {epoch + 1}; training stopped. "
                + (f"The last good checkpoint is {last} (epoch {trainer.state.epoch}). " if last else "")
                + "Lower the learning rate or check the data."
            )
        ctrl = controller_epoch(trainer, cn_loader, loss_fn) if cn_loader is not None else []
        info = trainer.end_epoch(epoch)
        digests = distributed.agreed_mask_digests(trainer.mask, epoch + 1)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "flops_kept": info["flops_kept"],
            "controller_loss": sum(c["controller_loss"] for c in ctrl) / len(ctrl) if ctrl else None,
            "mask_bits_changed": int(sum(int((trainer.mask[k] != before[k]).sum()) for k in before)),
            "mask_frozen": info["frozen"],
            "zigs_dropped": info["zigs_dropped"],
            "zigs_zero": info["zigs_zero"],
            "zigs_revived": info["zigs_revived"],
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        if ranks.parallel:
            record["mask_digests"] = digests  # one per rank, checked equal
        if val_loader is not None:
            val = evaluate(model, val_loader, device, loss_fn, trainer.example_inputs)
            record |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        record["seconds"] = time.perf_counter() - started
        trainer.state.history.append(record)
        if progress:
            tqdm.write(_epoch_line(record))
        payload = trainer.state_dict(optimizer, scheduler) if checkpoint_dir is not None else None  # all ranks
        if not ranks.main:
            continue
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if checkpoint_dir is not None:
            ckpt.write(checkpoint_dir, payload | {"fingerprint": fingerprint,
                                                  "loader_rng": [g.get_state() for g in generators],
                                                  "grad_scaler": scaler.state_dict() if scaler is not None else None})
    return trainer.state.history


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']:3d}", f"loss {r['train_loss']:.3f}", f"acc {r['train_accuracy']:.1f}%"]
    if "val_accuracy" in r:
        parts.append(f"val {r['val_accuracy']:.1f}%")
    parts.append(f"FLOPs kept {r['flops_kept']:.3f}")
    parts.append(f"ZIGs dropped/zero/revived {r['zigs_dropped']}/{r['zigs_zero']}/{r['zigs_revived']}")
    if r["controller_loss"] is not None:
        parts.append(f"ctrl {r['controller_loss']:.3f}")
    if r["mask_frozen"]:
        parts.append("mask frozen")
    return "  ".join(parts)
