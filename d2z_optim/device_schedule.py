"""The schedule on the devices: the optimizer's arguments turned into float32 multiplier tables,
one copy of the tables and of the step counters per device, and the host's count of steps.

The tables are indexed by ``step_count`` on the device (entry ``i`` is the multiplier of the
``(i+1)``-th step, see :mod:`d2z_optim.schedules`), so a step needs no host value; the host
only counts ``step()`` calls, to warn once past the table's end without reading the device.

Devices are met lazily: the step cache tells the tables which devices this step's parameters are
on (:meth:`ScheduleTables.use`, only when it rebuilds its lists), and a device met for the first
time starts at the current position (parameters built on ``meta`` and moved, ``model.to()``).
Before any device is met the position lives on the CPU.
"""

from __future__ import annotations

import array
import atexit
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import schedules
from .arguments import as_index
from .schedules import Schedule

__all__ = ["DeviceSchedule", "RunEndWatch", "ScheduleTables", "as_schedule", "check_warmup"]

_CPU = torch.device("cpu")


def as_schedule(
    value: Any, arg: str, total_steps: int | None, warmup: Any, defaults: dict, mode: str
) -> Schedule | None:
    """An optimizer's ``schedule``/``wd_schedule`` argument as a Schedule (None when not given).
    ``warmup`` None: the default (10% of ``total_steps``) for a named schedule."""
    if value is None:
        return None
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
        return schedules.get(value, total_steps, warmup=0.1 if warmup is None else warmup, **params)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (Tensor, Sequence)) or hasattr(value, "__array__"):  # numpy arrays too
        return schedules.from_values(value, arg=arg)
    raise ValueError(
        f"{arg} must be a schedule name, a d2z_optim.schedules.Schedule or a 1-D sequence of "
        f"multipliers, got {type(value).__name__}"
    )


def check_warmup(warmup: Any, total_steps: Any, schedule: Any, wd_schedule: Any) -> None:
    """``warmup`` shapes named schedules only: given when none of them is named, it would be ignored."""
    if warmup is None or isinstance(schedule, str) or isinstance(wd_schedule, str):
        return
    if schedule is None and total_steps is not None:
        return  # the default linear-d2z takes it
    if schedule is None and wd_schedule is None:
        raise ValueError(
            f"warmup={warmup!r} needs total_steps (the run's length) and a named schedule: a "
            "constant (no schedule) has no warmup"
        )
    arg, value = ("schedule", schedule) if schedule is not None else ("wd_schedule", wd_schedule)
    what = "a Schedule" if isinstance(value, Schedule) else "a table of multipliers"
    raise ValueError(
        f"warmup={warmup!r} has no effect with {arg} given as {what}, which holds its own warmup: "
        f"build it with the warmup (schedules.get(name, total_steps, warmup=...)) or leave warmup out"
    )


