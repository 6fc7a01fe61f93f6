"""A float64 AdamW with per-step LR multipliers: the numerical reference for every backend.

Independent of the backends' code: Python-float scalars, float64 tensors, the textbook order of
torch's AdamW (decoupled decay first, then Adam). Tests and ``benchmarks/bench_numerics.py``
measure each backend's error against it; it is the only float64 AdamW of the project.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Fp64AdamW"]

_HP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


class Fp64AdamW:
    """An independent float64 AdamW with per-step LR multipliers: the numerical reference.

    Args:
        params: tensors (copied to float64; real parameters only), or torch-style parameter
            groups (dicts with ``"params"`` and any of the hyperparameters below).
        lr, betas, eps, weight_decay, amsgrad, maximize: as in :class:`torch.optim.AdamW`
            (the defaults of every group).
        mult, wd_mult: the LR and weight-decay multipliers of the ``(k+1)``-th applied step,
            as callables of ``k``; or
        lr_table, wd_table: the multipliers as tables, read at ``min(k, T - 1)`` as the
            optimizer reads its device tables (the tables win over ``mult``/``wd_mult``).
        independent: ``weight_decay_mode="independent"`` (decay by ``wd * m`` instead of
            ``lr * m * wd``).
        groups, group_index: instead of group dicts, flat ``params`` with each one's group
            (``group_index[i]`` indexes ``groups``, dicts of hyperparameter overrides).
        state: initial per-parameter states (dicts with ``exp_avg``, ``exp_avg_sq``,
            ``max_exp_avg_sq``, ``step``), as a warm optimizer holds them; default zeros.
        step_count: the schedule position to start at (``k``).
        storage_dtypes: per parameter, the dtype its values are stored in between steps (a
            kernel that stores parameters and states in bf16 rounds them every step), or a
            (parameter, exp_avg, exp_avg_sq) tuple of dtypes (moments stored in another dtype:
            ``exp_avg_dtype``; max_exp_avg_sq as exp_avg_sq); None keeps everything in float64.

    ``step(grads, grad_scale=None, found_inf=None)``: a ``None`` gradient leaves its parameter
    (and its per-parameter step) alone; ``grad_scale`` divides the gradients (AMP); a nonzero
    ``found_inf`` makes the whole step a no-op, schedule position included.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        mult: Callable[[int], float] = lambda i: 1.0,
        wd_mult: Callable[[int], float] = lambda i: 1.0,
        independent: bool = False,
        *,
        lr_table: Sequence[float] | Tensor | None = None,
        wd_table: Sequence[float] | Tensor | None = None,
        groups: Sequence[dict[str, Any]] | None = None,
        group_index: Sequence[int] | None = None,
        state: Sequence[dict[str, Any]] | None = None,
        step_count: int = 0,
        storage_dtypes: Sequence[torch.dtype] | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        params = list(params)
        if params and isinstance(params[0], dict):
            flat, groups, group_index = [], [], []
            for gi, g in enumerate(params):
                flat += list(g["params"])
                group_index += [gi] * len(g["params"])
                groups.append({k: v for k, v in g.items() if k != "params"})
            params = flat
        groups = list(groups) if groups is not None else [{}]
        self.group_index = list(group_index) if group_index is not None else [0] * len(params)
        self.h = [{**defaults, **{k: g[k] for k in _HP_KEYS if k in g}} for g in groups]
        self.p = [p.detach().to(torch.float64).clone() for p in params]
        init = list(state) if state is not None else [{}] * len(self.p)

        def start(i: int, key: str) -> Tensor:
            t = init[i].get(key)
            return torch.zeros_like(self.p[i]) if t is None or t.numel() == 0 else t.detach().double().clone()

        self.m = [start(i, "exp_avg") for i in range(len(self.p))]
        self.v = [start(i, "exp_avg_sq") for i in range(len(self.p))]
        self.vmax = [start(i, "max_exp_avg_sq") for i in range(len(self.p))]
        self.steps = [int(float(init[i].get("step", 0))) for i in range(len(self.p))]
        self.k = int(step_count)
        if lr_table is not None:
            mult = _clamped(lr_table)
        if wd_table is not None:
            wd_mult = _clamped(wd_table)
        self.mult, self.wd_mult, self.independent = mult, wd_mult, independent
        self.storage_dtypes = None if storage_dtypes is None else list(storage_dtypes)

    def step(self, grads, grad_scale: float | Tensor | None = None, found_inf: float | Tensor | None = None) -> None:
        if found_inf is not None and float(found_inf) != 0.0:
            return
        m_k, wm_k = float(self.mult(self.k)), float(self.wd_mult(self.k))
        for i, g in enumerate(grads):
            if g is None:
                continue
            h = self.h[self.group_index[i]]
            b1, b2 = h["betas"]
            lr_t = h["lr"] * m_k
            decay = (m_k if self.independent else lr_t) * h["weight_decay"] * wm_k
            g = g.detach().to(torch.float64)
            if grad_scale is not None:
                g = g / float(grad_scale)
            g = -g if h["maximize"] else g
            self.steps[i] += 1
            t = self.steps[i]
            p = self.p[i]
            p.mul_(1 - decay)
            self.m[i].mul_(b1).add_(g, alpha=1 - b1)
            self.v[i].mul_(b2).add_(g * g, alpha=1 - b2)
            vhat = self.v[i]
            if h["amsgrad"]:
                torch.maximum(self.vmax[i], self.v[i], out=self.vmax[i])
                vhat = self.vmax[i]
            denom = vhat.sqrt() / math.sqrt(1 - b2**t) + h["eps"]
            p.add_(self.m[i] / denom, alpha=-lr_t / (1 - b1**t))
            if self.storage_dtypes is not None:  # what a kernel storing them in that dtype keeps
                dt = self.storage_dtypes[i]
                pd, md, vd = dt if isinstance(dt, tuple) else (dt, dt, dt)
                for x, d in ((p, pd), (self.m[i], md), (self.v[i], vd), (self.vmax[i], vd)):
                    x.copy_(x.to(d).double())
        self.k += 1


def _clamped(table: Sequence[float] | Tensor) -> Callable[[int], float]:
    values = [float(x) for x in (table.tolist() if isinstance(table, Tensor) else table)]
    return lambda k: values[min(max(k, 0), len(values) - 1)]
