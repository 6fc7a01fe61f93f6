"""The schedule on the devices: the optimizer's arguments turned into float32 multiplier tables,
one copy of the tables and of the step counters per device, and the host's count of steps.

The tables are indexed by ``step_count`` on the device (entry ``i`` is the multiplier of the
``(i+1)``-th step, see :mod:`d2z_optim.schedules`), so a step needs no host value; the host
only counts ``step()`` calls, to warn once past the table's end without reading the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import schedules
from .schedules import Schedule

__all__ = ["DeviceSchedule", "ScheduleTables", "as_schedule"]


def as_schedule(
    value: Any, arg: str, total_steps: int | None, warmup: Any, defaults: dict, mode: str
) -> Schedule | None:
    """An optimizer's ``schedule``/``wd_schedule`` argument as a Schedule (None when not given)."""
    if value is None or isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        if value not in schedules.names():
            raise ValueError(f"unknown {arg} {value!r}; valid names: {', '.join(schedules.names())}")
        if value == "custom":
            raise ValueError(f"{arg}='custom' needs a table: pass the multipliers themselves as {arg}")
        if total_steps is None:
            raise ValueError(
                f"total_steps is required with {arg}={value!r}: pass the number of optimizer steps "
                "of the run (a positive int)"
            )
        params = {}
        if value == "rational":  # Eq. 7 decays at rate peak_lr * weight_decay of the defaults
            lr = defaults["lr"]
            params = {
                "peak_lr": 1.0 if mode == "independent" else float(lr),
                "weight_decay": float(defaults["weight_decay"]),
            }
        return schedules.get(value, total_steps, warmup=warmup, **params)
    if isinstance(value, (Tensor, Sequence)) and not isinstance(value, (str, bytes)):
        return schedules.from_values(value, arg=arg)
    raise ValueError(
        f"{arg} must be a schedule name, a d2z_optim.schedules.Schedule or a 1-D sequence of "
        f"multipliers, got {type(value).__name__}"
    )


class DeviceSchedule:
    """The schedule tables and the step counters kept on one device."""

    def __init__(self, lr_table: Tensor, wd_table: Tensor, device: torch.device) -> None:
        self.lr_table = lr_table.to(device)
        self.wd_table = wd_table.to(device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)


class ScheduleTables:
    """An optimizer's LR and weight-decay multiplier tables: the host copy (float32, CPU), one
    :class:`DeviceSchedule` per device its parameters live on, and the host's step count."""

    def __init__(self, lr_sched: Schedule | None, wd_sched: Schedule | None, total_steps: int | None) -> None:
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0
        ):
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        lengths = {s.total_steps for s in (lr_sched, wd_sched) if s is not None}
        if total_steps is not None:
            lengths.add(total_steps)
        if len(lengths) > 1:
            raise ValueError(
                "schedule, wd_schedule and total_steps must agree on the number of steps, got "
                f"schedule={len(lr_sched) if lr_sched else None}, "
                f"wd_schedule={len(wd_sched) if wd_sched else None}, total_steps={total_steps}"
            )
        T = lengths.pop() if lengths else 1
        ones = torch.ones(T, dtype=torch.float32)
        self.lr_host = lr_sched.table() if lr_sched is not None else ones
        self.wd_host = wd_sched.table() if wd_sched is not None else ones
        self.total_steps: int = T
        # schedule=None and no total_steps: a constant that never runs out (no warning)
        self.unbounded = lr_sched is None and wd_sched is None
        self.devices: dict[torch.device, DeviceSchedule] = {}
        self.host_steps = 0  # step() calls counted on the host, to warn past the end without a sync

    def on(self, device: torch.device) -> DeviceSchedule:
        """The tables and counters on ``device`` (a device met later starts at the same position)."""
        ds = self.devices.get(device)
        if ds is None:
            ds = DeviceSchedule(self.lr_host, self.wd_host, device)
            if self.devices:
                ds.step_count.copy_(self.primary.step_count)
            self.devices[device] = ds
        return ds

    @property
    def primary(self) -> DeviceSchedule:
        """The first parameter's device's."""
        return next(iter(self.devices.values()))

    def next_multiplier(self) -> Tensor:
        """The LR multiplier of the next step, float64 on the primary device (no host read)."""
        ds = self.primary
        idx = ds.step_count.clamp(max=self.total_steps - 1).view(1)
        return ds.lr_table.index_select(0, idx).squeeze(0).to(torch.float64)

    def set_position(self, position: Tensor) -> None:
        """Every device's counter at ``position`` (a host int64 0-d tensor): a checkpoint's."""
        for ds in self.devices.values():
            ds.step_count.copy_(position)
        self.host_steps = int(position)
        if self.host_steps > self.total_steps and not self.unbounded:
            self.host_steps = self.total_steps + 1  # already past the end: warned by the run that saved

    def count_step(self, found_inf: Tensor | None) -> None:
        """After a step: a skipped one (``found_inf`` nonzero) is counted on the device; the host
        counts calls and warns once when they pass the table's end."""
        if found_inf is not None:  # GradScaler's found_inf, or skip_nonfinite's
            skipped = self.primary.skipped_steps
            skipped.add_((found_inf.to(skipped.device, non_blocking=True).reshape(()) != 0).to(torch.int64))
        if torch.compiler.is_compiling():  # a Python counter would recompile every step
            return
        self.host_steps += 1
        if self.host_steps == self.total_steps + 1 and not self.unbounded:
            warnings.warn(
                f"d2z_optim.AdamW: step() called more than total_steps={self.total_steps} times; "
                "the schedule's last multiplier is reused from now on",
                stacklevel=5,
            )
