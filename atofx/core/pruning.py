"""Applying a mask: zeroing the dropped ZIGs in place, or building the smaller model and checking it."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from atofx.core.mask import Mask
from atofx.core.nested import map_tensors
from atofx.core.serialization import example_inputs_of
from atofx.errors import EquivalenceError
from atofx.passes.equivalence import first_divergence, relative_difference, run_eval
from atofx.passes.rewrite import patch_literals, prune_copy
from atofx.passes.tracing import mode_branches, trace
from atofx.passes.values import device_of
from atofx.passes.zig_inference import ZIGSet

EQUIVALENCE_TOLERANCE = 1e-5


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
           trace_options: dict[str, Any], check: bool = True) -> nn.Module:
    """A physically smaller copy of `model` with `mask`'s dropped channels removed (`Analysis.prune`); with `check`,
    one that reproduces the masked model on `example_inputs`, or EquivalenceError."""
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
    branches = mode_branches(graph_module.graph)
    for candidate in (small, patched):
        if candidate is None or (candidate is patched and branches):  # a graph of one mode: wrong in the other
            continue
        try:
            got = run_eval(candidate.cpu(), inputs)
        except Exception:
            continue
        if relative_difference(expected, got) <= EQUIVALENCE_TOLERANCE:
            example_inputs_of[candidate] = example_inputs
            return candidate if device is None else candidate.to(device)
    ref_gm = trace(reference, **trace_options)
    new_gm = patched if patched is not None else trace(small, **trace_options)
    where = first_divergence(ref_gm, new_gm, inputs, zigs, keep, EQUIVALENCE_TOLERANCE)
    raise EquivalenceError(
        f"the pruned model differs from the masked model, first at {where}. This is an atofx bug or an op "
        "rule that is wrong for this model: please report it; meanwhile pin the channels that reach that op, "
        "ato.pin('layer') with a layer or space ato.report() lists, before training (or keep a module opaque "
        "with leaf_modules=[...])."
    )
