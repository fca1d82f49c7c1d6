"""ATO's options: `ATOConfig` holds every option of a run and its default, defined here once.

Where the paper, the authors' released code and atofx differ, `ATOConfig` has an option for each choice (atofx's
is the default); `ATOConfig.official()` turns on every choice of the released code. This module imports no torch,
so the command line can build its parser (and answer `--help`) without it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from atofx.errors import ConfigError

FLAVOURS = ("atofx", "official")
METHODS = ("ato", "static")
PROJECTIONS = ("prox", "hsp")
# a small dataset's D_CN may be one batch: repeat it so the controller still takes steps every window epoch
MIN_CONTROLLER_STEPS = 10
# controller_steps adds at most this many passes a window epoch, so that a very short run is not all controller
MAX_AUTO_PASSES = 16
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
    "window_mask": "controller",  # the controller's sample projects as it is, under the budget or not
}


# below these the controller has no time to learn a mask before it freezes (issue 17: 2 epochs, a mask frozen
# after one epoch of controller steps, 15% accuracy against 62% for plain training)
MIN_WINDOW_EPOCHS = 3
MIN_WINDOW_STEPS = 20


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
    controller_epochs: int | None = None  # passes over D_CN per window epoch; None: `passes()` decides
    # fewest controller steps over the window (None-controller_epochs only): a short run's controller gets more
    # passes over D_CN. 384 = 16 passes on the Fashion-MNIST quick protocol (6 batches x 4 window epochs), where
    # 1 pass (24 steps) left the controller's mask unchanged until the freeze; the paper's CIFAR runs have ~1,600
    controller_steps: int = 384
    projection: str = "prox"  # "prox" (Eq. 3) or "hsp" (OTO's half-space projector, Eq. 2)
    method: str = "ato"  # "ato" or "static"
    tau: float = 0.4
    offset: float = 3.0
    lam_boost: float = 100.0  # lambda multiplier after the freeze: reached at the last epoch ("ramp") or at once ("jump")
    round_to: int = 1  # the frozen mask keeps a multiple of this many ZIGs per space (1: any number)
    seed: int = 0
    # a dropped ZIG's lambda: "lr" lam (each dropped group shrinks by lr * lam a step); "share" lam * r_l,
    # r_l = its space's share of all dropped ZIGs (official: project_wegit's lam * ratio * lr)
    step_size: str = "share"
    # "ramp": lambda rises linearly from lam at the freeze to lam * lam_boost at the last epoch;
    # "jump": lambda is lam * lam_boost from epoch round(lam_jump_at * epochs) on (official: (E-5)/2 of E = 245)
    lam_schedule: str = "jump"
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
    # the mask frozen at T_end: "bisect" raises the logit threshold until the FLOPs model keeps at most the target;
    # "fill" bisects, then keeps dropped ZIGs that are not yet zero again, best logits first, up to the target;
    # "controller" takes the controller's mask as it is; "dead" takes it and drops the kept ZIGs whose
    # parameters are all exactly zero (dead channels cost FLOPs and give nothing); neither bisects
    freeze_mask: str = "bisect"
    search_space: str = "all"  # "all": every prunable space; "internal": only spaces inside one block (official)
    # the mask that projects in the window: "floor" the controller's, topped up to the budget with live dropped
    # ZIGs, best logits first, when it keeps less; "budget" its live ZIGs ranked by logit and cut at the budget
    # (from the first projection on, as `static` is); "controller" its own (paper, official). The one-sided regulariser
    # lets the controller's mask sink under the budget and its dropped groups die (Fashion-MNIST table: 0.449 of
    # FLOPs kept for a 0.5 target, 0.274 for 0.3); the floor keeps 0.496 / 0.298 and gained 0.08 / 0.24 points on
    # validation over 3 seeds, a tie over 5 (docs/ablation.md, section 7)
    window_mask: str = "floor"
    min_keep: dict[int, int] = field(default_factory=dict)  # space index -> fewest ZIGs kept (ato.train's max_pruned)

    @classmethod
    def official(cls, **overrides: Any) -> ATOConfig:
        """Every choice of the authors' released code (`OFFICIAL`), then `overrides`."""
        return cls(**(OFFICIAL | overrides))

    @classmethod
    def of(cls, flavour: str = "atofx", **options: Any) -> ATOConfig:
        """The config of a flavour ("atofx": the defaults; "official": `official()`), then `options`.

        An unknown option is a ConfigError naming the nearest valid one."""
        if flavour not in FLAVOURS:
            raise ConfigError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}.")
        check_options([k for k in options if k != "min_keep"])
        return cls.official(**options) if flavour == "official" else cls(**options)

    def passes(self, window_epochs: int, batches: int, train_batches: int | None = None) -> int:
        """Passes over D_CN (`batches` a pass) per window epoch: `controller_epochs` if given, else enough for
        `controller_steps` steps over the window (at most MAX_AUTO_PASSES passes) and MIN_CONTROLLER_STEPS an
        epoch, but no more controller steps an epoch than the epoch's `train_batches` training steps (so the
        controller never costs more than the training). One pass at paper scale."""
        if self.controller_epochs is not None:
            return self.controller_epochs
        batches = max(batches, 1)
        wanted = max(math.ceil(MIN_CONTROLLER_STEPS / batches),
                     min(MAX_AUTO_PASSES, math.ceil(self.controller_steps / (max(window_epochs, 1) * batches))))
        if train_batches is not None:
            wanted = min(wanted, train_batches // batches)
        return max(1, wanted)

    def check_round_to(self, widths: list[int]) -> None:
        """Refuse a round_to no prunable channel space (`widths`) is wider than: a space no wider than round_to is
        left as it is, so it would have no effect at all, without a word."""
        widest = max(widths, default=0)
        if self.round_to > 1 and self.round_to >= widest:
            raise ConfigError(f"round_to {self.round_to} has no effect on this model: its widest prunable channel "
                              f"space has {widest} channels, and only a space wider than {self.round_to} is rounded to "
                              "a multiple of it. Give a smaller value (8 or 16 suit most CPUs and GPUs), or leave it out.")

    def validate(self) -> None:
        if not 0.0 < self.target_flops <= 1.0:
            raise ConfigError(f"target_flops is the share of FLOPs kept and must be in (0, 1], got {self.target_flops}.")
        if self.method not in METHODS:
            raise ConfigError(f"method must be 'ato' or 'static', got {self.method!r}.")
        if self.projection not in PROJECTIONS:
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
        passes = self.controller_epochs
        if passes is not None and (not isinstance(passes, int) or passes < 1):
            raise ConfigError(f"controller_epochs is a number of passes over D_CN, >= 1 (or None), got {passes!r}.")
        if not isinstance(self.controller_steps, int) or self.controller_steps < 0:
            raise ConfigError(f"controller_steps must be a whole number >= 0, got {self.controller_steps!r}.")
        if not isinstance(self.head_bias, bool):
            raise ConfigError(f"head_bias must be True or False, got {self.head_bias!r}.")


# the values each option with a fixed set of them accepts (defaults: ATOConfig; official: OFFICIAL)
CHOICES: dict[str, tuple[str, ...]] = {
    "step_size": ("lr", "share"),
    "lam_schedule": ("ramp", "jump"),
    "sampling": ("atofx", "official"),
    "regularizer": ("paper", "official"),
    "controller_optimizer": ("adam", "adamw"),
    "freeze_mask": ("bisect", "fill", "controller", "dead"),
    "search_space": ("all", "internal"),
    "window_mask": ("controller", "floor", "budget"),
}


# what users of other pruning libraries pass, and what atofx offers instead
_ELSEWHERE = {
    "importance": "ATO's controller picks the channels; to prune by an importance score yourself, build a mask with "
                  "ato.mask_from_scores(scores, keep) (ato.group_norms() gives L2 norms) and call ato.prune(mask)",
    "pruning_ratio": "atofx budgets FLOPs: target_flops is the share of FLOPs kept",
    "ch_sparsity": "atofx budgets FLOPs: target_flops is the share of FLOPs kept",
    "pruning_ratio_dict": "max_pruned={layer or space: share} caps what may go per layer or space",
    "ch_sparsity_dict": "max_pruned={layer or space: share} caps what may go per layer or space",
    "global_pruning": "ATO prunes globally under one FLOPs budget (target_flops)",
    "iterative_steps": "ATO trains once and prunes at the end; there are no pruning steps",
    "unwrapped_parameters": "atofx finds every parameter's channels from the traced graph",
}


def option_names() -> list[str]:
    """The options a user may set (`min_keep` is set through ato.train's max_pruned)."""
    return [f.name for f in fields(ATOConfig) if f.name != "min_keep"]


def check_options(keys: Iterable[str], suggest: Iterable[str] = ()) -> None:
    """Refuse keys that are not ATO options (or "flavour"), naming the nearest valid option, or atofx's equivalent
    of another library's option; `suggest`: more names the caller accepts elsewhere (its own keywords)."""
    valid = [*option_names(), "flavour"]
    for key in keys:
        if key in valid:
            continue
        if key in _ELSEWHERE:
            raise ConfigError(f"atofx has no option {key!r}: {_ELSEWHERE[key]}.")
        known = sorted(set(valid) | set(suggest))
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                          + f" Valid options: {', '.join(known)}.")


# the fewest epochs whose default window (`controller_window`) spans MIN_WINDOW_EPOCHS: 8
MIN_EPOCHS = math.ceil(MIN_WINDOW_EPOCHS / (ATOConfig.controller_window[1] - ATOConfig.controller_window[0]))
