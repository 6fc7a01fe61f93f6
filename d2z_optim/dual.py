"""The dual of an LR schedule: AdamW's weights as a convex combination of updates.

With decoupled weight decay, one AdamW step is ``theta_j = (1 - alpha_j) theta_{j-1}
+ alpha_j x_j`` with ``alpha_j = eta_j * lambda`` and ``x_j = -u_j / lambda`` (the
Adam update scaled by the inverse weight decay). Unrolled (Bergsma et al., 2025,
Sections 2.3 and 3.1)::

    theta_t = c_{t,0} theta_0 + sum_{i=1..t} c_{t,i} x_i
    c_{t,i} = alpha_i * prod_{j=i+1..t} (1 - alpha_j),   c_{t,0} = prod_{j=1..t} (1 - alpha_j)

and the coefficients sum to one. ``alpha_j`` comes from the schedule multiplier of
step ``j`` (table entry ``j - 1``): ``rho * lr * m * lambda * wd_m`` for
``weight_decay_mode="coupled"`` (torch's AdamW; ``rho`` is the muP width factor of
the LR), ``lambda * m * wd_m`` for ``"independent"``.

Everything is float64 and O(t): ``log c_{t,i} = log alpha_i + S_t - S_i`` with
``S_k = sum_{j<=k} log1p(-alpha_j)``, so no product underflows or loses digits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .schedules import Schedule, from_values

__all__ = ["DualSummary", "alphas", "coefficients", "heatmap", "summary"]

MODES = ("coupled", "independent")


def _multipliers(schedule: Schedule | Sequence[float] | Tensor, arg: str = "schedule") -> Tensor:
    if isinstance(schedule, Schedule):
        return schedule.multipliers()
    if isinstance(schedule, (str, bytes)):
        raise ValueError(f"{arg} must be a Schedule or a table; build one by name with d2z_optim.schedules.get")
    return from_values(schedule, arg=arg).multipliers()


def _nonneg(value: Any, arg: str) -> float:
    if isinstance(value, Tensor):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg} must be a non-negative finite number, got {value!r}")
    return float(value)


def alphas(
    schedule: Schedule | Sequence[float] | Tensor,
    lr: float,
    weight_decay: float,
    *,
    rho: float = 1.0,
    weight_decay_mode: str = "coupled",
    wd_schedule: Schedule | Sequence[float] | Tensor | None = None,
) -> Tensor:
    """The smoothing factors ``alpha_1..alpha_T`` (float64) of a schedule.

    Raises:
        ValueError: a negative LR, weight decay or rho, an unknown mode, a
            ``wd_schedule`` of another length, or some ``alpha >= 1`` (then the
            weights are no longer a convex combination of the updates).
    """
    if weight_decay_mode not in MODES:
        raise ValueError(f"weight_decay_mode must be one of {list(MODES)}, got {weight_decay_mode!r}")
    lr, lam, rho = _nonneg(lr, "lr"), _nonneg(weight_decay, "weight_decay"), _nonneg(rho, "rho")
    m = _multipliers(schedule)
    a = m * lam if weight_decay_mode == "independent" else m * (rho * lr * lam)
    if wd_schedule is not None:
        wm = _multipliers(wd_schedule, "wd_schedule")
        if wm.numel() != m.numel():
            raise ValueError(f"wd_schedule has {wm.numel()} steps but schedule has {m.numel()}")
        a = a * wm
    peak = float(a.max())
    if not math.isfinite(peak):  # lr * weight_decay overflowed (e.g. lr=1e308): no number comes out
        raise ValueError(
            f"alpha = lr * weight_decay * multiplier is not finite (lr={lr!r}, weight_decay={lam!r}, rho={rho!r}); "
            "alpha must stay below 1"
        )
    if peak >= 1.0:
        raise ValueError(
            f"alpha = lr * weight_decay * multiplier reaches {peak:g} >= 1: a step would remove all of the "
            "previous weights (or flip their sign), so the weights are no longer a convex combination of the "
            "updates; lower lr or weight_decay (with muP, rho scales lr)"
        )
    return a


def _log_terms(a: Tensor) -> tuple[Tensor, Tensor]:
    """``log alpha_i`` and ``S_i = sum_{j<=i} log1p(-alpha_j)`` for i = 1..T."""
    with torch.no_grad():
        return torch.log(a), torch.cumsum(torch.log1p(-a), 0)


def _step(step: Any, T: int) -> int:
    if step is None:
        return T
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not (1 <= step <= T):
        raise ValueError(f"step must be an int in [1, {T}] (the schedule's length), got {step!r}")
    return int(step)


def coefficients(
    schedule: Schedule | Sequence[float] | Tensor,
    lr: float,
    weight_decay: float,
    *,
    rho: float = 1.0,
    step: int | None = None,
    weight_decay_mode: str = "coupled",
    wd_schedule: Schedule | Sequence[float] | Tensor | None = None,
) -> tuple[float, Tensor]:
    """The dual coefficients at step ``t`` (default: the last).

    Returns:
        ``(c0, c)``: the coefficient on the initial weights, and the float64 vector
        ``c[i - 1] = c_{t,i}`` of the updates ``i = 1..t``. ``c0 + c.sum() == 1``.
    """
    a = alphas(schedule, lr, weight_decay, rho=rho, weight_decay_mode=weight_decay_mode, wd_schedule=wd_schedule)
    t = _step(step, a.numel())
    log_a, S = _log_terms(a[:t])
    c = torch.exp(log_a + (S[-1] - S))
    return math.exp(float(S[-1])), c


def heatmap(
    schedule: Schedule | Sequence[float] | Tensor,
    lr: float,
    weight_decay: float,
    *,
    rho: float = 1.0,
    size: int = 256,
    weight_decay_mode: str = "coupled",
    wd_schedule: Schedule | Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``c_{t,i}`` over all steps ``t`` on a grid of at most ``size`` x ``size`` (the paper's Figure 25).

    Returns:
        ``(ts, iss, C)``: the 1-based steps of the rows, the 1-based update indices
        of the columns (both include ``T``), and ``C[r, k] = c_{ts[r], iss[k]}``
        (0 where ``iss[k] > ts[r]``). The last row is :func:`coefficients` at the
        sampled columns.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    a = alphas(schedule, lr, weight_decay, rho=rho, weight_decay_mode=weight_decay_mode, wd_schedule=wd_schedule)
    T = a.numel()
    idx = torch.unique(torch.linspace(1, T, min(size, T), dtype=torch.float64).round().long())
    log_a, S = _log_terms(a)
    rows, cols = idx.view(-1, 1), idx.view(1, -1)
    logc = log_a[cols - 1] + S[rows - 1] - S[cols - 1]
    C = torch.where(cols <= rows, torch.exp(logc), torch.zeros((), dtype=torch.float64))
    return idx, idx.clone(), C


@dataclass(frozen=True)
class DualSummary:
    """The dual's headline numbers at step ``t``.

    Attributes:
        steps: ``t``.
        initial_weight: ``c_{t,0}``, the weight of the initial parameters (the paper's bias indicator).
        effective_updates: how many updates are effectively averaged: ``1 / sum_i w_i^2`` with
            ``w_i = c_{t,i} / sum_k c_{t,k}`` (Kish's effective sample size: ``n`` for ``n`` equal
            coefficients, ``~2 / alpha`` for a constant-LR EMA), so the part of the weights still on
            the initial parameters does not inflate it.
        last10_share: the share of the weights from the last 10% of updates.
        timescale_peak: ``1 / max alpha`` (steps), the EMA timescale at the peak LR.
        timescale_end: ``1 / alpha_t`` (steps; ``inf`` when the LR reaches zero).
    """

    steps: int
    initial_weight: float
    effective_updates: float
    last10_share: float
    timescale_peak: float
    timescale_end: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summary(
    schedule: Schedule | Sequence[float] | Tensor,
    lr: float,
    weight_decay: float,
    *,
    rho: float = 1.0,
    step: int | None = None,
    weight_decay_mode: str = "coupled",
    wd_schedule: Schedule | Sequence[float] | Tensor | None = None,
) -> DualSummary:
    """The summary numbers of the dual at step ``t`` (default: the last); see :class:`DualSummary`."""
    kw = dict(rho=rho, weight_decay_mode=weight_decay_mode, wd_schedule=wd_schedule)
    a = alphas(schedule, lr, weight_decay, **kw)
    t = _step(step, a.numel())
    c0, c = coefficients(schedule, lr, weight_decay, step=t, **kw)
    total = float(c.sum())
    sq = float((c * c).sum()) / (total * total) if total > 0 else 0.0
    last = c[t - max(1, math.ceil(0.1 * t)) :]
    inv = lambda x: math.inf if x == 0 else 1.0 / x
    return DualSummary(
        steps=t,
        initial_weight=c0,
        effective_updates=inv(sq),
        last10_share=float(last.sum()),
        timescale_peak=inv(float(a[:t].max())),
        timescale_end=inv(float(a[t - 1])),
    )
