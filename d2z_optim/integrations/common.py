"""What the framework integrations share: finding the d2z optimizer inside a framework's wrapper,
and checking the optimizer's schedule against the number of steps the framework will run."""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..optimizer import AdamW

__all__ = ["check_planned_steps", "planned_steps", "unwrap"]


def unwrap(optimizer: Any) -> AdamW | None:
    """The :class:`d2z_optim.AdamW` an object is or wraps (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``, HF's wrappers: each keeps it as ``.optimizer`` or
    ``._optimizer``), or None. The innermost one: a ``LightningOptimizer`` passes
    ``isinstance(..., AdamW)`` itself (its class derives from the optimizer's) but is not it."""
    found = None
    for _ in range(8):
        if isinstance(optimizer, AdamW):
            found = optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            return found
        optimizer = inner
    return found


def planned_steps(value: Any, source: str) -> int:
    """A framework's count of optimizer steps as a positive int, or a ValueError naming what is
    missing and ``total_steps=`` as the way out."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"d2z_optim: cannot read the run's number of optimizer steps from {source} (got {value!r}: "
            "an infinite or unsized dataloader, or no max_steps): set the framework's max_steps, or pass "
            "total_steps= (the number of optimizer steps of the run) yourself"
        )
    return value


def check_planned_steps(opt: AdamW, planned: int, source: str) -> bool:
    """Warn when the optimizer's schedule and the framework's run disagree on the run's length
    (both figures, and what each counts); True when they agree."""
    if opt.schedule is None or opt.total_steps == planned:
        return True
    end = (
        "before the schedule's end (the LR never reaches its final value)"
        if planned < opt.total_steps
        else ("past the schedule's end (its last multiplier is reused)")
    )
    warnings.warn(
        f"d2z_optim.AdamW: the optimizer's schedule has total_steps={opt.total_steps:,} but {source} will run "
        f"{planned:,} optimizer steps: the run ends {end}. Size the schedule with the framework's count of "
        "optimizer steps (after gradient accumulation, per process).",
        stacklevel=3,
    )
    return False
