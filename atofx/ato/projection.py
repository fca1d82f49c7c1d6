"""Group projections on ZIG parameters (ATO's target-model step), vectorised over all groups.

`ZIGParams` indexes, once, every parameter slice with role "out" of a prunable space: for each
position along the slice's dim, the ZIG id (`zigs.labels[slice.ids]`) it belongs to. Every
operation is then one reduction and one broadcast multiply per parameter tensor, with scatter
(`index_add_`) and gather over ZIG ids; there is no loop over channels or groups.

Per-group vectors (norms, lambdas, masks) are indexed by ZIG id (`len(zigs.comp_space)` entries);
ZIGs of pinned spaces have no indexed entries: their norm is 0 and projections leave them alone.

Step size: the proximal step shrinks group g by `lr * lambda_g` in L2 norm, with `lr` the optimiser's
*current* learning rate (`step_size(optimizer)`, after any scheduler), also for Adam/AdamW: the
projection is a separate step on the regulariser, not preconditioned by Adam's moments. What
`lambda_g` is, is the trainer's choice (`ATOConfig.step_size`): `lam * r_l` with `r_l` the group's space's
share of all dropped groups, as the authors' released code does (`project_wegit`; the default since the
Fashion-MNIST ablation), or `lam` for every dropped group (atofx's earlier default); with tens of spaces r_l
is a few percent, and under their AdamW lr of 1e-3 a dropped group decays over many steps instead of
vanishing in one or two.

Two projections: the proximal group-lasso step (Eq. 3) and OTO's half-space projector (Eq. 2), which
tests a trial point against the group's previous value (`half_space_project_`); they differ.

A position may belong to several ZIGs (a module called twice gives two "out" slices on the same
parameter dim): it counts in the norm of each, and its scale factors multiply (zeroed if any
group is zeroed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from atofx.errors import AtofxError, MaskError
from atofx.passes.zig_inference import ZIGSet

if TYPE_CHECKING:
    from atofx.core.analysis import Analysis


@dataclass(frozen=True)
class _Slice:
    """One parameter dim: `zig[i]` is the ZIG id of position i, or `n_zigs` (a dummy slot) if not prunable.

    `other_dims` are the dims a per-position norm runs over (all but the slice's dim); `along_dim` shapes one
    value per position to broadcast along the slice's dim.
    """

    name: str
    param: Tensor
    zig: Tensor
    other_dims: tuple[int, ...]
    along_dim: tuple[int, ...]


class ZIGParams:
    """Index from ZIG ids to parameter entries; group norms and in-place projections on them.

    `params` maps "module.name" ("name" for the root module) to tensors, as `named_parameters()`
    gives; slices of tensors not in `params` (buffers) are skipped. Build it after moving the model
    to its device: index tensors are created on the accumulation device.

    The projection runs after every optimiser step, so its cost is a count of small kernel calls: the
    1-D tensors (biases, norm affines) are concatenated and squared as one, every position's squared norm
    lands in its ZIG with one scatter, and the factors come back with one gather; each slice then costs
    one norm and one multiply.
    """

    def __init__(self, zigs: ZIGSet, params: Mapping[str, Tensor]):
        self.zigs = zigs
        self.n_zigs = len(zigs.comp_space)
        prunable = ~np.array([s.pinned for s in zigs.spaces], dtype=bool)[zigs.comp_space]
        found: list[tuple[str, Tensor, int, np.ndarray]] = []
        seen: set[tuple[int, int, bytes]] = set()  # one tensor may have several names (a weight shared by two layers)
        for s in zigs.slices:
            name = f"{s.module}.{s.name}" if s.module else s.name
            if s.role != "out" or name not in params:
                continue
            p = params[name]
            if len(s.ids) != p.shape[s.dim]:
                raise AtofxError(f"slice {name} dim {s.dim} has {len(s.ids)} channels, the parameter {p.shape[s.dim]}.")
            comp = zigs.labels[s.ids]
            zig = np.where(prunable[comp], comp, self.n_zigs)
            key = (id(p), s.dim, zig.tobytes())
            if (zig == self.n_zigs).all() or key in seen:
                continue
            seen.add(key)
            found.append((name, p, s.dim, zig))
        dtypes = {p.dtype for _, p, _, _ in found}
        self._dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._device = found[0][1].device if found else torch.device("cpu")
        slices = [_Slice(name, p, torch.as_tensor(zig, dtype=torch.long, device=self._device),
                         tuple(d for d in range(p.ndim) if d != dim),
                         tuple(-1 if d == dim else 1 for d in range(p.ndim)))
                  for name, p, dim, zig in found]
        # 1-D tensors first: their concatenation is the first block of every per-position vector
        self._vectors = [e for e in slices if e.param.ndim == 1]
        self._blocks = [e for e in slices if e.param.ndim > 1]
        self._slices = self._vectors + self._blocks
        self._zig = torch.cat([e.zig for e in self._slices]) if slices else torch.zeros(0, dtype=torch.long)
        self._names = list(dict.fromkeys(e.name for e in slices))
        # per-position buffers, written in place each step; the views into them are made once
        self._norms = torch.zeros(len(self._zig), dtype=self._dtype, device=self._device)
        self._factors = torch.ones_like(self._norms)
        ends = np.cumsum([len(e.zig) for e in self._slices]).tolist()
        starts = [0] + ends[:-1]
        n_vectors = len(self._vectors)
        self._vector_norms = self._norms[: sum(len(e.zig) for e in self._vectors)]
        self._block_norms = [self._norms[a:b] for a, b in zip(starts[n_vectors:], ends[n_vectors:], strict=True)]
        self._scales = [(e.param, self._factors[a:b].view(e.along_dim), e.param.device != self._device)
                        for e, a, b in zip(self._slices, starts, ends, strict=True)]
        self._previous: dict[int, Tensor] | None = None  # x_k for the half-space test, per parameter id

    @classmethod
    def of(cls, ato: Analysis) -> ZIGParams:
        """The index over a compiled model's own parameters."""
        return cls(ato.zigs, dict(ato.graph_module.named_parameters(remove_duplicate=False)))

    @property
    def names(self) -> list[str]:
        """Indexed parameter names, once each."""
        return list(self._names)

    # ------------------------------------------------------------------ per-ZIG vectors
    def keep_vector(self, masks: Mapping[int, Tensor]) -> Tensor:
        """One float per ZIG id from one mask per space index (controller output); 1 for absent spaces."""
        vec = torch.ones(self.n_zigs, dtype=self._dtype, device=self._device)
        for index, bits in masks.items():
            comps = self.zigs.spaces[index].components
            if bits.shape != (len(comps),):
                raise MaskError(f"mask of space {index} has shape {tuple(bits.shape)}, expected ({len(comps)},).")
            vec[torch.as_tensor(comps, device=vec.device)] = bits.detach().to(vec)
        return vec

    def group_lambdas(self, masks: Mapping[int, Tensor], lam: float, per_space_share: bool = False) -> Tensor:
        """lambda_g = lam * (1 - w_g) per ZIG id: only ZIGs the controller drops are penalised.

        `per_space_share`: times r_l, the share of all dropped ZIGs that lie in g's space (the authors'
        `project_wegit`); the more of the dropped ZIGs a space holds, the faster its groups shrink.
        """
        lam_g = lam * (1.0 - self.keep_vector(masks))
        if per_space_share:
            dropped = {k: float((1.0 - bits.detach().float()).sum()) for k, bits in masks.items()}
            total = sum(dropped.values())
            for k, n in dropped.items():
                if n > 0:
                    comps = torch.as_tensor(self.zigs.spaces[k].components, device=lam_g.device)
                    lam_g[comps] *= n / total
        return lam_g

    @torch.no_grad()
    def group_norms(self) -> Tensor:
        """L2 norm per ZIG id over all its entries in all its tensors (0 for pinned ZIGs)."""
        if self._vectors:
            torch.cat([self._accumulated(e.param) for e in self._vectors], out=self._vector_norms)
        for e, out in zip(self._blocks, self._block_norms, strict=True):
            torch.linalg.vector_norm(self._accumulated(e.param), dim=e.other_dims, out=out)
        sq = torch.zeros(self.n_zigs + 1, dtype=self._dtype, device=self._device)
        sq.index_add_(0, self._zig, self._norms.square())
        return sq[:-1].sqrt()

    def _accumulated(self, x: Tensor) -> Tensor:
        """`x` in the accumulation dtype and device (itself, without a copy, in the usual case)."""
        return x.to(self._device, self._dtype)

    def step_size(self, optimizer: torch.optim.Optimizer) -> float:
        """The optimiser's current learning rate for the ZIG parameters: the proximal step (module docstring)."""
        indexed = {id(e.param) for e in self._slices}
        rates = {float(g["lr"]) for g in optimizer.param_groups if any(id(p) in indexed for p in g["params"])}
        if not rates:
            raise AtofxError("the optimiser holds none of the model's prunable parameters: build it over the "
                             "parameters of the model you compiled (ato.model.parameters()).")
        if len(rates) != 1:
            raise AtofxError(f"the prunable layers need one learning rate in the optimiser (the projection's step "
                             f"follows it), found {sorted(rates)}: give their parameter groups one lr (they may differ "
                             "in weight decay), or keep the layers with another rate out of pruning with pin=[...].")
        return rates.pop()

    # ------------------------------------------------------------------ in-place projections
    @torch.no_grad()
    def scale_(self, factor: Tensor) -> None:
        """x_g <- factor_g * x_g for every ZIG id g (factor exactly 1 leaves a group bit-identical)."""
        if factor.shape != (self.n_zigs,):
            raise MaskError(f"expected one factor per ZIG ({self.n_zigs},), got {tuple(factor.shape)}.")
        full = torch.cat([self._accumulated(factor), factor.new_ones(1, dtype=self._dtype, device=self._device)])
        torch.index_select(full, 0, self._zig, out=self._factors)
        for param, f, elsewhere in self._scales:
            param.mul_(f.to(param.device) if elsewhere else f)

    def zero_(self, groups: Tensor) -> None:
        """Set the ZIGs where `groups` (one bool per ZIG id, e.g. `keep_vector(masks) == 0`) is True exactly to zero."""
        self.scale_(torch.where(groups.to(self._device, torch.bool), 0.0, 1.0).to(self._dtype))

    def proximal_group_lasso_(self, lam: Tensor, lr: float) -> None:
        """Proximal step of lr * sum_g lam_g ||x_g|| (Eq. 3): x_g *= max(0, 1 - lr * lam_g / ||x_g||).

        Groups with lam_g == 0 are untouched; groups with ||x_g|| <= lr * lam_g become exactly zero.
        """
        lam = self._lambdas(lam)
        # a zero group stays zero, also at lr 0 (a cosine schedule's last step), where 0 / 0 would make it NaN
        norms = self.group_norms().clamp_min(torch.finfo(self._dtype).tiny)
        shrink = torch.clamp(1.0 - lr * lam / norms, min=0.0)
        self.scale_(torch.where(lam > 0, shrink, 1.0))

    @torch.no_grad()
    def remember_(self) -> None:
        """Keep a copy of every indexed tensor: the reference point x_k of the next half-space test."""
        if self._previous is None:
            self._previous = {id(e.param): e.param.detach().clone() for e in self._slices}
        else:
            for e in self._slices:
                self._previous[id(e.param)].copy_(e.param)

    @torch.no_grad()
    def half_space_project_(self, lam: Tensor, lr: float, eps: float = 0.1) -> None:
        """OTO's half-space projector (Eq. 2) on groups with lam_g > 0, after the optimiser's step.

        x_g is the group's value before this step (the point `remember_` kept; without one, the current
        value), y_g the value the optimiser's step left. The trial point is y_g - lr * lam_g * x_g / ||x_g||
        (the step of f + lambda * ||x_g||); the group becomes exactly zero when the trial point leaves the
        half-space {z : z . x_g >= eps * ||x_g||^2}, or when x_g was already zero; else it takes the trial
        point. Unlike the proximal step, the test looks at where the gradient step went: a group the task
        loss pulls towards zero by more than (1 - eps) of its norm is zeroed at once, and one it pushes
        away is not shrunk to zero however small it is. OTO's eps (and the authors' --epsilon) is 0.1.
        """
        lam = self._lambdas(lam)
        previous = self._previous
        ref = {id(e.param): (previous[id(e.param)] if previous is not None else e.param.detach().clone())
               for e in self._slices}
        sq = torch.zeros(self.n_zigs + 1, dtype=self._dtype, device=self._device)
        dot = torch.zeros_like(sq)
        for e in self._slices:
            x, y = self._accumulated(ref[id(e.param)]), self._accumulated(e.param)
            dims = e.other_dims
            sq.index_add_(0, e.zig, (x * x).sum(dims) if dims else x * x)
            dot.index_add_(0, e.zig, (x * y).sum(dims) if dims else x * y)
        norm = sq[:-1].sqrt()
        step = torch.where(norm > 0, lr * lam / norm.clamp_min(torch.finfo(self._dtype).tiny), 0.0)
        trial_dot = dot[:-1] - step * sq[:-1]  # (y_g - step_g * x_g) . x_g
        zeroed = (lam > 0) & ((trial_dot < eps * sq[:-1]) | (norm == 0))
        shift = torch.cat([torch.where(lam > 0, step, 0.0), step.new_zeros(1)])
        for e in self._slices:
            c = shift.index_select(0, e.zig).view(e.along_dim)
            e.param.sub_((c * self._accumulated(ref[id(e.param)])).to(e.param.device, e.param.dtype))
        self.scale_(torch.where(zeroed, 0.0, 1.0).to(self._dtype))

    def _lambdas(self, lam: Tensor) -> Tensor:
        """Checked lambdas (>= 0 is the caller's contract: checking would sync the device every step)."""
        if lam.shape != (self.n_zigs,):
            raise MaskError(f"expected one lambda per ZIG ({self.n_zigs},), got {tuple(lam.shape)}.")
        return lam.detach().to(self._device, self._dtype)
