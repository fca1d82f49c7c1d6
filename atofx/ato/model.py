"""`compile()` and `ATOModel`: the traced model with its channel spaces."""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from atofx.ato import distributed
from atofx.ato.mixed_precision import StepPrecision
from atofx.ato.trainer import ATOConfig, ATOTrainer, fit, split_batch
from atofx.core.mask import Mask
from atofx.core.serialization import example_inputs_of
from atofx.errors import AtofxError, AtofxWarning, ConfigError, DataError, EquivalenceError, ShapeError
from atofx.passes.dependency import ChannelDependencyPass, ChannelFacts
from atofx.passes.equivalence import first_divergence, relative_difference, run_eval
from atofx.passes.flops import FlopsModel, FlopsProp
from atofx.passes.rewrite import patch_literals, prune_copy
from atofx.passes.shape_prop import NodeFailed, ShapeProp
from atofx.passes.tracing import LeafSpec, trace, trace_graph
from atofx.passes.zig_inference import ChannelSpace, ZIGSet, infer_zigs

EQUIVALENCE_TOLERANCE = 1e-5
# below these the controller has no time to learn a mask before it freezes (issue 17: 2 epochs, a mask frozen
# after one epoch of controller steps, 15% accuracy against 62% for plain training)
MIN_WINDOW_EPOCHS = 3
MIN_WINDOW_STEPS = 20


