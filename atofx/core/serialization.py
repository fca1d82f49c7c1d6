"""Saving and loading pruned models without ever running code from the file.

A file is a plain `torch.save` dict of tensors, numbers and strings, read back with
`torch.load(..., weights_only=True)`. It holds the state dict, the channel attributes of
every layer (so a fresh instance of the user's own model can be shrunk to fit it), and,
when the model traces, its torch.fx graph in a data form whose ops and layer classes are
resolved only from an allow-list (torch.nn layers and the functions of the op table `OPS`),
so `atofx.load(path)` rebuilds a runnable module with no source at all.
"""

from __future__ import annotations

import hashlib
import importlib
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from atofx.core.files import ACCESS_ERRORS, atomic_save, load_failure, require_folder_of, safe_load
from atofx.errors import AtofxError, UnsafeCheckpointError
from atofx.passes.equivalence import relative_difference, run_eval
from atofx.passes.op_rules import OPS
from atofx.passes.tracing import trace

FORMAT = "atofx.pruned"
VERSION = 2  # 2: a "checksum" of the tensors; version-1 files (none) load unchecked
_CHANNEL_ATTRS = OPS.saved_attrs()  # the width attributes the op table's layer entries declare
_PLAIN = (int, float, bool, str, type(None))

# example inputs of modules returned by ATOModel.prune, so save() can check its graph
example_inputs_of: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _qualname(fn: Any) -> str:
    # torch's boolean_dispatch wrappers (F.max_pool2d, F.adaptive_max_pool1d, ...) share one __qualname__
    name = fn.__name__ if "<locals>" in fn.__qualname__ else fn.__qualname__
    return f"{fn.__module__}.{name}" if getattr(fn, "__module__", None) else name


def _allowed_functions() -> dict[str, Any]:
    return {_qualname(f): f for f in OPS.functions() if hasattr(f, "__qualname__")}


_NN_INTERNALS = set(vars(nn.Module())) - {"training"}