class DeviceSchedule:
    """The schedule tables and the step counters kept on one device."""

    def __init__(self, lr_table: Tensor, wd_table: Tensor, device: torch.device) -> None:
        self.lr_table = lr_table.to(device)
        self.wd_table = wd_table.to(device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    def __getstate__(self) -> dict[str, Any]:  # the tables are rebuilt from the host copy
        return {"step_count": self.step_count, "skipped_steps": self.skipped_steps}


class ScheduleTables:
    """An optimizer's LR and weight-decay multiplier tables: the host copy (float32, CPU), one
    :class:`DeviceSchedule` per device its parameters live on, and the host's step count."""

    def __init__(self, lr_sched: Schedule | None, wd_sched: Schedule | None, total_steps: Any) -> None:
        if total_steps is not None:
            total_steps = as_index(total_steps, "total_steps")
            if total_steps <= 0:
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
        if lr_sched is not None and not bool((lr_sched.multipliers() > 0).any()):
            raise ValueError(
                f"schedule {lr_sched!r} has every multiplier 0: no step would change the parameters "
                "(e.g. linear decay to zero over total_steps=1 without warmup); use more steps, a warmup, "
                "or another schedule"
            )
        self.lr_sched, self.wd_sched = lr_sched, wd_sched
        self.total_steps: int = lengths.pop() if lengths else 1
        # schedule=None and no total_steps: a constant that never runs out (no warning)
        self.unbounded = lr_sched is None and wd_sched is None
        self._host_tables()
        self.devices: dict[torch.device, DeviceSchedule] = {_CPU: DeviceSchedule(self.lr_host, self.wd_host, _CPU)}
        self.primary_device = _CPU
        self.active: list[torch.device] = [_CPU]  # the devices of the last step's parameters
        self.host_steps = 0  # step() calls counted on the host, to warn past the end without a sync

    def _host_tables(self) -> None:
        ones = torch.ones(self.total_steps, dtype=torch.float32)
        self.lr_host = self.lr_sched.table() if self.lr_sched is not None else ones
        self.wd_host = self.wd_sched.table() if self.wd_sched is not None else ones
        # the LR table as host floats: read per step by last_lr_host (a tensor read would dispatch)
        self.lr_floats = array.array("f", self.lr_host.numpy().tobytes())

    def __getstate__(self) -> dict[str, Any]:
        # pickle / deepcopy: the schedules' descriptions and the counters, not the tables (rebuilt)
        return {k: v for k, v in self.__dict__.items() if k not in ("lr_host", "wd_host", "lr_floats")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._host_tables()
        for dev, ds in self.devices.items():
            ds.lr_table, ds.wd_table = self.lr_host.to(dev), self.wd_host.to(dev)

    @property
    def primary(self) -> DeviceSchedule:
        """The first parameter's device's (the CPU's before any device was met)."""
        return self.devices[self.primary_device]

    def use(self, devices: Iterable[torch.device]) -> None:
        """This step's parameters are on ``devices`` (the first is the first parameter's). A device
        met for the first time, or again after steps without it, starts at the current position;
        the first becomes the primary device (which counts the skipped steps: the count moves with
        it). Tables are never dropped: a CUDA graph or a reference the caller keeps may read them."""
        devices = list(dict.fromkeys(devices))
        if not devices or devices == self.active:
            return
        now = self.primary
        for dev in devices:
            ds = self.devices.get(dev)
            if ds is None:
                ds = self.devices[dev] = DeviceSchedule(self.lr_host, self.wd_host, dev)
            if dev not in self.active and ds is not now and dev.type != "meta" and now.step_count.device.type != "meta":
                ds.step_count.copy_(now.step_count)
        first = self.devices[devices[0]]
        if first is not now and first.step_count.device.type != "meta" and now.step_count.device.type != "meta":
            first.skipped_steps.copy_(now.skipped_steps)
        self.active = devices
        self.primary_device = devices[0]

    def next_multiplier(self) -> Tensor:
        """The LR multiplier of the next step, float64 on the primary device (no host read)."""
        ds = self.primary
        idx = ds.step_count.clamp(max=self.total_steps - 1).view(1)
        return ds.lr_table.index_select(0, idx).squeeze(0).to(torch.float64)

    def multiplier_at(self, index: Tensor) -> Tensor:
        """The LR multiplier at ``index`` (a device int64 0-d, clamped into the table), float64."""
        ds = self.primary
        idx = index.clamp(min=0, max=self.total_steps - 1).view(1)
        return ds.lr_table.index_select(0, idx).squeeze(0).to(torch.float64)

    def host_multiplier_at(self, index: int) -> float:
        """The LR multiplier at ``index`` (clamped into the table) from the host copy: no device read."""
        return self.lr_floats[min(max(index, 0), self.total_steps - 1)]

    def set_position(self, position: Tensor, skipped: Tensor | None = None) -> None:
        """Every device's counter at ``position`` (a host int64 0-d tensor): a checkpoint's."""
        for ds in self.devices.values():
            if ds.step_count.device.type == "meta":
                continue
            ds.step_count.copy_(position)
            if skipped is not None:
                ds.skipped_steps.copy_(skipped)
        self.host_steps = int(position)
        if self.host_steps > self.total_steps and not self.unbounded:
            self.host_steps = self.total_steps + 1  # already past the end: warned by the run that saved

    def unfinished(self) -> str | None:
        """Why the run, if it ended now, ended before its table's last step (None: it did not, it
        never stepped, or the schedule is an unbounded constant). Host values only."""
        n, total = self.host_steps, self.total_steps
        if self.unbounded or n == 0 or n >= total:
            return None
        return (
            f"d2z_optim.AdamW: the run ended after {n:,} of its schedule's total_steps={total:,} steps: the last "
            f"LR applied was {self.host_multiplier_at(n - 1):.3g} x the peak, where the table ends at "
            f"{self.host_multiplier_at(total - 1):.3g}. total_steps counts optimizer steps (step() calls: not "
            "micro-batches, and per process under DDP/accelerate). If this run continues from a checkpoint, "
            "nothing is wrong."
        )

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


class OutsideLrWatch:
    """Warns once when a group's ``lr`` changes between two steps while a d2z schedule is active:
    something outside the optimizer (a torch LR scheduler, HF Trainer's default scheduler, a loop
    writing ``param_group["lr"] = get_lr(it)``) schedules it too, and the LR applied is the product
    of both schedules. Host floats only (a tensor ``lr`` is not read: that would sync)."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []
        self.warned = False

    def check(self, groups: list[dict], schedule) -> None:
        now = [None if isinstance(g["lr"], Tensor) else float(g["lr"]) for g in groups]
        if schedule is not None and not self.warned and len(now) == len(self.seen):
            for i, (a, b) in enumerate(zip(self.seen, now)):
                if a is not None and b is not None and a != b:
                    self.warned = True
                    warnings.warn(
                        f"d2z_optim.AdamW: param_groups[{i}]['lr'] changed from {a:g} to {b:g} between steps "
                        f"while the optimizer's own schedule ({schedule.name}) is active: something else "
                        "schedules the LR too (a torch LR scheduler, HF Trainer's default scheduler, a loop "
                        "setting param_group['lr']), and the LR applied is the product of both. Drop the "
                        "outside scheduler (README: Usage), or pass schedule=None to let it drive the LR.",
                        stacklevel=4,
                    )
                    break
        self.seen = now


class RunEndWatch:
    """A run that ends before its table's last step says so once, with both figures: when an
    integration calls :meth:`report` at the end of training, or else at interpreter exit, one
    warning for every optimizer that stepped (alive then, or collected before)."""

    _pending: ClassVar[list[weakref.finalize]] = []
    _first: ClassVar[list[str]] = []  # the first short run's message, and one entry per further one
    _done = False

    def __init__(self, owner: object, tables: ScheduleTables) -> None:
        self.tables = tables
        self.reported = False
        fin = weakref.finalize(owner, RunEndWatch._note, self)
        fin.atexit = False  # run by _at_exit, before its one warning
        pending = RunEndWatch._pending
        if len(pending) > 64 and len(pending) & (len(pending) - 1) == 0:  # prune now and then
            pending[:] = [f for f in pending if f.alive]
        pending.append(fin)

    @staticmethod
    def _note(watch: RunEndWatch) -> None:
        msg = None if watch.reported else watch.tables.unfinished()
        if msg is not None:
            RunEndWatch._first.append(msg)

    def report(self) -> bool:
        """Warn now if the run ended short (once per optimizer; the exit check then skips it);
        True when it did."""
        msg = self.tables.unfinished()
        if msg is not None and not self.reported:
            warnings.warn(msg, stacklevel=4)
        self.reported = True
        return msg is not None

    @staticmethod
    def _at_exit() -> None:
        for fin in RunEndWatch._pending:
            fin()  # the ones still alive: note them
        first = RunEndWatch._first
        if first and not RunEndWatch._done:
            RunEndWatch._done = True
            more = f" ({len(first) - 1} more optimizers of this process ended short too.)" if len(first) > 1 else ""
            warnings.warn(first[0] + more, stacklevel=1)


atexit.register(RunEndWatch._at_exit)