def schedule_warning(phases: Any, controller_batches: int, passes: int) -> str | None:
    """Why a run's schedule leaves the controller too few epochs or steps to learn its mask, or None."""
    window = phases.end - phases.start
    steps = window * controller_batches * passes
    if window >= MIN_WINDOW_EPOCHS and steps >= MIN_WINDOW_STEPS:
        return None
    return (f"with {phases.epochs} epochs the controller learns the mask in {window} epoch(s) "
            f"({steps} controller steps; it needs about {MIN_WINDOW_EPOCHS} epochs and {MIN_WINDOW_STEPS} steps) and "
            f"the mask then freezes: expect a large accuracy loss. Train for more epochs (at least "
            f"{math.ceil(MIN_WINDOW_EPOCHS / 0.4)}; `atofx train --epochs`), give the controller more data or passes "
            "(controller_data, controller_epochs), or use method='static'.")


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class _EvalNoGrad:
    """Run a model in eval mode without autograd, restoring its training flags afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.training = [m for m in self.model.modules() if m.training]  # only these change and change back
        for m in self.training:
            m.training = False
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for m in self.training:
            m.training = True


def _describe_input(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {_describe_input(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe_input(v) for v in x) + ")"
    return type(x).__name__


def _node_kind(root: nn.Module, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    return getattr(node.target, "__name__", str(node.target))


def _as_meta(x: Any) -> Any:
    """The same structure with every tensor replaced by a meta tensor of its shape and dtype."""
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, dict):
        return {k: _as_meta(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_as_meta(v) for v in x] if isinstance(x, list) else tuple(_as_meta(v) for v in x)
    return x


def _first_sample(x: Any) -> Any:
    """The first sample of a batch, keeping the batch dim: tensors sliced [:1], containers walked."""
    if isinstance(x, torch.Tensor):
        return x[:1]
    if isinstance(x, dict):
        return {k: _first_sample(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_first_sample(v) for v in x] if isinstance(x, list) else tuple(_first_sample(v) for v in x)
    return x


class ATOModel:
    """A model traced by atofx: its graph, its ZIGs and channel spaces."""

    def __init__(self, model: nn.Module, graph_module: fx.GraphModule | fx.Graph,
                 trace_options: dict[str, Any] | None = None):
        """`graph_module`: `model` traced, as a GraphModule or as a bare Graph (its GraphModule is built on first use)."""
        self.model = model
        is_module = isinstance(graph_module, fx.GraphModule)
        self.graph: fx.Graph = graph_module.graph if is_module else graph_module
        self._graph_module: fx.GraphModule | None = graph_module if is_module else None
        self.trace_options = trace_options or {}
        self.mask: Mask | None = None
        self.example_inputs: tuple | None = None
        self.example_output: Any = None
        self._facts: ChannelFacts | None = None
        self._zigs: ZIGSet | None = None
        self._flops: FlopsModel | None = None

    @property
    def graph_module(self) -> fx.GraphModule:
        """The traced model as a GraphModule (generating its code costs more than the analysis needs)."""
        if self._graph_module is None:
            self._graph_module = fx.GraphModule(self.model, self.graph, type(self.model).__name__)
        return self._graph_module

    def _root(self) -> nn.Module:
        """What the graph's targets are paths in: the GraphModule once there is one, else the traced model."""
        return self._graph_module if self._graph_module is not None else self.model

    # ------------------------------------------------------------------ analysis
    def analyze(self, example_inputs: Any) -> ATOModel:
        """Propagate shapes from `example_inputs` and infer the ZIGs."""
        inputs = self._fill_concrete(_as_tuple(example_inputs))
        root = self._root()
        with _EvalNoGrad(root):
            try:
                try:
                    output = ShapeProp(root, self.graph, shape_only=True).propagate(*inputs)
                except NodeFailed:  # zeros in place of conv outputs upset it, or the inputs are wrong: run for real
                    output = ShapeProp(root, self.graph).propagate(*inputs)
            except NodeFailed as failed:
                shapes = ", ".join(_describe_input(x) for x in inputs)
                cause = str(failed.exc).strip().splitlines()
                raise ShapeError(
                    f"the model failed on the example inputs ({shapes}) at node '{failed.node.name}' "
                    f"({_node_kind(root, failed.node)}): {type(failed.exc).__name__}: "
                    f"{cause[0] if cause else ''}. Pass example_inputs shaped like one real batch "
                    "(a tuple with one entry per forward argument)."
                ) from failed.exc
        self.example_inputs = inputs
        self.example_output = _as_meta(output)  # shapes only: what batches' labels are checked against
        self._facts = ChannelDependencyPass(root, self.graph).run()
        self._zigs = infer_zigs(self._facts)
        self._flops = None
        return self

    def _fill_concrete(self, inputs: tuple) -> tuple:
        """fx keeps a placeholder for each concrete arg: give it its value, the user's inputs fill the rest."""
        concrete = self.trace_options.get("concrete_args") or {}
        if not concrete:
            return inputs
        n_placeholders = sum(n.op == "placeholder" for n in self.graph.nodes)
        names = list(inspect.signature(self.model.forward).parameters)  # fx may rename placeholders
        if len(inputs) >= n_placeholders or len(names) != n_placeholders:
            return inputs
        given = iter(inputs)
        return tuple(concrete[name] if name in concrete else next(given, None) for name in names)

    @property
    def zigs(self) -> ZIGSet:
        if self._zigs is None:
            raise AtofxError(
                "the model has not been analysed yet: pass example_inputs to atofx.compile(), "
                "or call ato.analyze(batch_inputs)."
            )
        return self._zigs

    @property
    def spaces(self) -> list[ChannelSpace]:
        """Every channel space, prunable and pinned, in graph order."""
        return self.zigs.spaces

    @property
    def flops_model(self) -> FlopsModel:
        """The differentiable FLOPs model P(keep), built on first use."""
        if self._flops is None:
            zigs = self.zigs
            with _EvalNoGrad(self.graph_module):
                FlopsProp(self.graph_module).propagate(*self.example_inputs)
            self._flops = FlopsModel(self.graph_module, zigs)
        return self._flops

    # ------------------------------------------------------------------ masks and pruning
    def random_mask(self, keep: float = 0.5, seed: int = 0) -> Mask:
        """Keep a random `keep` share of every prunable space (never all of a space dropped)."""
        return Mask.random(self.zigs, keep, seed)

    def spaces_of(self, target: Any) -> list[ChannelSpace]:
        """The channel spaces a target names: a ChannelSpace, a space index or name, or a layer (module or its
        path, like "fc" or "layer1.0.conv1": the spaces it writes; a container: those its layers write)."""
        spaces = self.zigs.spaces
        if isinstance(target, ChannelSpace):
            return [spaces[target.index]]
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < len(spaces):
                raise ConfigError(f"space index {target} is out of range: the model has spaces 0..{len(spaces) - 1} "
                                  "(ato.report() lists them).")
            return [spaces[target]]
        if isinstance(target, nn.Module):
            path = next((name for name, m in self.model.named_modules() if m is target), None)
            if path is None:
                raise ConfigError(f"the {type(target).__name__} given is not a layer of this model; pass one of its "
                                  "modules or a module path like 'fc'.")
            target = path
        if not isinstance(target, str):
            raise ConfigError(f"cannot pin a {type(target).__name__}: give a module, a module path, a space index "
                              "or a ChannelSpace.")
        found = [s for s in spaces if s.name == target]
        found += [s for s in spaces if s not in found
                  and any(p == target or p.startswith(target + ".") for p in s.producers)]
        if not found:
            import difflib

            names = [n for n, _ in self.model.named_modules() if n] + [s.name for s in spaces]
            close = difflib.get_close_matches(target, names, n=3)
            raise ConfigError(f"no layer or channel space {target!r} in the model"
                              + (f"; did you mean {', '.join(close)}?" if close else "; ato.report() lists the spaces."))
        return found

    def pin(self, *targets: Any, reason: str = "pinned by the user") -> list[ChannelSpace]:
        """Never prune the spaces these targets name (see `spaces_of`); they stay pinned for later masks and runs.

        Torch-Pruning's `ignored_layers`: `ato.pin(model.fc)` keeps every output channel of `fc`.
        """
        pinned = [s for t in targets for s in self.spaces_of(t)]
        for s in pinned:
            if not s.pinned:
                s.pinned, s.reason = True, reason
        self._flops = None
        return pinned

    def group_norms(self) -> dict[int, torch.Tensor]:
        """Importance of every ZIG of every prunable space: the L2 norm of all its parameters (for Mask.from_scores)."""
        from atofx.ato.projection import ZIGParams

        norms = ZIGParams.of(self).group_norms().detach().cpu()
        return {s.index: norms[torch.as_tensor(s.components)] for s in self.zigs.prunable}

    def mask_from_scores(self, scores: dict[int, torch.Tensor], keep: float = 0.5, round_to: int = 1) -> Mask:
        """Keep the best-scored `keep` share of every prunable space; `scores`: one value per ZIG, by space index."""
        return Mask.from_scores(self.zigs, scores, keep, round_to)

    def _min_keep(self, max_pruned: float | dict[Any, float] | None) -> dict[int, int]:
        """Fewest ZIGs kept per space index from `max_pruned` (a share for every space, or per target)."""
        if max_pruned is None:
            return {}
        shares = {s.index: max_pruned for s in self.zigs.prunable} if isinstance(max_pruned, (int, float)) else \
            {s.index: share for t, share in dict(max_pruned).items() for s in self.spaces_of(t)}
        out = {}
        for index, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise ConfigError(f"max_pruned is the share of a space's channels that may go and must be in [0, 1], "
                                  f"got {share} for space {index}.")
            out[index] = max(1, math.ceil((1.0 - share) * self.zigs.spaces[index].width - 1e-9))
        return out

    def flops(self, mask: Mask | None = None) -> float:
        """FLOPs the model would have with `mask` applied (the dense count without one)."""
        keep = mask.as_float() if mask is not None else {}
        return float(self.flops_model(keep))

    def apply_mask(self, mask: Mask) -> None:
        """Zero, in place in the user's model, the parameters of every dropped ZIG."""
        mask.validate(self.zigs)
        zero_dropped(self.model, self.zigs, mask.component_keep(self.zigs))

    def prune(self, mask: Mask | None = None, check: bool = True) -> nn.Module:
        """A physically smaller copy of the model with the dropped channels removed.

        With `check`, the pruned model must reproduce the masked model on the example inputs
        (eval mode, relative max-abs difference <= 1e-5) or `EquivalenceError` names the first
        layer that differs. The returned module keeps the user's classes unless a hard-coded
        channel count in the graph had to change, in which case it is a GraphModule.
        """
        mask = mask if mask is not None else self.mask
        if mask is None:
            raise AtofxError("no mask to prune with: pass one (ato.random_mask(...)) or call ato.train(...) first.")
        zigs = self.zigs
        mask.validate(zigs)
        keep = mask.component_keep(zigs)
        small = prune_copy(self.model, zigs, keep)
        patched = patch_literals(self.graph_module, small, zigs, keep)
        if not check:
            result = patched if patched is not None else small
            example_inputs_of[result] = self.example_inputs
            return result
        reference = copy.deepcopy(self.model)
        zero_dropped(reference, zigs, keep)
        expected = run_eval(reference, self.example_inputs)
        for candidate in (small, patched):
            if candidate is None:
                continue
            try:
                got = run_eval(candidate, self.example_inputs)
            except Exception:
                continue
            if relative_difference(expected, got) <= EQUIVALENCE_TOLERANCE:
                example_inputs_of[candidate] = self.example_inputs
                return candidate
        ref_gm = trace(reference, **self.trace_options)
        new_gm = patched if patched is not None else trace(small, **self.trace_options)
        where = first_divergence(ref_gm, new_gm, self.example_inputs, zigs, keep, EQUIVALENCE_TOLERANCE)
        raise EquivalenceError(
            f"the pruned model differs from the masked model, first at {where}. This is an atofx bug or an op "
            "rule that is wrong for this model: please report it; meanwhile keep the op opaque with "
            "leaf_modules=[...] so its channels are pinned."
        )

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
        if self._zigs is None:
            raise AtofxError("analyse the model first: atofx.compile(model, example_inputs) or ato.analyze(batch).")
        check_options(config)
        if epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {epochs}.")
        self.pin(*ignored_layers, *pin)
        config["min_keep"] = self._min_keep(max_pruned)
        dev = resolve_device(device, self.model)
        self.model.to(dev)
        flavour = config.pop("flavour", "atofx")
        self._trainer = ATOTrainer(self, ATOConfig.of(flavour, target_flops=target_flops, **config), epochs, dev)
        return self._trainer

    def _active(self) -> ATOTrainer:
        if getattr(self, "_trainer", None) is None:
            raise AtofxError("no training run: call ato.train(...) or ato.start_training(...) first.")
        return self._trainer

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """ATO's projection; call it right after every `optimizer.step()` of your own loop."""
        self._active().after_optimizer_step(optimizer)

    def controller_step(self, batch: Any, loss_fn: Any = None) -> dict[str, float]:
        """One controller update on an (inputs, targets) batch of D_CN; a no-op outside the window."""
        return self._active().controller_step(batch, loss_fn)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Close epoch `epoch` (0-based) of your own loop; updates `ato.mask`."""
        info = self._active().end_epoch(epoch)
        self.mask = self._active().final_mask()
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

        Any other ATOConfig option goes in `config` (e.g. `step_size="share"`), and `flavour="official"`
        starts from the authors' released code's choices (`ATOConfig.official()`).
        Resumes from `checkpoint_dir` when it holds a checkpoint of the same run. Without an
        optimizer, SGD (lr 0.1, momentum 0.9, nesterov, weight decay 5e-4) with a cosine schedule.
        `amp`: autocast in "bf16", or "fp16" with a grad scaler. Under torchrun (a process group
        started), each rank passes a loader with a DistributedSampler and the model is trained
        through DistributedDataParallel.
        """
        torch.manual_seed(seed)
        if self._zigs is None:
            first = next(iter(train_loader), None)
            if first is None:
                raise DataError("the training loader yielded no batch; check the dataset and batch_size/drop_last.")
            inputs, _ = split_batch(first)
            self.analyze(tuple(_first_sample(x) for x in inputs))
        trainer = self.start_training(
            epochs, target_flops, device, lam=lam, gamma=gamma, warmup=warmup, controller_window=controller_window,
            controller_data=controller_data, projection=projection, method=method, seed=seed, **config)
        if optimizer is None:
            from atofx.ato.plain_training import default_optimizer

            optimizer, default_schedule = default_optimizer(self.model, epochs)
            scheduler = scheduler or default_schedule
        n = len(train_loader.dataset) if isinstance(getattr(train_loader, "dataset", None), Sized) else None
        if trainer.config.method == "ato" and n:  # without a length, fit says why it cannot train
            batches = max(1, math.ceil(math.ceil(trainer.config.controller_data * n) /
                                       (getattr(train_loader, "batch_size", None) or 1)))
            why = schedule_warning(trainer.phases, batches, trainer.config.controller_epochs)
            if why is not None:
                warnings.warn(why, AtofxWarning, stacklevel=2)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        log = Path(log_path) if log_path is not None else (folder / "log.jsonl" if folder is not None else None)
        history = fit(trainer, train_loader, optimizer, scheduler, loss_fn or nn.functional.cross_entropy,
                      val_loader, folder, log, StepPrecision.of(amp, channels_last), progress)
        self.mask = trainer.final_mask()
        return history

    # ------------------------------------------------------------------ presentation
    def report(self) -> str:
        """A table: space, width, producers, consumers, share of FLOPs, pinned and why."""
        from atofx.core.report import spaces_table

        return spaces_table(self)

    def visualize(self, path: str | Path, view: str = "auto", timeout: float = 60.0) -> Path:
        """Draw the graph, one colour per space; returns the file written.

        `view`: "layers" (one box per layer), "spaces" (one box per channel space, edges through the layers that
        join them) or "auto" (the space view for graphs of over 250 layers). Without graphviz's `dot`, or when
        it needs more than `timeout` seconds, the `.dot` source is written instead, with a warning.
        """
        from atofx.core.visualize import draw_spaces

        return draw_spaces(self, Path(path), view, timeout)


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


