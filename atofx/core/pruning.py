"""Applying a mask: zeroing the dropped ZIGs in place, or building the smaller model and checking it."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from atofx.core.mask import Mask
from atofx.core.nested import map_tensors
from atofx.core.serialization import example_inputs_of
from atofx.errors import AtofxWarning, EquivalenceError
from atofx.passes.equivalence import first_divergence, relative_difference, run_eval
from atofx.passes.rewrite import patch_literals, prune_copy
from atofx.passes.tracing import branching_modules, trace
from atofx.passes.values import device_of
from atofx.passes.zig_inference import ZIGSet

EQUIVALENCE_TOLERANCE = 1e-5
# what is said of a pruned model that had to be a rewritten graph, where the forward branches on `training`
_REWRITTEN = "the pruned model is a rewritten torch.fx graph (a channel count written in the forward changed)"
_COUNT_ADVICE = "Compute the count from the tensor (x.flatten(1), x.size(1)) so that your class itself is pruned"


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


def pruned(model: nn.Module, graph_module: fx.GraphModule, zigs: ZIGSet, mask: Mask, example_inputs: tuple,
           trace_options: dict[str, Any], check: bool = True, traced_in_train_mode: bool = False) -> nn.Module:
    """A physically smaller copy of `model` with `mask`'s dropped channels removed (`Analysis.prune`); with `check`,
    one that reproduces the masked model on `example_inputs`, or EquivalenceError. A rewritten graph of a forward
    that branches on `training` keeps the branch it was traced with (`traced_in_train_mode`): it is said."""
    mask.validate(zigs)
    keep = mask.component_keep(zigs)
    small = prune_copy(model, zigs, keep)
    patched = patch_literals(graph_module, small, zigs, keep)
    if not check:
        result = patched if patched is not None else small
        example_inputs_of[result] = example_inputs
        return result
    # checked on the CPU, where float32 is exact to the tolerance (a GPU's convolutions may run in TF32); a model
    # trained on a GPU failed the check there (H200, 2026-11-30), and comes back on its device
    device = device_of(model)
    reference = copy.deepcopy(model).cpu()
    zero_dropped(reference, zigs, keep)
    inputs = map_tensors(lambda t: t.cpu(), example_inputs)
    expected = run_eval(reference, inputs)
    branching = branching_modules(model, graph_module.graph)
    for candidate in (small, patched):
        if candidate is None:
            continue
        try:
            got = run_eval(candidate.cpu(), inputs)
        except Exception:
            continue
        if relative_difference(expected, got) <= EQUIVALENCE_TOLERANCE:
            if candidate is patched and branching:
                warnings.warn(AtofxWarning(f"{_REWRITTEN}, and {branching} branches on self.training: the graph runs "
                                           "the branch of the mode the model was compiled in, in train and eval mode "
                                           f"alike. {_COUNT_ADVICE}, or use this model in that mode only."), stacklevel=3)
            example_inputs_of[candidate] = example_inputs
            return candidate if device is None else candidate.to(device)
    if branching and patched is not None and traced_in_train_mode:
        raise EquivalenceError(
            f"{_REWRITTEN}, and {branching} branches on self.training: the graph keeps the branch of the mode the "
            "model was compiled in, and compiled in train mode it cannot match the model in eval mode, where the check "
            f"runs. Compile in eval mode (model.eval() before atofx.compile) to prune for inference; or: "
            f"{_COUNT_ADVICE[0].lower()}{_COUNT_ADVICE[1:]}.")
    ref_gm = trace(reference, **trace_options)
    new_gm = patched if patched is not None else trace(small, **trace_options)
    where = first_divergence(ref_gm, new_gm, inputs, zigs, keep, EQUIVALENCE_TOLERANCE)
    raise EquivalenceError(
        f"the pruned model differs from the masked model, first at {where}. This is an atofx bug or an op "
        "rule that is wrong for this model: please report it; meanwhile pin the channels that reach that op, "
        "ato.pin('layer') with a layer or space ato.report() lists, before training (or keep a module opaque "
        "with leaf_modules=[...])."
    )
