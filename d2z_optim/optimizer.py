"""``d2z_optim.AdamW``: torch's AdamW with the LR schedule on the device.

This file is torch glue only: argument checks, parameter groups, state,
checkpoints and the per-device schedule tables. The update math lives in the
backends (``d2z_optim/backends``).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from . import backends, dual, schedules
from .schedules import Schedule

__all__ = ["AdamW"]

WEIGHT_DECAY_MODES = ("coupled", "independent")
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SAVE_KEY = "d2z"  # our entry in state_dict(); torch.optim ignores unknown top-level keys


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view of its storage: in-place updates land in the DTensor)."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


class _DeviceSchedule:
    """The schedule tables and the step counter kept on one device."""

    def __init__(self, lr_table: Tensor, wd_table: Tensor, device: torch.device) -> None:
        self.lr_table = lr_table.to(device)
        self.wd_table = wd_table.to(device)
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)


class _StepLayout:
    """The step's tensor lists (parameters, states, steps) per device and group, reused across steps.

    Gathering them walks every parameter in Python (state lookups, DTensor shards), which costs
    more than the fused kernel itself for thousands of small tensors (measured on 10,000 x 1,024
    fp32 CPU tensors: ~50 ms of a 71 ms step). So they are gathered once and reused while the
    same parameters have gradients; each step only reads the gradients and checks them in bulk.
    Where the backend keeps a plan (the C++ CPU kernel), the lists are handed to it once and a
    step passes only the schedule tensors (handing the op ~50,000 tensors each step cost ~12 ms
    of a ~19 ms step there). Rebuilt when a group's parameter list, which parameters have a
    gradient, a group's ``amsgrad``, or any state dict or state tensor changes
    (``load_state_dict``, ``add_param_group``, new state, a state tensor replaced by the user),
    and when the plan cannot take a step.
    """

    def __init__(self, opt: AdamW, grads: list[list[Tensor | None]]) -> None:
        self.groups = []  # per group: (params list, a copy of it, amsgrad, grad-present mask)
        self.slots = []  # per (group, device): (group index, device, indices into the group, GroupWork template)
        self.dtensor = False
        for gi, (group, gl) in enumerate(zip(opt.param_groups, grads)):
            params = group["params"]
            mask = [g is not None for g in gl]
            self.groups.append((params, list(params), group["amsgrad"], mask))
            per_dev: dict[torch.device, tuple[list[int], backends.GroupWork]] = {}
            for i, (p, present) in enumerate(zip(params, mask)):
                if not present:
                    continue
                idx, gw = per_dev.setdefault(p.device, ([], backends.GroupWork(0.0, 0.0, 0.0, 0.0, 0.0, False, False)))
                state = opt.state[p]
                if len(state) == 0:
                    opt._init_state(state, p, group["amsgrad"])
                self.dtensor |= type(p).__name__ == "DTensor"
                idx.append(i)
                gw.params.append(_local(p))  # FSDP2 / DTensor: the kernels run on local shards
                gw.exp_avgs.append(_local(state["exp_avg"]))
                gw.exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                if group["amsgrad"]:
                    gw.max_exp_avg_sqs.append(_local(state["max_exp_avg_sq"]))
                gw.steps.append(state["step"])
            for dev, (idx, gw) in per_dev.items():
                self.slots.append((gi, dev, None if len(idx) == len(params) else idx, gw))
        # the state each step uses, to see a state dict or tensor replaced outside load_state_dict
        # (e.g. states moved to another device): ~0.1 us per parameter and key, C loops only
        self.state_values = list(opt.state.values())
        chosen = [p for (params, _, _, mask) in self.groups for p, m in zip(params, mask) if m]
        self.state_dicts = [opt.state[p] for p in chosen]
        keys = _STATE_KEYS if any(g["amsgrad"] for g in opt.param_groups) else _STATE_KEYS[:3]
        self.state_tensors = {k: [d.get(k) for d in self.state_dicts] for k in keys}  # what the kernels use
        # what each present gradient must be: dense, with its parameter's size (read each step:
        # `p.data = ...` may change it), dtype and device
        self.params = chosen
        self.expect = ([torch.strided] * len(chosen), [p.dtype for p in chosen], [p.device for p in chosen])
        # One device stepped by a fused kernel: the op checks every gradient itself before it
        # writes anything, so the steady state skips the checks here (~0.7 us per tensor) and
        # step() says torch's words only when the op refuses. Otherwise checked here each step.
        self.kernel_checks = len(opt._devices) == 1 and next(iter(opt._chosen.values())) is not backends.TORCH
        # gradients laid out unlike their parameters are copied into the parameter's layout for the
        # fused kernels; with kernel checks, only once the op (or this first step) has met one
        self.relayout = not self.kernel_checks or any(
            (gl := self._grads(grads, gi, idx)) is not backends.in_layout_of(gl, tmpl.params)
            for gi, _, idx, tmpl in self.slots
        )
        # The parameters without a gradient now: a step through the plan below checks only the
        # others (in C++), so these are checked here.
        self.absent = [p for (params, _, _, mask) in self.groups for p, m in zip(params, mask) if not m]
        # One device whose backend keeps a plan (the C++ CPU kernel): the lists are handed over
        # once, and a step passes only the schedule tensors (gradients are read in C++). Not for
        # DTensor shards (their local views are new tensors each time), gradients that need a copy
        # into their parameter's layout, or while torch.compile traces (the plan is opaque to it;
        # the op is not).
        make_plan = opt._chosen[next(iter(opt._devices))].plan if self.kernel_checks else None
        self.plan = None
        if make_plan and not (self.relayout or self.dtensor or torch.compiler.is_compiling()):
            (work,) = self.works(opt).values()
            self.plan = make_plan(work)

    def _grads(self, grads: list[list[Tensor | None]], gi: int, idx: list[int] | None) -> list[Tensor]:
        """The gradients of one (group, device) slot, as the kernels take them (DTensor: local shards)."""
        gl = grads[gi] if idx is None else [grads[gi][i] for i in idx]
        return [_local(g) for g in gl] if self.dtensor else gl

    def matches(self, opt: AdamW) -> bool:
        """Same groups, parameters and state objects: the cached lists still hold (gradients aside)."""
        if len(opt.param_groups) != len(self.groups):
            return False
        for group, (params, copy, amsgrad, _) in zip(opt.param_groups, self.groups):
            if group["params"] is not params or group["amsgrad"] != amsgrad:
                return False
            if len(params) != len(copy) or not all(map(operator.is_, params, copy)):
                return False
        values = list(opt.state.values())
        if len(values) != len(self.state_values) or not all(map(operator.is_, values, self.state_values)):
            return False
        for k, cached in self.state_tensors.items():
            if not all(map(operator.is_, map(dict.get, self.state_dicts, repeat(k)), cached)):
                return False
        return True

    def grads_present(self, grads: list[list[Tensor | None]]) -> bool:
        """The same parameters have a gradient as when the lists were built."""
        return all([g is not None for g in gl] == mask for gl, (_, _, _, mask) in zip(grads, self.groups))

    def plan_step(self, opt: AdamW, grad_scale: Tensor | None, found_inf: Tensor | None) -> tuple[bool, Tensor | None]:
        """One step through the plan, and the found_inf it used (1 where skip_nonfinite found a
        NaN or an Inf). False, with nothing written, when the plan cannot take it (a parameter
        gained or lost a gradient, a tensor changed, a bad gradient): the caller then steps
        through the lists, which rebuilds the layout or says what is wrong."""
        if any(p.grad is not None for p in self.absent):
            return False, found_inf
        (work,) = self.works(opt).values()
        work.grad_scale, work.found_inf = opt._amp_tensors(work.step_count.device, grad_scale, found_inf)
        try:
            done = self.plan.step(work, opt.skip_nonfinite)
        except RuntimeError as e:
            if "d2z::adamw_step_: " not in str(e):
                raise  # not a refusal by the op's checks: a bug, never a silent slow path
            return False, found_inf  # the checks refused a tensor before writing anything
        if done == self.plan.SKIPPED_NONFINITE:
            return True, torch.ones((), device=work.step_count.device)
        return done == self.plan.APPLIED, found_inf

    def grads_match(self, grads: list[list[Tensor | None]]) -> bool:
        """Every present gradient is dense and has its parameter's shape, dtype and device (in bulk)."""
        flat = [g for gl in grads for g in gl if g is not None]
        layouts, dtypes, devices = self.expect
        return (
            [g.layout for g in flat] == layouts
            and list(map(Tensor.size, flat)) == list(map(Tensor.size, self.params))
            and [g.dtype for g in flat] == dtypes
            and [g.device for g in flat] == devices
        )

    def works(
        self, opt: AdamW, grads: list[list[Tensor | None]] | None = None
    ) -> dict[torch.device, backends.DeviceWork]:
        """This step's work per device: the cached lists, this step's gradients (none for a plan,
        which reads them itself) and hyperparameters."""
        independent = opt.weight_decay_mode == "independent"
        out = {
            dev: backends.DeviceWork(ds.lr_table, ds.wd_table, ds.step_count, independent)
            for dev, ds in opt._devices.items()
        }
        for gi, dev, idx, tmpl in self.slots:
            gw = opt._group_work(opt.param_groups[gi], dev)
            gw.params, gw.exp_avgs, gw.exp_avg_sqs = tmpl.params, tmpl.exp_avgs, tmpl.exp_avg_sqs
            gw.max_exp_avg_sqs, gw.steps = tmpl.max_exp_avg_sqs, tmpl.steps
            if grads is not None:
                gl = self._grads(grads, gi, idx)
                if self.relayout and opt._chosen[dev] is not backends.TORCH:  # fused kernels walk a grad like its param
                    gl = backends.in_layout_of(gl, tmpl.params)
                gw.grads = gl
            out[dev].groups.append(gw)
        return out


