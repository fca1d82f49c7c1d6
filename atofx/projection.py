"""Group projections on ZIG parameters (ATO's target-model step), vectorised over all groups.

`ZIGParams` indexes, once, every parameter slice with role "out" of a prunable space: for each
position along the slice's dim, the ZIG id (`zigs.labels[slice.ids]`) it belongs to. Every
operation is then one reduction and one broadcast multiply per parameter tensor, with scatter
(`index_add_`) and gather over ZIG ids; there is no loop over channels or groups.

Per-group vectors (norms, lambdas, masks) are indexed by ZIG id (`len(zigs.comp_space)` entries);
ZIGs of pinned spaces have no indexed entries: their norm is 0 and projections leave them alone.

Step size: the proximal step is `lr * lambda_g`, with `lr` the optimiser's *current* learning rate
(`step_size(optimizer)`, after any scheduler), also for Adam/AdamW. ATO's official code does the
same: the projection is a separate step on the regulariser, not preconditioned by Adam's moments,
so the shrinkage per step is exactly `lr * lambda_g` in L2 norm whatever the optimiser.

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
    from atofx.model import ATOModel


@dataclass(frozen=True)
class _Slice:
    """One parameter dim: `zig[i]` is the ZIG id of position i, or `n_zigs` (a dummy slot) if not prunable.

    `other_dims` (the dims summed for a per-position norm) and `zig_along_dim` (`zig` shaped to broadcast
    along `dim`) are fixed, so the hot loop makes as few calls per slice as it can.
    """

    name: str
    param: Tensor
    dim: int
    zig: Tensor
    other_dims: tuple[int, ...]
    zig_along_dim: Tensor


class ZIGParams:
    """Index from ZIG ids to parameter entries; group norms and in-place projections on them.

    `params` maps "module.name" ("name" for the root module) to tensors, as `named_parameters()`
    gives; slices of tensors not in `params` (buffers) are skipped. Build it after moving the model
    to its device: index tensors are created on each parameter's device.
    """

    def __init__(self, zigs: ZIGSet, params: Mapping[str, Tensor]):
        self.zigs = zigs
        self.n_zigs = len(zigs.comp_space)
        prunable = ~np.array([s.pinned for s in zigs.spaces], dtype=bool)[zigs.comp_space]
        self._slices: list[_Slice] = []
        seen: set[tuple[str, int, bytes]] = set()
        for s in zigs.slices:
            name = f"{s.module}.{s.name}" if s.module else s.name
            if s.role != "out" or name not in params:
                continue
            p = params[name]
            if len(s.ids) != p.shape[s.dim]:
                raise AtofxError(f"slice {name} dim {s.dim} has {len(s.ids)} channels, the parameter {p.shape[s.dim]}.")
            comp = zigs.labels[s.ids]
            zig = np.where(prunable[comp], comp, self.n_zigs)
            key = (name, s.dim, zig.tobytes())
            if (zig == self.n_zigs).all() or key in seen:
                continue
            seen.add(key)
            index = torch.as_tensor(zig, dtype=torch.long, device=p.device)
            shape = tuple(-1 if d == s.dim else 1 for d in range(p.ndim))
            self._slices.append(_Slice(name, p, s.dim, index, tuple(d for d in range(p.ndim) if d != s.dim),
                                       index.view(shape)))
        dtypes = {e.param.dtype for e in self._slices}
        self._dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        # one device and the accumulation dtype everywhere (the usual case): no conversion per slice
        self._uniform = dtypes <= {self._dtype} and len({e.param.device for e in self._slices}) <= 1

    @classmethod
    def of(cls, ato: ATOModel) -> ZIGParams:
        """The index over a compiled model's own parameters."""
        return cls(ato.zigs, dict(ato.graph_module.named_parameters()))

    @property
    def names(self) -> list[str]:
        """Indexed parameter names, once each."""
        return list(dict.fromkeys(e.name for e in self._slices))

    def _device(self) -> torch.device:
        return self._slices[0].param.device if self._slices else torch.device("cpu")

    # ------------------------------------------------------------------ per-ZIG vectors
    def keep_vector(self, masks: Mapping[int, Tensor]) -> Tensor:
        """One float per ZIG id from one mask per space index (controller output); 1 for absent spaces."""
        vec = torch.ones(self.n_zigs, dtype=self._dtype, device=self._device())
        for index, bits in masks.items():
            comps = self.zigs.spaces[index].components
            if bits.shape != (len(comps),):
                raise MaskError(f"mask of space {index} has shape {tuple(bits.shape)}, expected ({len(comps)},).")
            vec[torch.as_tensor(comps, device=vec.device)] = bits.detach().to(vec)
        return vec

    def group_lambdas(self, masks: Mapping[int, Tensor], lam: float) -> Tensor:
        """lambda_g = lam * (1 - w_g) per ZIG id: only ZIGs the controller drops are penalised."""
        return lam * (1.0 - self.keep_vector(masks))

    def group_norms(self) -> Tensor:
        """L2 norm per ZIG id over all its entries in all its tensors (0 for pinned ZIGs)."""
        sq = torch.zeros(self.n_zigs + 1, dtype=self._dtype, device=self._device())
        for e in self._slices:
            x = e.param.detach()
            if not self._uniform:
                x = x.to(sq.device, self._dtype)
            x = x.square().sum(dim=e.other_dims) if e.other_dims else x.square()
            sq.index_add_(0, e.zig if self._uniform else e.zig.to(sq.device), x)
        return sq[:-1].sqrt()

    def step_size(self, optimizer: torch.optim.Optimizer) -> float:
        """The optimiser's current learning rate for the ZIG parameters: the proximal step (module docstring)."""
        indexed = {id(e.param) for e in self._slices}
        rates = {float(g["lr"]) for g in optimizer.param_groups if any(id(p) in indexed for p in g["params"])}
        if len(rates) != 1:
            raise AtofxError(f"the ZIG parameters need one learning rate in the optimiser, found {sorted(rates)}.")
        return rates.pop()

    # ------------------------------------------------------------------ in-place projections
    @torch.no_grad()
    def scale_(self, factor: Tensor) -> None:
        """x_g <- factor_g * x_g for every ZIG id g (factor exactly 1 leaves a group bit-identical)."""
        if factor.shape != (self.n_zigs,):
            raise MaskError(f"expected one factor per ZIG ({self.n_zigs},), got {tuple(factor.shape)}.")
        full = torch.cat([factor, factor.new_ones(1)])
        if self._uniform:
            full = full.to(self._device(), self._dtype)
            for e in self._slices:
                e.param.mul_(full[e.zig_along_dim])
            return
        for e in self._slices:
            x = e.param
            x.mul_(full.to(x.device, x.dtype)[e.zig_along_dim.to(x.device)])

    def zero_(self, groups: Tensor) -> None:
        """Set the ZIGs where `groups` (one bool per ZIG id, e.g. `keep_vector(masks) == 0`) is True exactly to zero."""
        self.scale_(torch.where(groups.to(self._device(), torch.bool), 0.0, 1.0).to(self._dtype))

    def proximal_group_lasso_(self, lam: Tensor, lr: float) -> None:
        """Proximal step of lr * sum_g lam_g ||x_g|| (Eq. 3): x_g *= max(0, 1 - lr * lam_g / ||x_g||).

        Groups with lam_g == 0 are untouched; groups with ||x_g|| <= lr * lam_g become exactly zero.
        """
        lam = self._lambdas(lam)
        shrink = torch.clamp(1.0 - lr * lam / self.group_norms(), min=0.0)
        self.scale_(torch.where(lam > 0, shrink, 1.0))

    def half_space_project_(self, lam: Tensor, lr: float, eps: float = 0.0) -> None:
        """OTO's half-space projector (Eq. 2) on groups with lam_g > 0.

        Trial point x~_g = x_g - lr * lam_g * x_g / ||x_g||; the group becomes exactly zero where
        x~_g . x_g < eps * ||x_g||^2 (it left the half-space), else it takes x~_g. Since x~_g is
        (1 - lr * lam_g / ||x_g||) x_g, the test reads 1 - lr * lam_g / ||x_g|| < eps: with eps = 0
        this is the proximal step; eps in (0, 1) zeroes groups earlier.
        """
        lam = self._lambdas(lam)
        step = 1.0 - lr * lam / self.group_norms()
        projected = torch.where(step < eps, 0.0, step)
        self.scale_(torch.where(lam > 0, projected, 1.0))

    def _lambdas(self, lam: Tensor) -> Tensor:
        """Checked lambdas (>= 0 is the caller's contract: checking would sync the device every step)."""
        if lam.shape != (self.n_zigs,):
            raise MaskError(f"expected one lambda per ZIG ({self.n_zigs},), got {tuple(lam.shape)}.")
        return lam.detach().to(self._device(), self._dtype)