# ---------------------------------------------------------------- graph as data


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot store a graph argument of type {type(value).__name__}")


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "node":
        return nodes[body]
    if tag == "tuple":
        return tuple(_decode(v, nodes) for v in body)
    if tag == "dict":
        return {k: _decode(v, nodes) for k, v in body}
    if tag == "slice":
        return slice(*(_decode(v, nodes) for v in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag in ("dtype", "memory_format"):
        found = getattr(torch, body, None)
        if not isinstance(found, (torch.dtype, torch.memory_format)):
            raise UnsafeCheckpointError(f"unknown {tag} '{body}' in the saved graph")
        return found
    if tag == "device":
        return torch.device(body)
    raise UnsafeCheckpointError(f"unknown tag '{tag}' in the saved graph")


def _plain_state(m: nn.Module) -> dict[str, Any]:
    state = {}
    for k, v in vars(m).items():
        if k in _NN_INTERNALS:
            continue
        if isinstance(v, _PLAIN) or (isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v)):
            state[k] = v
        else:
            raise TypeError(f"layer {type(m).__name__} keeps a {type(v).__name__} in '{k}'")
    return state


def _graph_record(gm: fx.GraphModule) -> dict[str, Any]:
    allowed = _allowed_functions()
    nodes, modules = [], {}
    for n in gm.graph.nodes:
        target: Any = n.target
        if n.op == "call_function":
            target = _qualname(n.target)
            if target not in allowed:
                raise TypeError(f"function {target} is not on the allow-list")
        elif n.op == "call_module":
            m = gm.get_submodule(n.target)
            cls = type(m)
            if not cls.__module__.startswith("torch.nn.") or next(m.children(), None) is not None:
                raise TypeError(f"layer class {cls.__qualname__} is not a plain torch.nn layer")
            modules[n.target] = {"class": f"{cls.__module__}:{cls.__qualname__}", "state": _plain_state(m),
                                 "none_parameters": [k for k, v in m._parameters.items() if v is None],
                                 "none_buffers": [k for k, v in m._buffers.items() if v is None]}
        nodes.append({"op": n.op, "name": n.name, "target": target, "args": _encode(n.args),
                      "kwargs": _encode(n.kwargs)})
    params = [k for k, _ in gm.named_parameters()]
    return {"nodes": nodes, "modules": modules, "parameters": params}


def _resolve_layer(spec: str) -> type[nn.Module]:
    module_name, _, qualname = spec.partition(":")
    if not module_name.startswith("torch.nn.") or "." in qualname:
        raise UnsafeCheckpointError(f"layer class '{spec}' is not a torch.nn layer; refusing to load it")
    cls = getattr(importlib.import_module(module_name), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UnsafeCheckpointError(f"'{spec}' is not a torch.nn layer; refusing to load it")
    return cls


def _set_path(root: nn.Module, path: str, value: nn.Module | torch.Tensor, parameter: bool) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for p in parents:
        if not hasattr(owner, p):
            owner.add_module(p, nn.Module())
        owner = getattr(owner, p)
    if isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    elif parameter:
        owner.register_parameter(leaf, nn.Parameter(value))
    else:
        owner.register_buffer(leaf, value)


def _rebuild(record: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> fx.GraphModule:
    allowed = _allowed_functions()
    root = nn.Module()
    params = set(record["parameters"])
    for path, spec in record["modules"].items():
        cls = _resolve_layer(spec["class"])
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.__dict__.update(spec["state"])
        for name in spec["none_parameters"]:
            layer.register_parameter(name, None)
        for name in spec["none_buffers"]:
            layer.register_buffer(name, None)
        _set_path(root, path, layer, False)
    for key, tensor in state_dict.items():
        _set_path(root, key, torch.empty_like(tensor), key in params)
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in record["nodes"]:
        target = spec["target"]
        if spec["op"] == "call_function":
            if target not in allowed:
                raise UnsafeCheckpointError(f"the saved graph calls {target}, which is not on the allow-list")
            target = allowed[target]
        elif spec["op"] == "call_method" and (not hasattr(torch.Tensor, target) or target.startswith("_")):
            raise UnsafeCheckpointError(f"the saved graph calls method {target!r}, which tensors do not have")
        node = graph.create_node(spec["op"], target, _decode(spec["args"], nodes), _decode(spec["kwargs"], nodes),
                                 name=spec["name"])
        nodes[spec["name"]] = node
    gm = fx.GraphModule(root, graph, "PrunedModel")
    gm.load_state_dict(state_dict, strict=True)
    return gm


# ---------------------------------------------------------------- public API


def tensor_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: a flipped byte in the file changes it.

    torch.load does not check the zip's CRCs, so a damaged file would otherwise load with wrong weights.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_tensors(path: str | Path, payload: dict[str, Any]) -> None:
    """Refuse a file whose tensors no longer match the checksum written with them."""
    expected = payload.get("checksum")
    if expected is None and payload.get("version", 1) < 2:
        return
    state = payload.get("state_dict")
    if not isinstance(state, dict) or expected != tensor_checksum(state):
        raise AtofxError(f"{path} is damaged: its tensors do not match the checksum written with them (a disk or "
                         "copy error). Copy or save the model again; do not use this file.")


def save(model: nn.Module, path: str | Path, example_inputs: Any = None) -> Path:
    """Save a (pruned) model so that `atofx.load` can rebuild it in a new process."""
    if not isinstance(model, nn.Module):  # a state_dict, or the ATOModel itself
        raise AtofxError(f"atofx.save takes the model (an nn.Module), got {type(model).__name__}: save "
                         "ato.prune()'s result, or ato.model for the trained model before pruning.")
    path = Path(path).expanduser()
    require_folder_of(path)  # before the graph is traced and rebuilt, which can take a while
    inputs = example_inputs if example_inputs is not None else example_inputs_of.get(model)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    record, why = None, None
    try:
        gm = model if isinstance(model, fx.GraphModule) else trace(model)
        record = _graph_record(gm)
        if inputs is not None:
            rebuilt = _rebuild(record, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if relative_difference(run_eval(model, tuple(inputs)), run_eval(rebuilt, tuple(inputs))) > 1e-6:
                raise TypeError("the rebuilt graph does not reproduce the model")
    except Exception as exc:  # any reason not to store a graph: loading then needs model=
        record, why = None, str(exc)
    layers = {name: {a: getattr(m, a) for a in _CHANNEL_ATTRS if isinstance(getattr(m, a, None), int)}
              for name, m in model.named_modules()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "state_dict": state,
        "checksum": tensor_checksum(state),
        "layers": {k: v for k, v in layers.items() if v},
        "graph": record,
        "graph_missing_because": why,
        # shapes of the example inputs (what `atofx export` feeds the exporter); None when unknown
        "example_shapes": [list(x.shape) for x in inputs] if inputs is not None
        and all(isinstance(x, torch.Tensor) for x in inputs) else None,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        # its forward is its torch.fx graph (what ato.prune returns when it rewrote numbers in the forward), not
        # the source of its class; files without the key tell it by their class (GraphModule.__new__.<locals>...)
        "forward_is_graph": isinstance(model, fx.GraphModule),
    }
    return atomic_save(payload, path)


def read_payload(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True; a file that would run code raises UnsafeCheckpointError."""
    try:
        payload = safe_load(path, "carries code or objects that are not plain tensors and numbers; it was refused "
                                  "without running it. Only load files from sources you trust with torch.load directly.")
    except (*ACCESS_ERRORS, UnsafeCheckpointError):
        raise
    except Exception as exc:  # truncated zip (an OSError at some lengths), empty file, stray bytes: many ways to fail
        raise AtofxError(f"{path} is damaged or not a file written by atofx.save ({load_failure(exc)})") from exc
    return payload


def _shrink_into(model: nn.Module, payload: dict[str, Any]) -> nn.Module:
    state = payload["state_dict"]
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            owner_path, _, name = key.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            old = getattr(owner, name)
            new = torch.empty_like(tensor, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                owner.register_buffer(name, new)
    for path, attrs in payload["layers"].items():
        layer = model.get_submodule(path) if path else model
        for a, v in attrs.items():
            setattr(layer, a, v)
    model.load_state_dict(state, strict=True)
    return model


def _first(keys: list[str], shapes: dict[str, Any], limit: int = 3) -> str:
    shown = ", ".join(f"{k} {tuple(shapes[k])}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` out of `model`, in a line: the first tensors only one side has, or whose rank differs."""
    own = {k: v.shape for k, v in model.state_dict().items()}
    saved = {k: v.shape for k, v in state.items()}
    only_file = [k for k in saved if k not in own]
    only_model = [k for k in own if k not in saved]
    rank = [k for k in saved if k in own and len(saved[k]) != len(own[k])]
    parts = []
    if only_file:
        parts.append(f"the file has {len(only_file)} tensors the model lacks: {_first(only_file, saved)}")
    if only_model:
        parts.append(f"the model has {len(only_model)} tensors the file lacks: {_first(only_model, own)}")
    if rank:
        parts.append("tensors of another rank: " + ", ".join(f"{k} saved {tuple(saved[k])}, model {tuple(own[k])}"
                                                               for k in rank[:3]))
    return "; ".join(parts) or None


def _forward_is_graph(payload: dict[str, Any]) -> bool:
    recorded = payload.get("forward_is_graph")
    return recorded if isinstance(recorded, bool) else payload["class"].startswith(f"{fx.GraphModule.__module__}.")


def _runs_the_saved_graph(model: nn.Module, record: dict[str, Any] | None) -> bool:
    """Whether `model` computes the stored graph: the same nodes, numbers and all."""
    if record is None:
        return False
    try:
        return _graph_record(model if isinstance(model, fx.GraphModule) else trace(model))["nodes"] == record["nodes"]
    except Exception:  # untraceable, or off the allow-list: not the saved graph
        return False


def _refuse_other_forward(path: str | Path, payload: dict[str, Any], model: nn.Module) -> None:
    """Refuse to fill `model` with a file whose forward was rewritten unless `model` runs that very graph."""
    if not _forward_is_graph(payload) or _runs_the_saved_graph(model, payload["graph"]):
        return
    rewritten = (f"{path} holds a pruned model whose forward is a rewritten torch.fx graph (pruning changed channel "
                 "numbers written in the forward: a slice, reshape or split), so "
                 f"{type(model).__name__}'s own forward would compute something else with these weights")
    if payload["graph"] is not None:
        raise AtofxError(f"{rewritten}. Load it without model=: atofx.load(path) returns it as a torch.fx.GraphModule.")
    raise AtofxError(f"{rewritten}, and the file holds no graph ({payload['graph_missing_because']}), so it cannot be "
                     "loaded. Keep the module ato.prune() returned, or torch.save it whole.")


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by `atofx.save`; the two forms return different types.

    Without `model`: a `torch.fx.GraphModule` rebuilt from the stored graph (no source needed; its
    submodules keep the saved names, its class is not yours).
    With `model`: that very instance (a fresh, unpruned one of the same architecture), shrunk to the
    saved widths and loaded; you get your own classes and methods back. A file whose forward atofx
    rewrote (a GraphModule from `ato.prune`) is refused unless `model` traces to that same graph.
    A file whose tensors do not match their checksum is refused as damaged.
    """
    payload = read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AtofxError(f"{path} is not an atofx pruned-model file; save one with atofx.save(model, path).")
    _check_tensors(path, payload)
    if model is not None:
        fits = f"{path} does not fit the given model ({payload['class']} was saved)"
        why = _mismatch(model, payload["state_dict"])
        if why is not None:
            raise AtofxError(f"{fits}: {why}. Pass a fresh instance of the saved architecture.")
        _refuse_other_forward(path, payload, model)  # its forward's code does not depend on its widths: checked first
        try:
            _shrink_into(model, payload)
        except (RuntimeError, AttributeError, KeyError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AtofxError(f"{fits}: {first_line[:300]}") from exc
        return model
    if payload["graph"] is None:
        raise AtofxError(
            f"{path} holds no graph ({payload['graph_missing_because']}); load it into a fresh instance of the "
            f"model: atofx.load(path, model={payload['class'].rsplit('.', 1)[-1]}(...))."
        )
    return _rebuild(payload["graph"], payload["state_dict"])