def _as_schedule(
    value: Any, arg: str, total_steps: int | None, warmup: Any, defaults: dict, mode: str
) -> Schedule | None:
    """``schedule``/``wd_schedule`` argument -> Schedule (None when not given)."""
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
        try:
            return schedules.from_values(value)
        except ValueError as e:
            raise ValueError(str(e).replace("schedule", arg, 1)) from None
    raise ValueError(
        f"{arg} must be a schedule name, a d2z_optim.schedules.Schedule or a 1-D sequence of "
        f"multipliers, got {type(value).__name__}"
    )


class AdamW(torch.optim.Optimizer):
    r"""AdamW whose learning-rate schedule is a table on the device.

    A drop-in replacement for :class:`torch.optim.AdamW`: the same arguments,
    defaults, errors, parameter groups and ``state_dict`` layout. The effective
    LR of group ``g`` at step ``t`` is ``lr_g * table[t]``, where ``table`` is
    indexed by a step counter on the device, so ``step()`` never reads a device
    value on the host and needs no Python scheduler.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: peak learning rate of each group (``table`` multiplies it).
        betas, eps, weight_decay, amsgrad, maximize: as in :class:`torch.optim.AdamW`.
        foreach: ``False`` makes the torch backend update one tensor at a time.
        capturable: accepted for compatibility; every step is capturable already
            (no host sync, all scalars on the device).
        differentiable: must be ``False``: the step is an in-place kernel.
        fused: ``True`` requires a fused kernel backend, ``False`` the torch backend.
        schedule: a name from :func:`d2z_optim.schedules.names`, a
            :class:`~d2z_optim.schedules.Schedule`, or a 1-D sequence/tensor of
            multipliers. ``None`` is a constant 1 (torch's behaviour), unless
            ``total_steps`` is given: then ``"linear-d2z"``, the paper's recipe.
        total_steps: number of ``step()`` calls of the run (needed by named schedules).
        warmup: warmup steps (int) or fraction of ``total_steps`` (float) for named schedules.
        wd_schedule: multipliers of the weight decay, same forms as ``schedule``;
            all ones by default.
        weight_decay_mode: ``"coupled"`` decays by ``lr_g * table[t] * wd_g * wd_table[t]``
            (torch's AdamW); ``"independent"`` by ``wd_g * table[t] * wd_table[t]``
            (follows the schedule's shape but not the peak LR).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        skip_nonfinite: check every gradient on the device and make a step whose
            gradients hold a NaN or an Inf a no-op (parameters, states and the
            schedule position unchanged; counted in ``skipped_steps``). No host sync.

    Example:
        >>> opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, total_steps=10_000)
        >>> for batch in data:          # 10% linear warmup, then linear decay to zero
        ...     loss(model, batch).backward()
        ...     opt.step()
        ...     opt.zero_grad()
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale/found_inf: no unscale sync

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        schedule: str | Schedule | Sequence[float] | Tensor | None = None,
        total_steps: int | None = None,
        warmup: int | float = 0.1,
        wd_schedule: str | Schedule | Sequence[float] | Tensor | None = None,
        weight_decay_mode: str = "coupled",
        backend: str = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        # torch's own checks give torch's exact errors for everything torch has
        torch.optim.AdamW(
            [torch.empty(0)],
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        if differentiable:
            raise ValueError(
                "differentiable=True is not supported by d2z_optim.AdamW: its step is an in-place "
                "kernel that autograd cannot differentiate through; use torch.optim.AdamW"
            )
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {list(WEIGHT_DECAY_MODES)}, got {weight_decay_mode!r}")
        self._backends = backends.resolve(backend, fused=fused)
        self.weight_decay_mode = weight_decay_mode

        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if schedule is None and total_steps is not None:
            schedule = "linear-d2z"
        lr_sched = _as_schedule(schedule, "schedule", total_steps, warmup, defaults, weight_decay_mode)
        wd_sched = _as_schedule(wd_schedule, "wd_schedule", total_steps, warmup, defaults, weight_decay_mode)
        self.schedule, self.wd_schedule = lr_sched, wd_sched
        self._lr_table_cpu, self._wd_table_cpu = self._tables(lr_sched, wd_sched, total_steps)
        self.total_steps: int = self._lr_table_cpu.numel()
        # schedule=None and no total_steps: a constant that never runs out (no warning)
        self._unbounded = lr_sched is None and wd_sched is None
        self.skip_nonfinite = bool(skip_nonfinite)
        self._host_steps = 0  # counted on the host, to warn past the table's end without a sync
        self._devices: dict[torch.device, _DeviceSchedule] = {}
        self._layout: _StepLayout | None = None

        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(float(b) if isinstance(b, Tensor) else b for b in betas),
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                foreach=foreach,
                capturable=capturable,
                differentiable=differentiable,
                fused=fused,
                decoupled_weight_decay=True,
            ),
        )

    # ------------------------------------------------------------------ tables
    @staticmethod
    def _tables(lr_sched: Schedule | None, wd_sched: Schedule | None, total_steps: int | None):
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
        lr = lr_sched.table() if lr_sched is not None else ones
        wd = wd_sched.table() if wd_sched is not None else ones
        return lr, wd

    def _device(self, device: torch.device) -> _DeviceSchedule:
        ds = self._devices.get(device)
        if ds is None:
            ds = _DeviceSchedule(self._lr_table_cpu, self._wd_table_cpu, device)
            if self._devices:  # a device added later starts at the same position
                ds.step_count.copy_(self.step_count)
            self._devices[device] = ds
        return ds

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; ours also needs its schedule, device
        # tables and backends. Hooks are dropped as torch drops them; the layout is rebuilt.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k != "_layout"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict
        self._layout = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._layout = None
        for p in self.param_groups[-1]["params"]:
            self._device(p.device)  # tables go to each device once, never during step()
        # chosen once, from every parameter's device and dtype: a backend that cannot take
        # them fails here, not in step(), and step() does no selection work
        dtypes: dict[torch.device, set] = {}
        dense: dict[torch.device, bool] = {}
        for group in self.param_groups:
            for p in group["params"]:
                dtypes.setdefault(p.device, set()).add(p.dtype)
                dense[p.device] = dense.get(p.device, True) and backends.fills_block(_local(p))
        self._chosen = {dev: self._backends.for_device(dev, dts, dense[dev]) for dev, dts in dtypes.items()}

    @property
    def backend_name(self) -> str:
        """The backend that steps the first parameter's device."""
        return self._chosen[next(iter(self._devices))].name

    @property
    def _primary(self) -> _DeviceSchedule:
        return next(iter(self._devices.values()))

    @property
    def step_count(self) -> Tensor:
        """Steps applied so far (0-d int64 on the first parameter's device): the table index."""
        return self._primary.step_count

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped as no-ops (AMP overflow or non-finite grads): 0-d int64 on the device."""
        return self._primary.skipped_steps

    @property
    def lr_table(self) -> Tensor:
        """The LR multipliers (float32, on the first parameter's device)."""
        return self._primary.lr_table

    @property
    def wd_table(self) -> Tensor:
        """The weight-decay multipliers (float32, on the first parameter's device)."""
        return self._primary.wd_table

    def current_lr(self) -> list[Tensor]:
        """Each group's LR for the next ``step()``, as float64 device tensors (no host sync)."""
        ds = self._primary
        idx = ds.step_count.clamp(max=self.total_steps - 1).view(1)
        m = ds.lr_table.index_select(0, idx).squeeze(0).to(torch.float64)
        return [m * g["lr"] for g in self.param_groups]

    def dual_summary(self, *, rho: float = 1.0, step: int | None = None) -> list[dual.DualSummary]:
        """Each group's dual-coefficient summary over the whole schedule (see :mod:`d2z_optim.dual`).

        Uses the float64 multipliers of the schedule (or the table, for ``schedule=None``),
        the group's peak ``lr`` and ``weight_decay``, and this optimizer's weight-decay
        mode and ``wd_schedule``. ``rho`` is the muP width factor of the LR.
        """
        sched = self.schedule if self.schedule is not None else self._lr_table_cpu
        wd = self.wd_schedule if self.wd_schedule is not None else None
        return [
            dual.summary(
                sched,
                g["lr"],
                g["weight_decay"],
                rho=rho,
                step=step,
                weight_decay_mode=self.weight_decay_mode,
                wd_schedule=wd,
            )
            for g in self.param_groups
        ]

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step (see :class:`torch.optim.AdamW`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # AMP: torch.amp.GradScaler sets these attributes for optimizers that declare
        # _step_supports_amp_scaling, instead of unscaling and checking grads itself (a sync)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        layout, done, used = self._layout, False, found_inf
        if not torch.compiler.is_compiling() and layout is not None and layout.plan is not None:
            if layout.matches(self):
                done, used = layout.plan_step(self, grad_scale, found_inf)
            if not done:
                self._layout = None  # the plan could not take this step: build the lists anew
        if not done:
            used = self._step_lists(grad_scale, found_inf)
        if used is not None:  # GradScaler's found_inf, or skip_nonfinite's
            skipped = self._primary.skipped_steps
            skipped.add_((used.to(skipped.device, non_blocking=True).reshape(()) != 0).to(torch.int64))
        if not torch.compiler.is_compiling():  # a Python counter would recompile every step
            self._host_steps += 1
            if self._host_steps == self.total_steps + 1 and not self._unbounded:
                warnings.warn(
                    f"d2z_optim.AdamW: step() called more than total_steps={self.total_steps} times; "
                    "the schedule's last multiplier is reused from now on",
                    stacklevel=4,
                )
        return loss

    def _step_lists(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
        """The step through the lists of tensors: each backend's call gets them all. Returns the
        found_inf the step used."""
        grads = [[p.grad for p in g["params"]] for g in self.param_groups]
        layout, checked = self._layout, False
        if layout is None or not (layout.matches(self) and layout.grads_present(grads)):
            self._check_grads(grads)  # every check before any write (or any new state)
            layout = self._layout = _StepLayout(self, grads)
            checked = True
        elif not layout.kernel_checks and not layout.grads_match(grads):
            self._check_grads(grads)  # raises, naming the offending gradient
        try:
            return self._apply(layout, grads, grad_scale, found_inf)
        except RuntimeError:
            # One device with a fused kernel: the op checked the gradients itself and wrote nothing.
            # Say what torch would say about a bad gradient; a gradient laid out unlike its
            # parameter is copied into its layout from now on, and the step retried.
            if not layout.kernel_checks or checked:
                raise
            self._check_grads(grads)
            if layout.relayout:
                raise
            layout.relayout = True
            layout.plan = None
            return self._apply(layout, grads, grad_scale, found_inf)

    def _apply(self, layout: _StepLayout, grads, grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
        works = layout.works(self, grads)
        if self.skip_nonfinite:
            found_inf = self._nonfinite([[gr for g in w.groups for gr in g.grads] for w in works.values()], found_inf)
        for dev, work in works.items():
            work.grad_scale, work.found_inf = self._amp_tensors(dev, grad_scale, found_inf)
            self._chosen[dev].step(work)
        return found_inf

    @staticmethod
    def _amp_tensors(dev: torch.device, grad_scale: Tensor | None, found_inf: Tensor | None):
        """GradScaler's tensors as the kernels take them on ``dev`` (float32, no sync)."""
        if grad_scale is not None:
            grad_scale = grad_scale.to(dev, torch.float32, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(dev, torch.float32, non_blocking=True)
        return grad_scale, found_inf

    def _nonfinite(self, grad_lists: list[list[Tensor]], found_inf: Tensor | None) -> Tensor:
        """found_inf, or 1.0 where any gradient holds a NaN or an Inf: checked on the device, no sync.
        ``grad_lists``: the step's gradients, one list per device."""
        dev = next(iter(self._devices))
        found = torch.zeros((), dtype=torch.float32, device=dev) if found_inf is None else found_inf.reshape(())
        for grads in grad_lists:
            grads = [gr for gr in grads if gr.numel()]
            if grads:
                # the L2 norm of a tensor holding NaN or Inf is not finite. (The max-abs norm
                # would say the same but measured 20x slower on CPU: 666 vs 30 ms on GPT-2 small.)
                # In float32 whatever the gradients' dtype: a half norm overflows at 65504 (a
                # finite gradient whose float32 norm overflows, above ~1.8e19, still counts; the
                # CPU plan's scan, exact, does not count it).
                norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
                bad = ~torch.isfinite(torch.stack(norms)).all()
                found = torch.maximum(found, bad.to(device=dev, dtype=torch.float32, non_blocking=True))
        return found

    def _check_grads(self, grads: list[list[Tensor | None]]) -> None:
        for group, gl in zip(self.param_groups, grads):
            for p, grad in zip(group["params"], gl):
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                if (
                    grad.layout != torch.strided
                    or grad.shape != p.shape
                    or grad.dtype != p.dtype
                    or grad.device != p.device
                ):
                    raise RuntimeError(
                        f"grad of a parameter must match it: parameter {tuple(p.shape)} {p.dtype} on "
                        f"{p.device}, grad {tuple(grad.shape)} {grad.layout} {grad.dtype} on {grad.device}"
                    )

    @staticmethod
    def _group_work(group: dict, device: torch.device) -> backends.GroupWork:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr = lr.to(device=device, dtype=torch.float64)
        beta1, beta2 = group["betas"]
        return backends.GroupWork(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            foreach=group["foreach"] is not False,
        )

    @staticmethod
    def _init_state(state: dict, p: Tensor, amsgrad: bool) -> None:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's layout, plus ``"d2z"``: the schedule position and description."""
        sd = super().state_dict()
        sched = self.schedule
        sd[_SAVE_KEY] = {
            "step_count": self.step_count.detach().clone(),
            "total_steps": self.total_steps,
            "schedule": None
            if sched is None
            else {"name": sched.name, **{k: v for k, v in sched.params.items() if k != "values"}},
            "weight_decay_mode": self.weight_decay_mode,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class or of :class:`torch.optim.AdamW`.

        From a torch state_dict the schedule position is the largest per-parameter
        ``step`` and a group's ``initial_lr`` (left by torch's LR schedulers) is its
        peak ``lr``. This reads values on the host, once, at load time.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop(_SAVE_KEY, None)
        self._check_loadable(state_dict)  # every check before anything changes
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if "initial_lr" in group:  # left by a torch LR scheduler: the peak LR
                group["lr"] = group.pop("initial_lr")
            group["decoupled_weight_decay"] = True
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:  # torch keeps `step` on the CPU; ours lives with the param
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device).clone()
        if saved is not None:
            position = torch.as_tensor(saved["step_count"], dtype=torch.int64)
            if saved.get("total_steps", self.total_steps) != self.total_steps and not self._unbounded:
                warnings.warn(
                    f"d2z_optim.AdamW: the checkpoint's schedule has {saved['total_steps']} steps, this "
                    f"optimizer's has {self.total_steps}: training continues at step {int(position)} of "
                    "this optimizer's schedule",
                    stacklevel=2,
                )
        else:
            steps = [st["step"].to("cpu") for st in self.state.values() if "step" in st]
            position = torch.stack(steps).max().to(torch.int64) if steps else torch.zeros((), dtype=torch.int64)
        for ds in self._devices.values():
            ds.step_count.copy_(position)
        self._host_steps = int(position)
        if self._host_steps > self.total_steps and not self._unbounded:
            self._host_steps = self.total_steps + 1  # already past the end: warned by the run that saved

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Groups, parameter counts, and each state tensor's shape and dtype against our parameters."""
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"optimizer state_dict has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        params = {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {gi} of the loaded state dict has {len(sg['params'])} parameters, "
                    f"this optimizer's has {len(g['params'])}"
                )
            params.update(zip(sg["params"], g["params"]))
        for idx, st in state_dict["state"].items():
            p = params.get(idx)
            if p is None:
                raise ValueError(f"loaded state dict has state for parameter {idx!r}, which no group holds")
            for key, value in st.items():
                if key == "step" or not isinstance(value, Tensor):
                    continue
                if value.shape != p.shape:
                    raise ValueError(
                        f"loaded state {key!r} of parameter {idx} has shape {tuple(value.shape)}, "
                        f"the parameter has {tuple(p.shape)}"
                    )
                if value.dtype != p.dtype:
                    raise ValueError(
                        f"loaded state {key!r} of parameter {idx} has dtype {value.dtype}, the parameter has "
                        f"{p.dtype} (states are kept in the parameter's dtype)"
                    )

    # ---------------------------------------------------------------- helpers
    def __repr__(self) -> str:
        base = super().__repr__()
        sched = "constant (no schedule)" if self.schedule is None else repr(self.schedule)
        return f"{base[:-1]}    schedule: {sched}\n    backend: {self.backend_name}\n)"