def check_options(config: dict[str, Any]) -> None:
    """Refuse keywords that are not ATOConfig fields, naming the nearest valid option (or atofx's equivalent)."""
    import difflib
    from dataclasses import fields

    valid = [f.name for f in fields(ATOConfig) if f.name != "min_keep"] + ["flavour"]
    for key in config:
        if key in valid:
            continue
        valid += ["ignored_layers", "pin", "max_pruned", *inspect.signature(ATOModel.train).parameters]
        if key in _ELSEWHERE:
            raise ConfigError(f"atofx has no option {key!r}: {_ELSEWHERE[key]}.")
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                          + f" Valid options: {', '.join(sorted(set(valid) - {'self', 'config'}))}.")


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """'auto' picks CUDA when present; None keeps the model where it is; CUDA without a GPU is refused.

    Under torchrun, 'cuda' and 'auto' mean the GPU of this rank's LOCAL_RANK.
    """
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    if device == "auto":
        return distributed.rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA GPU is available; use device='cpu' or 'auto'.")
    return distributed.rank_device(dev)


def zero_dropped(model: nn.Module, zigs: ZIGSet, keep_comp: np.ndarray) -> None:
    """Zero the ZIG parameters ("out" slices) of every dropped ZIG, in place."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for s in zigs.slices:
            if s.role != "out":
                continue
            drop = np.flatnonzero(~keep_comp[zigs.labels[s.ids]])
            if drop.size:
                t = tensors[f"{s.module}.{s.name}" if s.module else s.name]
                t.index_fill_(s.dim, torch.as_tensor(drop, device=t.device), 0.0)


def compile(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> ATOModel:
    """Trace `model` with torch.fx and, given example inputs, infer its zero-invariant groups."""
    if not isinstance(model, nn.Module):
        raise AtofxError(f"atofx.compile expects an nn.Module, got {type(model).__name__}.")
    options = {"leaf_modules": tuple(leaf_modules), "concrete_args": concrete_args}
    if example_inputs is not None:  # lets code that branches on input shapes trace, specialised to them
        options["example_inputs"] = _as_tuple(example_inputs)
    ato = ATOModel(model, trace_graph(model, **options), options)
    if example_inputs is not None:
        ato.analyze(example_inputs)
    return ato
