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

`ATOTrainer` is one run's state and its steps over a core `Analysis`; `atofx.ato.loop` runs the epochs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from atofx.ato import checkpoint as ckpt
from atofx.ato import distributed
from atofx.ato.batches import split_batch, to_device
from atofx.ato.config import ATOConfig
from atofx.ato.controller import Controller, Masks, gated_spaces
from atofx.ato.flops_regularizer import controller_loss
from atofx.ato.projection import ZIGParams
from atofx.core.mask import Mask, keep_at_least, rounded_count
from atofx.errors import NoPrunableSpaceError
from atofx.passes.instrument import instrument
from atofx.passes.values import evaluating

if TYPE_CHECKING:
    from atofx.core.analysis import Analysis


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


class ATOTrainer:
    """The state of one ATO run over an `Analysis`, step by step."""

    def __init__(self, ato: Analysis, config: ATOConfig, epochs: int, device: torch.device):
        config.validate()
        self.ato, self.config, self.device = ato, config, device
        self.phases = Phases.of(config, epochs)
        zigs = ato.zigs
        if not zigs.prunable:
            raise NoPrunableSpaceError(
                "the model has no prunable channel space; ato.report() lists why each one is pinned.")
        config.check_round_to([s.width for s in zigs.prunable])
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
        self.controller_opt = self.controller.optimizer(config.controller_optimizer, config.controller_lr)
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
        inputs, targets = split_batch(to_device(batch, self.device))
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
        try:
            for p in model_params:
                p.requires_grad_(False)
            with evaluating(self.gm, no_grad=False):
                task = loss_fn(self.gm(*inputs), targets)
            p = self.flops.of_vector(keep_flops)
            loss = controller_loss(task, p, cfg.target_flops, self.flops.total, cfg.gamma, cfg.regularizer)
            self.controller_opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.controller.parameters())  # same step, same mask on every rank
            self.controller_opt.step()
        finally:
            self.slots.set(None)
            for p_ in model_params:
                p_.requires_grad_(True)
        if cfg.sampling != "official":  # official: the mask is drawn once, at the end of the epoch
            self.mask = self._floored(self.current_mask())
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
            self.mask = self._floored(self.sampled_mask())
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

    def flops_kept(self, mask: Masks | None = None) -> float:
        """The share of the dense FLOPs the FLOPs model gives `mask` (default: the current mask)."""
        mask = self.mask if mask is None else mask
        return float(self.flops({k: v.double() for k, v in mask.items()})) / self.flops.total

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

    def _floored(self, mask: Masks) -> Masks:
        """The window's projecting mask as `window_mask` says: `mask`, topped up to the budget, or cut at it."""
        if self.config.window_mask == "budget":
            return self._threshold_for_target(self._fill_scores({k: torch.zeros_like(v) for k, v in mask.items()}))
        return self.filled_mask(mask) if self.config.window_mask == "floor" else mask

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
        bisected and then filled up to the budget with live ZIGs (`filled_mask`), the controller's own, or the
        controller's less its dead ZIGs (all parameters exactly zero). With `round_to`, the last two move each
        space's count to a multiple of it, keeping the controller's bits first, then its best logits."""
        how = self.config.freeze_mask
        if how == "bisect":
            return self.budget_mask()
        if how == "fill":
            return self.filled_mask(self.budget_mask())
        mask = {k: v.clone() for k, v in self.mask.items()}
        if how == "dead":
            for k, dead in self._by_gated_space(self.params.group_norms() == 0).items():
                mask[k] = torch.where(dead, 0.0, mask[k])
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
    def filled_mask(self, mask: Masks) -> Masks:
        """`mask` with dropped ZIGs kept again, best logits first, while the FLOPs model keeps at most the target;
        a dead ZIG (all parameters exactly zero: a zero conv + BN group gets no gradient) never comes back. With
        `window_mask="floor"` this holds the window's mask at the budget after every controller step."""
        if self.flops_kept(mask) >= self.config.target_flops:
            return mask
        return self._threshold_for_target(self._fill_scores(mask))

    def _fill_scores(self, mask: Masks) -> dict[int, Tensor]:
        """Per gated space, ZIGs in keeping order: kept by `mask` 2, live sigmoid(logit + offset), dead 0 (never)."""
        logits = self.controller()
        scores = {}
        for k, dead in self._by_gated_space(self.params.group_norms() == 0).items():
            live = torch.sigmoid(logits[k].double() + self.config.offset).to(self.device)
            scores[k] = torch.where(mask[k] > 0, 2.0, torch.where(dead, 0.0, live))
        return scores

    @torch.no_grad()
    def saliency_mask(self) -> Masks:
        """Static baseline: keep the ZIGs of largest relative group norm until the FLOPs target is met."""
        norms = self._by_gated_space(self.params.group_norms())
        return self._threshold_for_target({k: n / n.mean().clamp_min(1e-12) for k, n in norms.items()})

    def _by_gated_space(self, per_zig: Tensor) -> dict[int, Tensor]:
        """A per-ZIG tensor (`ZIGParams` order) as one tensor per gated space, on the masks' device."""
        return {s.index: per_zig[torch.as_tensor(s.components, device=per_zig.device)].to(self.device)
                for s in self.ato.zigs.prunable if s.index in self.gated}

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

        # the mask changes only at a score: bisect over 0 and the scores (ResNet-20: 9 FLOPs evaluations, not 40)
        cuts = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), *(r.double().cpu() for r in scores.values())]))
        cuts = cuts[cuts >= 0].tolist()
        target = self.config.target_flops * self.flops.total
        lo, hi = 0, len(cuts) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if float(self.flops(mask_at(cuts[mid]))) > target:
                lo = mid + 1
            else:
                hi = mid
        return self._full({k: v.to(self.device, torch.float32) for k, v in mask_at(cuts[lo]).items()})

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self, n_batches: int) -> dict[str, Any]:
        return ckpt.fingerprint(self.ato.model, asdict(self.config), self.phases.epochs, n_batches,
                                distributed.current().world)

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
