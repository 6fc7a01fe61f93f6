"""``d2z_optim.AdamW``: torch's AdamW with the LR schedule on the device.

The torch.optim face: arguments, parameter groups, state and a short ``step()``, in the shape of
``torch/optim/adamw.py``. Below it: the step cache (``step_cache.py``: the per-step tensor lists
and the hand-over to a backend's step holder), the schedule tables and counters on each device
(``device_schedule.py``), the checkpoint checks and conversion (``checkpoint.py``), and the
backends that hold the update math (``backends/``).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import arguments, backends, checkpoint, dual, tracked
from .device_schedule import OutsideLrWatch, RunEndWatch, ScheduleTables, as_schedule, check_warmup
from .grad_clip import SPIKE_DEFAULTS, GradClip, check_settings
from .schedules import Schedule
from .state_dtypes import (
    REMAINDER,
    StateDtypes,
    check_master_weights,
    check_rounding,
    check_state_dtypes,
    rounds_any,
)
from .step_cache import StepCache, choose_backends

__all__ = ["AdamW"]

WEIGHT_DECAY_MODES = ("coupled", "independent")


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
        (``amsgrad``, ``maximize``, ``capturable``, ``differentiable`` must be bools, ``foreach`` and
        ``fused`` bools or None; every group's own values are checked as these are.)
        fused: ``True`` requires a fused kernel backend, ``False`` the torch backend.
        schedule: a name from :func:`d2z_optim.schedules.names`, a
            :class:`~d2z_optim.schedules.Schedule`, or a 1-D sequence/tensor of
            multipliers. ``None`` is a constant 1 (torch's behaviour), unless
            ``total_steps`` is given: then ``"linear-d2z"``, the paper's recipe.
        total_steps: number of ``step()`` calls of the run (needed by named schedules).
        warmup: warmup steps (int) or fraction of ``total_steps`` (float) for named schedules;
            10% when not given. Given with a table or a Schedule (which hold their own) or
            without ``total_steps``, it raises instead of being ignored.
        wd_schedule: multipliers of the weight decay, same forms as ``schedule``;
            all ones by default.
        weight_decay_mode: ``"coupled"`` decays by ``lr_g * table[t] * wd_g * wd_table[t]``
            (torch's AdamW); ``"independent"`` by ``wd_g * table[t] * wd_table[t]``
            (follows the schedule's shape but not the peak LR).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        skip_nonfinite: check every gradient on the device and make a step whose
            gradients hold a NaN or an Inf a no-op (parameters, states and the
            schedule position unchanged; counted in ``skipped_steps``). No host sync.
        max_grad_norm: clip the gradients by their global norm inside the step:
            ``coef = min(1, max_grad_norm / (norm + 1e-6))`` (``clip_grad_norm_``'s formula) scales
            the gradients the update reads (``.grad`` is not written), with the norm of the true
            (AMP-unscaled) gradients computed on the device; a non-finite norm makes the step a
            no-op as ``skip_nonfinite`` does (which it replaces). ``grad_norm`` holds the norm.
        norm_type: ``2.0`` or ``inf``.
        spike_skip: make a step whose gradient norm exceeds the mean + ``spike_sigma`` standard
            deviations of the last ``spike_window`` applied steps' norms a no-op (once the window
            is full; counted in ``skipped_steps``; the window is saved in ``state_dict``).
        exp_avg_dtype, exp_avg_sq_dtype: the storage dtype of the moments (``max_exp_avg_sq``
            follows ``exp_avg_sq``): ``None`` (the parameter's, as torch), ``torch.float32``,
            ``torch.bfloat16`` or ``torch.float16`` (or their names). The math stays in float32
            registers; the moments are rounded to nearest even when stored. For fp32, bf16 and fp16
            parameters; float64 and complex ones keep their own dtype. Fixed at construction;
            ``load_state_dict`` converts saved moments into them.
        stochastic_rounding: round every bfloat16/float16 value the step writes (bf16/fp16
            parameters, 16-bit moments) stochastically: up with probability (the bits dropped) /
            (their unit), so an update smaller than half an ulp still moves the weight on average
            (round to nearest even loses it, as at the end of a decay to zero). The random bits are
            a hash of (``rounding_seed``, the schedule position, the tensor's position among the
            step's tensors, the element): no RNG state, the same bits on every backend, the same
            after a resume. float32/float64 values are unaffected; refused (ValueError) when no
            parameter or moment is 16-bit. Fixed at construction.
        rounding_seed: the generator's seed, an int in ``[0, 2**32)``.
        master_weights: ``None`` (each parameter is its own master value, as torch) or
            ``"remainders"``: each bfloat16 parameter keeps an int16 remainder (state
            ``"param_remainder"``) that with it gives back an fp32 master value exactly, 2 bytes
            per parameter instead of a 4-byte fp32 copy; the step updates that fp32 value and
            writes the bf16 parameter (its nearest, ties away from zero) and the remainder. The
            moments of such a parameter follow its master: float32 unless ``exp_avg_dtype`` /
            ``exp_avg_sq_dtype`` ask otherwise. float32/float64 parameters are their own masters
            (a no-op for them) and float16 ones step as without; refused (ValueError) when no
            parameter is bfloat16. Fixed at construction.

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
        warmup: int | float | None = None,
        wd_schedule: str | Schedule | Sequence[float] | Tensor | None = None,
        weight_decay_mode: str = "coupled",
        backend: str = "auto",
        skip_nonfinite: bool = False,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        spike_skip: bool = False,
        spike_window: int = SPIKE_DEFAULTS["spike_window"],
        spike_sigma: float = SPIKE_DEFAULTS["spike_sigma"],
        exp_avg_dtype: torch.dtype | str | None = None,
        exp_avg_sq_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        master_weights: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        arguments.check_group(defaults)  # torch's checks and errors for torch's arguments
        defaults = arguments.as_python_flags(defaults)  # numpy bools -> bool (they are compared by identity)
        self.weight_decay_mode = weight_decay_mode  # checked by the property's setter
        self.skip_nonfinite = skip_nonfinite
        self._clip = GradClip(check_settings(max_grad_norm, norm_type, spike_skip, spike_window, spike_sigma))
        self._state_dtypes = check_state_dtypes(exp_avg_dtype, exp_avg_sq_dtype)
        self._rounding = check_rounding(stochastic_rounding, rounding_seed)
        self._selection = backends.resolve(backend, fused=defaults["fused"])
        if schedule is None and total_steps is not None:
            schedule = "linear-d2z"
        check_warmup(warmup, total_steps, schedule, wd_schedule)
        self.schedule = as_schedule(schedule, "schedule", total_steps, warmup, defaults, weight_decay_mode)
        self.wd_schedule = as_schedule(wd_schedule, "wd_schedule", total_steps, warmup, defaults, weight_decay_mode)
        self._tables = ScheduleTables(self.schedule, self.wd_schedule, total_steps)
        self.total_steps: int = self._tables.total_steps
        self._cache = self._new_cache()
        self._lock = threading.Lock()
        self._changes = tracked.Counter()  # changes to the state and the groups' lists (step cache)
        self._outside_lr = OutsideLrWatch()  # a group's lr rewritten between steps: double scheduling
        defaults["betas"] = arguments.scalar_betas(betas)
        super().__init__(params, dict(defaults, decoupled_weight_decay=True))
        self.state = tracked.OptimizerState(self._changes)
        dtypes = [p.dtype for g in self.param_groups for p in g["params"]]
        if check_master_weights(master_weights, dtypes):
            self._state_dtypes = dataclasses.replace(self._state_dtypes, remainders=True)
            self._cache = self._new_cache()
        if self._rounding and not rounds_any(dtypes, self._state_dtypes):
            raise ValueError(
                "stochastic_rounding=True rounds nothing here: no parameter is bfloat16 or float16 (without "
                "master_weights='remainders', whose parameters are exact) and no moment is stored in one "
                "(exp_avg_dtype / exp_avg_sq_dtype); float32 values are never rounded"
            )
        real = [p.device for g in self.param_groups for p in g["params"] if p.device.type != "meta"]
        self._tables.use(real[:1])  # the first parameter's device holds the position from the start

    def _new_cache(self) -> StepCache:
        return StepCache(self._init_state, self._state_dtypes, self.__dict__.get("_rounding", 0.0))

    @property
    def exp_avg_dtype(self) -> torch.dtype | None:
        """The storage dtype of ``exp_avg`` asked for (None: each parameter's own)."""
        return self._state_dtypes.exp_avg

    @property
    def exp_avg_sq_dtype(self) -> torch.dtype | None:
        """The storage dtype of ``exp_avg_sq`` and ``max_exp_avg_sq`` asked for (None: each parameter's own)."""
        return self._state_dtypes.exp_avg_sq

    @property
    def master_weights(self) -> str | None:
        """``"remainders"`` (bf16 parameters keep an int16 remainder: fp32 master values) or None."""
        return "remainders" if self._state_dtypes.remainders else None

    @property
    def stochastic_rounding(self) -> bool:
        """Whether 16-bit values are rounded stochastically (fixed at construction)."""
        return self._rounding != 0.0

    @property
    def rounding_seed(self) -> int:
        """The stochastic rounding's seed (0 when it is off)."""
        return max(int(self._rounding) - 1, 0)

    @property
    def weight_decay_mode(self) -> str:
        """``"coupled"`` (torch's AdamW) or ``"independent"``; may be changed between steps."""
        return self._weight_decay_mode

    @weight_decay_mode.setter
    def weight_decay_mode(self, mode: str) -> None:
        if mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {list(WEIGHT_DECAY_MODES)}, got {mode!r}")
        self._weight_decay_mode = mode

    @property
    def skip_nonfinite(self) -> bool:
        """Whether a step whose gradients hold a NaN or an Inf is a no-op; may be changed between steps."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        if not arguments.is_bool(value):
            raise TypeError(f"skip_nonfinite must be a bool, got {value!r}")
        self._skip_nonfinite = bool(value)

    def _set_clip(self, **changes: Any) -> None:
        s = self._clip.settings
        now = dict(
            max_grad_norm=s.max_grad_norm,
            norm_type=s.norm_type,
            spike_skip=s.spike_skip,
            spike_window=s.spike_window,
            spike_sigma=s.spike_sigma,
        )
        self._clip.configure(check_settings(**{**now, **changes}))

    @property
    def max_grad_norm(self) -> float | None:
        """The global-norm clipping threshold (None: no clipping); may be changed between steps."""
        return self._clip.settings.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self._set_clip(max_grad_norm=value)

    @property
    def norm_type(self) -> float:
        """The norm of ``max_grad_norm`` and ``grad_norm``: 2.0 or inf; may be changed between steps."""
        return self._clip.settings.norm_type

    @norm_type.setter
    def norm_type(self, value: float) -> None:
        self._set_clip(norm_type=value)

    @property
    def spike_skip(self) -> bool:
        """Whether a step whose gradient norm spikes is skipped; may be changed between steps."""
        return self._clip.settings.spike_skip

    @spike_skip.setter
    def spike_skip(self, value: bool) -> None:
        self._set_clip(spike_skip=value)

    @property
    def grad_norm(self) -> Tensor | None:
        """The global gradient norm of the last step, before clipping: a new float32 0-d tensor on
        the first parameter's device each read (a copy: the optimizer writes its own each step),
        so norms kept for later logging stay each step's; no sync until you read its value.
        Non-finite when the gradients were; NaN before the first step; None unless
        ``max_grad_norm`` or ``spike_skip`` is set. Skipped steps count: it is the norm that made
        them skip."""
        return self._clip.grad_norm.clone() if self._clip.settings.active else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :meth:`torch.optim.Optimizer.add_param_group`). Every check runs before
        the group is appended: torch's, the group's own settings as the constructor checks them, a
        parameter listed twice, and a named backend's fit (for parameters not on ``meta``)."""
        groups = self.param_groups
        self.param_groups = list(groups)  # torch's normalisation and checks, on a copy of the list
        try:
            candidate = dict(param_group) if isinstance(param_group, dict) else param_group
            with warnings.catch_warnings():  # torch warns of a parameter listed twice; we refuse it below
                warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
                super().add_param_group(candidate)
        finally:
            self.param_groups = groups
        arguments.check_group(candidate)
        candidate.update(arguments.as_python_flags(candidate))
        arguments.check_distinct(candidate["params"], f"parameter group {len(groups)}")
        real = [p for p in candidate["params"] if p.device.type != "meta"]  # meta: moved before stepping
        choose_backends([*groups, {"params": real}], self._selection)
        candidate["betas"] = arguments.scalar_betas(candidate["betas"])
        candidate["params"] = tracked.ParamList(self._changes, candidate["params"])
        param_group.clear()  # the caller's dict is the group, as torch keeps it
        param_group.update(candidate)
        groups.append(param_group)
        self._cache.invalidate()

    def _init_state(self, p: Tensor, amsgrad: bool) -> dict:
        """A new parameter's state, in torch's keys and layout."""
        dt = self._state_dtypes.of
        zeros = lambda key: torch.zeros_like(p, dtype=dt(key, p.dtype), memory_format=torch.preserve_format)
        state = tracked.ParamState(
            self._changes,
            step=torch.zeros((), dtype=torch.float32, device=p.device),
            exp_avg=zeros("exp_avg"),
            exp_avg_sq=zeros("exp_avg_sq"),
        )
        if amsgrad:
            state["max_exp_avg_sq"] = zeros("max_exp_avg_sq")
        if self._state_dtypes.has_remainder(p.dtype):  # the master is the bf16 value, exactly
            state[REMAINDER] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)
        return state

    # ------------------------------------------------------------------ reading
    @property
    def backend_name(self) -> str:
        """The backend that steps the first parameter's device (before the first step: the one
        that would; with no parameter at all: the name asked for)."""
        chosen = self._cache.backends
        if chosen is None:
            real = [{"params": [p for g in self.param_groups for p in g["params"] if p.device.type != "meta"]}]
            chosen = choose_backends(real, self._selection)
        return next(iter(chosen.values())).name if chosen else self._selection.name

    @property
    def step_count(self) -> Tensor:
        """Steps applied so far (0-d int64 on the first parameter's device): the table index."""
        return self._tables.primary.step_count

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped as no-ops (AMP overflow or non-finite grads): 0-d int64 on the device."""
        return self._tables.primary.skipped_steps

    @property
    def lr_table(self) -> Tensor:
        """The LR multipliers (float32, on the first parameter's device)."""
        return self._tables.primary.lr_table

    @property
    def wd_table(self) -> Tensor:
        """The weight-decay multipliers (float32, on the first parameter's device)."""
        return self._tables.primary.wd_table

    def current_lr(self) -> list[Tensor]:
        """Each group's LR for the next ``step()``, as float64 device tensors (no host sync)."""
        m = self._tables.next_multiplier()
        return [m * (g["lr"].reshape(()) if isinstance(g["lr"], Tensor) else g["lr"]) for g in self.param_groups]

    def last_lr(self) -> list[Tensor]:
        """Each group's LR as applied by the last step that ran (skipped ones do not count), as
        float64 device tensors: no host sync, for logging. Before the first step: the first step's.
        ``param_groups[i]["lr"]`` is the peak the schedule multiplies, not the current LR."""
        m = self._tables.multiplier_at(self._tables.primary.step_count - 1)
        return [m * (g["lr"].reshape(()) if isinstance(g["lr"], Tensor) else g["lr"]) for g in self.param_groups]

    def last_lr_host(self) -> list[float]:
        """:meth:`last_lr` computed on the host from the host's count of ``step()`` calls and the
        host copy of the table: no device read at all. Exact while no step was skipped (AMP
        overflow, skip_nonfinite): the host cannot see a skip without a sync, so after k skips it
        is k steps ahead; :meth:`last_lr` is exact always. A group's LR given as a tensor on a
        device is read from it (one sync): use :meth:`last_lr` there."""
        m = self._tables.host_multiplier_at(self._tables.host_steps - 1)
        return [m * (float(g["lr"]) if isinstance(g["lr"], Tensor) else g["lr"]) for g in self.param_groups]

    def check_run_end(self) -> bool:
        """Say the run is over: warns (once per process) when it ended before its schedule's last
        step, with both figures, and returns whether it did. Host values only. The integrations
        call it when training ends; otherwise it runs by itself at interpreter exit."""
        watch = self.__dict__.get("_run_end")
        if watch is None:
            watch = self._run_end = RunEndWatch(self, self._tables)
        return watch.report()

    def dual_summary(self, *, rho: float = 1.0, step: int | None = None) -> list[dual.DualSummary]:
        """Each group's dual-coefficient summary over the whole schedule (see :mod:`d2z_optim.dual`).

        Uses the float64 multipliers of the schedule (or the table, for ``schedule=None``),
        the group's peak ``lr`` and ``weight_decay``, and this optimizer's weight-decay
        mode and ``wd_schedule``. ``rho`` is the muP width factor of the LR.
        """
        sched = self.schedule if self.schedule is not None else self._tables.lr_host
        mode, wd = self.weight_decay_mode, self.wd_schedule
        return [
            dual.summary(sched, g["lr"], g["weight_decay"], rho=rho, step=step, weight_decay_mode=mode, wd_schedule=wd)
            for g in self.param_groups
        ]

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step (see :class:`torch.optim.AdamW`). Calls from several
        threads are serialised: each step sees the schedule position the previous one left."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():  # one trace: no lock to take (dynamo cannot trace one)
            self._step()
        else:
            with self._lock:
                self._step()
        return loss

    def _step(self) -> None:
        # AMP: torch.amp.GradScaler sets these attributes for optimizers that declare
        # _step_supports_amp_scaling, instead of unscaling and checking grads itself (a sync)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        used = self._cache.step(
            self.param_groups,
            self.state,
            self._selection,
            self._tables,
            grad_scale,
            found_inf,
            independent_wd=self._weight_decay_mode == "independent",
            skip_nonfinite=self._skip_nonfinite,
            clip=self._clip if self._clip.settings.active else None,
        )
        self._tables.count_step(used)
        if not torch.compiler.is_compiling():
            self._outside_lr.check(self.param_groups, self.schedule)
            if self.__dict__.get("_run_end") is None:
                self._run_end = RunEndWatch(self, self._tables)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's layout, plus ``"d2z"``: the schedule position and description."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}  # plain dicts
        sd[checkpoint.SAVE_KEY] = checkpoint.entry(self._tables, self.weight_decay_mode)
        if self._state_dtypes.converts:
            sd[checkpoint.SAVE_KEY]["state_dtypes"] = self._state_dtypes.describe()
        if self._clip.settings.active:
            sd[checkpoint.SAVE_KEY]["clip"] = self._clip.state()
        if self._rounding:
            sd[checkpoint.SAVE_KEY]["rounding"] = self._rounding_entry()
        return sd

    def _rounding_entry(self) -> dict[str, Any] | None:
        return {"stochastic": True, "seed": self.rounding_seed} if self._rounding else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class or of :class:`torch.optim.AdamW`, all or nothing: every
        check (torch's part and ours) runs before anything changes (see :mod:`d2z_optim.checkpoint`
        for the conversions, e.g. a torch scheduler's ``initial_lr``). Reads the position on the
        host, once, at load time."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch runs them: first
            state_dict = hook(self, state_dict) or state_dict
        saved = state_dict.pop(checkpoint.SAVE_KEY, None)
        checkpoint.check_loadable(self.param_groups, state_dict, saved, self._state_dtypes)
        GradClip.check_state((saved or {}).get("clip"))
        # moments stored in another dtype than their parameter's are converted here, not by torch's
        # load (which casts to the parameter's dtype first: fp32 moments of bf16 parameters would lose bits)
        state_dict, moments = checkpoint.take_moments(self.param_groups, state_dict, self._state_dtypes)
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        checkpoint.put_moments(self.state, moments, self._state_dtypes)
        checkpoint.convert_loaded(self.param_groups, self.state, scheduled=self.schedule is not None, ours=saved)
        position, skipped = checkpoint.position_after_load(saved, self.state, self._tables, self.weight_decay_mode)
        self._tables.set_position(position, skipped)
        self._clip.load((saved or {}).get("clip"))  # a torch state_dict, or one saved without clipping: an empty window
        if isinstance(saved, dict) and saved.get("rounding") != self._rounding_entry():
            was, now = saved.get("rounding") or "to nearest even", self._rounding_entry() or "to nearest even"
            warnings.warn(
                f"d2z_optim.AdamW: the checkpoint was saved with rounding {was}, "
                f"this optimizer rounds {now} (its constructor's setting, "
                "which it keeps): the run continues, but not bit for bit as the saved one would have",
                stacklevel=2,
            )
        for hook in post.values():  # as torch runs them: last, on the loaded optimizer
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; ours also needs its schedule, device
        # tables and backends. Hooks are dropped as torch drops them; the cache and lock are new.
        skip = ("_cache", "_lock", "_run_end")
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict
        if "_state_dtypes" not in self.__dict__:  # pickled before lean states existed
            self._state_dtypes = StateDtypes()
        self.__dict__.setdefault("_rounding", 0.0)
        if "_changes" not in self.__dict__:
            self._changes = tracked.Counter()
        for group in self.param_groups:  # flags a checkpoint of an older torch lacks: torch's defaults
            for key, default in checkpoint.GROUP_DEFAULTS.items():
                group.setdefault(key, default)
            group["decoupled_weight_decay"] = True
            if type(group["params"]) is not tracked.ParamList:
                group["params"] = tracked.ParamList(self._changes, group["params"])
        if type(self.state) is not tracked.OptimizerState:
            self.state = tracked.OptimizerState(self._changes, self.state)
        if "_cache" in self.__dict__:
            self._cache.invalidate()
        else:  # unpickled (or an older pickle): a new cache and lock
            self._cache = self._new_cache()
            self._lock = threading.Lock()
        if "_clip" not in self.__dict__:  # pickled before clipping existed
            self._clip = GradClip(check_settings(None, 2.0, False, **SPIKE_DEFAULTS))
        for old, new in (("weight_decay_mode", "_weight_decay_mode"), ("skip_nonfinite", "_skip_nonfinite")):
            if old in self.__dict__:  # pickled before these were properties
                self.__dict__[new] = self.__dict__.pop(old)

    def __repr__(self) -> str:
        base = super().__repr__()
        sched = "constant (no schedule)" if self.schedule is None else repr(self.schedule)
        return f"{base[:-1]}Schedule: {sched}\nBackend: {self.backend_name}\n)"
