"""The step cache: the tensor lists of each step, what invalidates them, and the hand-over of
those lists to a backend's persistent step holder.

Gathering the lists walks every parameter in Python (state lookups, DTensor shards), which costs
more than the fused kernel itself for thousands of small tensors (measured on 10,000 x 1,024
fp32 CPU tensors: ~50 ms of a 71 ms step). So they are gathered once (:class:`CachedLists`) and
reused while the same parameters have gradients; each step only reads the gradients and checks
them in bulk. Where the backend keeps a step holder (the C++ CPU kernel), the lists are handed
to it once and a step passes only the schedule tensors (handing the op ~50,000 tensors each step
cost ~12 ms of a ~19 ms step there).

The lists are rebuilt when a group's parameter list, which parameters have a gradient, a group's
``amsgrad``, or any state dict or state tensor changes (``load_state_dict``, ``add_param_group``,
new state, a state tensor replaced by the user), and when the holder cannot take a step.

The optimizer hands :meth:`StepCache.step` what the cache needs each step (its groups, state,
backends and schedule tables): the cache reads nothing else of it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import repeat

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer

from .backends import TORCH, Backend, Selection, fills_block, flag_nonfinite
from .backends.contract import (
    DeviceWork,
    GroupWork,
    HparamsTable,
    StepStatus,
    in_layout_of,
    no_remainder,
    same_layout,
)
from .device_schedule import ScheduleTables
from .grad_clip import GradClip
from .state_dtypes import AS_PARAMS, REMAINDER, StateDtypes
from .tracked import OptimizerState, ParamList

__all__ = ["STATE_KEYS", "StepCache", "check_grads", "local"]

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
InitState = Callable[[Tensor, bool], dict]  # (parameter, amsgrad) -> its new state


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view of its storage: in-place updates land in the DTensor)."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _locals(ts: list[Tensor]) -> list[Tensor]:
    return [local(t) for t in ts]


@dataclass
class _Group:
    """A parameter group as the lists saw it."""

    params: list[Tensor]  # the group's own list object (an identity check sees it replaced)
    snapshot: list[Tensor]  # its items then (an identity check sees one swapped in place)
    amsgrad: bool
    has_grad: list[bool]


@dataclass
class _Slot:
    """The tensors of one (group, device) that the kernels take, in group order."""

    group: int
    device: torch.device
    indices: list[int] | None  # into the group's parameters; None: all of them
    params: list[Tensor] = field(default_factory=list)  # DTensor: local shards
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    remainders: list[Tensor] = field(default_factory=list)  # empty: none in this slot (GroupWork.remainders)


class CachedLists:
    """The step's tensor lists per device and group, gathered once and reused across steps."""

    def __init__(
        self,
        groups: list[dict],
        state: Mapping[Tensor, dict],
        grads: list[list[Tensor | None]],
        backends: Mapping[torch.device, Backend],
        init_state: InitState,
        state_dtypes: StateDtypes = AS_PARAMS,
    ) -> None:
        self.backends = dict(backends)
        self.idle = False  # no parameter had a gradient: the backends are a placeholder
        self.groups: list[_Group] = []
        self.slots: list[_Slot] = []
        self.dtensor = False
        for gi, (group, gl) in enumerate(zip(groups, grads)):
            params = group["params"]
            has_grad = [g is not None for g in gl]
            self.groups.append(_Group(params, list(params), group["amsgrad"], has_grad))
            per_dev: dict[torch.device, _Slot] = {}
            for i, (p, present) in enumerate(zip(params, has_grad)):
                if not present:
                    continue
                slot = per_dev.setdefault(p.device, _Slot(gi, p.device, []))
                st = state.get(p)
                if not st:  # a new state (not state[p]: torch.compile cannot trace defaultdict's __missing__)
                    st = init_state(p, group["amsgrad"])
                    state[p] = st
                self.dtensor |= type(p).__name__ == "DTensor"
                slot.indices.append(i)
                slot.params.append(p)  # DTensors (FSDP2) as they are: works() takes their local shards
                slot.exp_avgs.append(st["exp_avg"])
                slot.exp_avg_sqs.append(st["exp_avg_sq"])
                if group["amsgrad"]:
                    slot.max_exp_avg_sqs.append(st["max_exp_avg_sq"])
                slot.steps.append(st["step"])
                # a remainder for each bf16 parameter (master_weights="remainders"): made by init_state
                # or load_state_dict, and checked by check_states before these lists are built
                rem = st[REMAINDER] if state_dtypes.has_remainder(local(p).dtype) else None
                slot.remainders.append(rem)
            for slot in per_dev.values():
                if len(slot.indices) == len(params):
                    slot.indices = None
                slot.remainders = (
                    [no_remainder(local(p)) if r is None else r for p, r in zip(slot.params, slot.remainders)]
                    if any(r is not None for r in slot.remainders)
                    else []
                )
                self.slots.append(slot)
        # the state each step uses, to see a state dict or tensor replaced outside load_state_dict
        # (e.g. states moved to another device): ~0.1 us per parameter and key, C loops only
        self.state_values = list(state.values())
        chosen = [p for g in self.groups for p, m in zip(g.params, g.has_grad) if m]
        self.state_dicts = [state.get(p) for p in chosen]
        keys = STATE_KEYS if any(g["amsgrad"] for g in groups) else STATE_KEYS[:3]
        keys += (REMAINDER,) if state_dtypes.remainders else ()
        self.state_tensors = {k: [d.get(k) for d in self.state_dicts] for k in keys}  # what the kernels use
        # what each present gradient must be: dense, with its parameter's size (read each step:
        # `p.data = ...` may change it), dtype and device
        self.params = chosen
        self.expect = ([torch.strided] * len(chosen), [p.dtype for p in chosen], [p.device for p in chosen])
        self.strides = [p.stride() for p in chosen]
        self.sizes = [p.size() for p in chosen]  # then: a `.data =` resize since is seen against these
        # One device stepped by a fused kernel: the op checks every gradient itself before it
        # writes anything, so the steady state skips the checks here (~0.7 us per tensor) and
        # the step says torch's words only when the op refuses. Otherwise checked here each step.
        self.kernel_checks = len(backends) == 1 and next(iter(backends.values())) is not TORCH
        # gradients laid out unlike their parameters are copied into the parameter's layout for the
        # fused kernels; with kernel checks, only once the op (or this first step) has met one
        self.relayout = not self.kernel_checks or any(
            (gl := self.slot_grads(grads, s)) is not in_layout_of(gl, _locals(s.params) if self.dtensor else s.params)
            for s in self.slots
        )
        # The parameters without a gradient now: a step through the holder below checks only the
        # others (in C++), so these are checked here.
        self.absent = [p for g in self.groups for p, m in zip(g.params, g.has_grad) if not m]
        self.holder = None
        # state and lists that count their changes (tracked.py): one comparison sees them unchanged
        self.state_obj = state
        self.counted = (
            isinstance(state, OptimizerState)
            and state.counts_all()
            and all(type(g.params) is ParamList and g.params._changes is state._changes for g in self.groups)
        )
        self.changes = state.changes if self.counted else -1

    def shard_group(self) -> list | None:
        """The process groups over which DTensor gradients are sharded (one per sharded mesh
        dimension: their norms are all-reduced over each in turn), None without DTensors. Every
        DTensor parameter must be laid out alike (FSDP2's one mesh and placements)."""
        if not self.dtensor:
            return None
        # equal meshes, not one object: each fully_shard() call without mesh= makes its own
        layouts = {(p.device_mesh, tuple(p.placements)) for p in self.params if type(p).__name__ == "DTensor"}
        if len(layouts) != 1 or len(self.params) != sum(type(p).__name__ == "DTensor" for p in self.params):
            raise ValueError(
                "max_grad_norm / spike_skip with DTensor parameters needs every parameter to be a DTensor on one "
                "mesh with the same placements (FSDP2's fully_shard); clip with torch.nn.utils.clip_grad_norm_ "
                "for other layouts"
            )
        p = next(p for p in self.params)
        dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
        return [p.device_mesh.get_group(i) for i in dims] or None

    def slot_grads(self, grads: list[list[Tensor | None]], slot: _Slot) -> list[Tensor]:
        """The gradients of one slot, as the kernels take them (DTensor: local shards)."""
        gl = grads[slot.group] if slot.indices is None else [grads[slot.group][i] for i in slot.indices]
        return [local(g) for g in gl] if self.dtensor else gl

    def matches(self, groups: list[dict], state: Mapping[Tensor, dict]) -> bool:
        """Same groups, parameters and state objects: the lists still hold (gradients aside). O(groups)
        while the counted containers saw no change; else every identity, ~0.1 us per parameter and key."""
        if len(groups) != len(self.groups):
            return False
        for group, g in zip(groups, self.groups):
            if group["params"] is not g.params or group["amsgrad"] != g.amsgrad:
                return False
        if self.counted and state is self.state_obj and state.changes == self.changes:
            return True
        for g in self.groups:
            if len(g.params) != len(g.snapshot) or not all(map(operator.is_, g.params, g.snapshot)):
                return False
        values = list(state.values())
        if len(values) != len(self.state_values) or not all(map(operator.is_, values, self.state_values)):
            return False
        for k, cached in self.state_tensors.items():
            if not all(map(operator.is_, map(dict.get, self.state_dicts, repeat(k)), cached)):
                return False
        if self.counted and state is self.state_obj:  # a change that left these lists alone
            self.changes = state.changes
        return True

    def grads_present(self, grads: list[list[Tensor | None]]) -> bool:
        """The same parameters have a gradient as when the lists were built."""
        return all([g is not None for g in gl] == g.has_grad for gl, g in zip(grads, self.groups))

    def grads_match(self, grads: list[list[Tensor | None]]) -> bool:
        """Every present gradient is dense and has its parameter's shape, dtype and device (in bulk)."""
        flat = [g for gl in grads for g in gl if g is not None]
        layouts, dtypes, devices = self.expect
        return (
            [g.layout for g in flat] == layouts
            and list(map(Tensor.size, flat)) == self.sizes
            and list(map(Tensor.size, self.params)) == self.sizes  # no `.data =` resize since the build
            and [g.dtype for g in flat] == dtypes
            and [g.device for g in flat] == devices
        )

    def params_changed(self) -> bool:
        """A parameter moved to another device, dtype or memory layout since the lists were built
        (``.data = ...``, ``model.double()``, ``model.to(memory_format=...)``)."""
        _, dtypes, devices = self.expect
        return (
            [p.dtype for p in self.params] != dtypes
            or [p.device for p in self.params] != devices
            or [p.stride() for p in self.params] != self.strides
            or [p.size() for p in self.params] != self.sizes
        )

    def works(
        self,
        groups: list[dict],
        schedules: ScheduleTables,
        independent_wd: bool,
        grads: list[list[Tensor | None]] | None = None,
        rounding: float = 0.0,
    ) -> dict[torch.device, DeviceWork]:
        """This step's work per device: the cached lists, this step's gradients (none for a
        holder, which reads them itself) and hyperparameters (``rounding``: every group's, the
        hparams column ROUNDING)."""
        out = {}
        for dev in self.backends:
            ds = schedules.devices[dev]
            out[dev] = DeviceWork(ds.lr_table, ds.wd_table, ds.step_count, independent_wd)
        for s in self.slots:
            gw = group_work(groups[s.group], s.device, rounding)
            gw.params, gw.exp_avgs, gw.exp_avg_sqs = s.params, s.exp_avgs, s.exp_avg_sqs
            gw.max_exp_avg_sqs, gw.steps, gw.remainders = s.max_exp_avg_sqs, s.steps, s.remainders
            if self.dtensor:  # the kernels run on local shards, taken anew each step (swap_tensors and
                # Module._apply give a DTensor another local tensor)
                gw.params, gw.exp_avgs, gw.exp_avg_sqs = map(_locals, (s.params, s.exp_avgs, s.exp_avg_sqs))
                gw.max_exp_avg_sqs, gw.remainders = _locals(s.max_exp_avg_sqs), _locals(s.remainders)
            if grads is not None:
                gl = self.slot_grads(grads, s)
                if self.relayout and self.backends[s.device] is not TORCH:  # fused kernels walk a grad like its param
                    gl = in_layout_of(gl, gw.params)
                gw.grads = gl
            out[s.device].groups.append(gw)
        return out


def choose_backends(
    groups: list[dict], selection: Selection, grads: list[list[Tensor | None]] | None = None
) -> dict[torch.device, Backend]:
    """The backend of each device the parameters (with a gradient, when ``grads`` is given) are on
    now, the first parameter's first, from the dtypes and layouts there. A named backend that
    cannot take them raises ValueError."""
    dtypes: dict[torch.device, set] = {}
    dense: dict[torch.device, bool] = {}
    for gi, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            if grads is not None and grads[gi][i] is None:
                continue
            dtypes.setdefault(p.device, set()).add(p.dtype)
            dense[p.device] = dense.get(p.device, True) and fills_block(local(p))
    return {dev: selection.for_device(dev, dts, dense[dev]) for dev, dts in dtypes.items()}


def check_disjoint(groups: list[dict], grads: list[list[Tensor | None]], backends: Mapping) -> None:
    """Two parameters over the same memory (two Parameter objects viewing one storage) would be
    updated at once by a fused kernel's threads: a race, results differing run to run. Refused,
    naming both (the torch backend updates them one after the other, as torch does)."""
    spans = []
    for gi, (group, gl) in enumerate(zip(groups, grads)):
        for i, (p, g) in enumerate(zip(group["params"], gl)):
            t = local(p)
            if g is None or t.numel() == 0 or backends.get(t.device, TORCH) is TORCH or not fills_block(t):
                continue
            start = t.data_ptr()
            spans.append((t.device, start, start + t.numel() * t.element_size(), gi, i))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    widest = None  # the span reaching furthest so far, on this device
    for b in spans:
        if widest is not None and widest[0] == b[0] and b[1] < widest[2]:
            raise ValueError(
                f"parameter {widest[4]} of group {widest[3]} and parameter {b[4]} of group {b[3]} share memory: a "
                "fused kernel would update both at once (a race); make them one parameter (tied weights: one "
                "nn.Parameter used twice), or use backend='torch'"
            )
        if widest is None or widest[0] != b[0] or b[2] > widest[2]:
            widest = b


def check_states(
    groups: list[dict],
    state: Mapping[Tensor, dict],
    grads: list[list[Tensor | None]],
    dtypes: StateDtypes = AS_PARAMS,
) -> None:
    """A state made for a parameter before it changed device, dtype or size (``model.double()``
    after a step, without moving the optimizer's state) is refused, naming it, before any write.
    Its dtype must be the one ``dtypes`` stores it in (the parameter's unless asked otherwise)."""
    for gi, (group, gl) in enumerate(zip(groups, grads)):
        for i, (p, g) in enumerate(zip(group["params"], gl)):
            st = state.get(p) if g is not None else None
            if not st:
                continue
            pl = local(p)
            keys = STATE_KEYS[1:] if group["amsgrad"] else STATE_KEYS[1:3]
            for key in keys + ((REMAINDER,) if dtypes.has_remainder(pl.dtype) else ()):
                t = st.get(key)
                if not isinstance(t, Tensor):
                    hint = (
                        " (master_weights='remainders' keeps an int16 one for each bfloat16 parameter; "
                        "load_state_dict gives a state saved without one a zero remainder)"
                        if key == REMAINDER
                        else ""
                    )
                    raise ValueError(f"state {key!r} of parameter {i} of group {gi} is {t!r}, not a tensor{hint}")
                tl = local(t)
                want = torch.int16 if key == REMAINDER else dtypes.of(key, pl.dtype)
                if tl.device != pl.device or tl.dtype != want or tl.shape != pl.shape:
                    stored = (
                        " (a remainder is int16)"
                        if key == REMAINDER
                        else ("" if want == pl.dtype else f" (its states stored as {want})")
                    )
                    raise ValueError(
                        f"state {key!r} of parameter {i} of group {gi} is {tuple(tl.shape)} {tl.dtype} on {tl.device} "
                        f"but the parameter is now {tuple(pl.shape)} {pl.dtype} on {pl.device}{stored}: move the "
                        "optimizer's state with its parameters (or load a state_dict, which converts it)"
                    )
                if fills_block(pl) and not (fills_block(tl) and same_layout(tl, pl)) and tl is t:
                    # the parameter took another memory layout (model.to(memory_format=...)): its
                    # states follow it, as the fused kernels walk them alike (same values)
                    st[key] = torch.empty_like(pl, dtype=tl.dtype, memory_format=torch.preserve_format).copy_(tl)


class StepCache:
    """One optimizer's step: through its backend's step holder when the lists are settled, else
    through the lists (built anew when they changed), with every check before any write."""

    def __init__(self, init_state: InitState, state_dtypes: StateDtypes = AS_PARAMS, rounding: float = 0.0) -> None:
        self.init_state = init_state
        self.state_dtypes = state_dtypes  # what each moment is stored in (check_states)
        self.rounding = rounding  # how 16-bit values are stored: 0 to nearest even, seed + 1 stochastically
        self.independent_wd = False  # this step's options (step() sets them: the optimizer's may change)
        self.skip_nonfinite = False
        self.clip: GradClip | None = None
        self._lists: CachedLists | None = None
        self.hparams: dict[torch.device, HparamsTable] = {}  # the fused kernels' tables, per device
        # buffers a CUDA graph capture recorded, of step holders since dropped: kept for the
        # optimizer's life (a graph replays them; the allocator must never hand them out again)
        self.retained: list[Tensor] = []

    @property
    def lists(self) -> CachedLists | None:
        return self._lists

    @lists.setter
    def lists(self, new: CachedLists | None) -> None:
        old = self._lists
        if old is not None and old is not new and old.holder is not None:
            self.retained += old.holder.captured()
        self._lists = new

    def invalidate(self) -> None:
        self.lists = None

    @property
    def backends(self) -> dict[torch.device, Backend] | None:
        """The backend of each device at the last (re)build of the lists (None before, or when no
        parameter had a gradient then)."""
        return None if self.lists is None or self.lists.idle else self.lists.backends

    def step(
        self,
        groups: list[dict],
        state: Mapping[Tensor, dict],
        selection: Selection,
        schedules: ScheduleTables,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        *,
        independent_wd: bool,
        skip_nonfinite: bool,
        clip: GradClip | None = None,
    ) -> Tensor | None:
        """One step; returns the found_inf it used (GradScaler's, skip_nonfinite's verdict, or
        ``clip``'s: a non-finite or spiking gradient norm). ``clip``: the optimizer's clipping
        state when it clips or skips spikes (its norm check replaces skip_nonfinite's scan)."""
        self.independent_wd, self.clip = independent_wd, clip
        self.skip_nonfinite = skip_nonfinite and clip is None
        lists = self.lists
        if not torch.compiler.is_compiling() and lists is not None and lists.holder is not None:
            if lists.matches(groups, state):
                done, used = self._holder_step(lists, groups, schedules, grad_scale, found_inf)
                if done:
                    return used
            self.lists = None  # the holder could not take this step: build the lists anew
        return self._lists_step(groups, state, selection, schedules, grad_scale, found_inf)

    def _works(self, lists, groups, schedules, grads=None) -> dict[torch.device, DeviceWork]:
        works = lists.works(groups, schedules, self.independent_wd, grads, self.rounding)
        for dev, work in works.items():
            if lists.backends[dev] is not TORCH:
                work.hparams = self.hparams.setdefault(dev, HparamsTable()).get(work)
        return works

    def _holder_step(self, lists, groups, schedules, grad_scale, found_inf) -> tuple[bool, Tensor | None]:
        """One step through the holder. False, with nothing written, when it cannot take it (a
        parameter gained or lost a gradient, a tensor changed, a bad gradient, skip_nonfinite asked
        of a holder that does not scan): the caller then steps through the lists, which rebuilds
        them or says what is wrong."""
        if any(p.grad is not None for p in lists.absent):
            return False, found_inf
        if self.skip_nonfinite and not lists.holder.scans_nonfinite:
            return False, found_inf
        (work,) = self._works(lists, groups, schedules).values()
        dev = work.step_count.device
        if self.clip is not None and getattr(lists.holder, "clips", False):  # norm, decisions, update: one call
            work.grad_scale, work.found_inf = amp_tensors(dev, grad_scale, found_inf)
            status = lists.holder.step_clipped(work, self.clip.kernel_args(dev))
            return status is StepStatus.APPLIED, self.clip.found_out
        if self.clip is not None:  # a holder steps one device, without DTensor shards
            grads = {dev: [p.grad for p in lists.params]}
            found_inf, per = self.clip.prepare(grads, lists.backends, dev, grad_scale, found_inf)
            work.grad_scale, work.found_inf = per[dev][0], found_inf
        else:
            work.grad_scale, work.found_inf = amp_tensors(dev, grad_scale, found_inf)
        status = lists.holder.step(work, self.skip_nonfinite)
        if status is StepStatus.SKIPPED_NONFINITE:
            return True, torch.ones((), device=dev)
        return status is StepStatus.APPLIED, found_inf

    def _lists_step(self, groups, state, selection, schedules, grad_scale, found_inf, retried=False) -> Tensor | None:
        """The step through the lists of tensors: each backend's call gets them all."""
        grads = [[p.grad for p in g["params"]] for g in groups]
        lists, checked = self.lists, False
        if lists is None or not (lists.matches(groups, state) and lists.grads_present(grads)):
            check_grads(groups, grads)  # every check before any write (or any new state)
            lists = self.lists = self._build(groups, state, grads, selection, schedules)
            checked = True
        elif not lists.kernel_checks and not lists.grads_match(grads):
            check_grads(groups, grads)  # raises, naming the offending gradient
            # the gradients match their parameters, which changed (device, dtype or size) since the
            # lists were built: build them anew (which checks the states made before)
            lists = self.lists = self._build(groups, state, grads, selection, schedules)
            checked = True
        kept = self.clip.snapshot() if self.clip is not None and lists.kernel_checks else None
        try:
            return self._apply(lists, groups, grads, schedules, grad_scale, found_inf)
        except RuntimeError:
            if kept is not None:  # the op refused after the clip ran: its window and norm as they were
                self.clip.restore(kept)
            # One device with a fused kernel: the op checked the gradients itself and wrote nothing.
            # Say what torch would say about a bad gradient; parameters moved to another device or
            # dtype since the lists were built get new lists; a gradient laid out unlike its
            # parameter is copied into its layout from now on; and the step is retried.
            if not lists.kernel_checks or checked:
                raise
            check_grads(groups, grads)
            if not retried and lists.params_changed():
                self.lists = None
                return self._lists_step(groups, state, selection, schedules, grad_scale, found_inf, True)
            if lists.relayout:
                raise
            lists.relayout = True
            lists.holder = None
            try:
                return self._apply(lists, groups, grads, schedules, grad_scale, found_inf)
            except RuntimeError:
                if kept is not None:
                    self.clip.restore(kept)
                raise

    def _build(self, groups, state, grads, selection, schedules) -> CachedLists:
        if any(g["fused"] for g in groups):  # torch's check and error, where torch makes it: new state
            for group, gl in zip(groups, grads):
                for p, g in zip(group["params"], gl):
                    if group["fused"] and g is not None and not state.get(p):
                        _fused_check(p)
        check_states(groups, state, grads, self.state_dtypes)
        # no parameter with a gradient (or none at all): the schedule still moves where it is
        backends = choose_backends(groups, selection, grads)
        idle = not backends
        backends = backends or {schedules.primary_device: TORCH}
        if not torch.compiler.is_compiling():  # addresses mean nothing to a trace
            check_disjoint(groups, grads, backends)
        schedules.use(backends)
        lists = CachedLists(groups, state, grads, backends, self.init_state, self.state_dtypes)
        lists.idle = idle
        # One device whose backend keeps a step holder: the lists are handed over once, and a step
        # passes only the schedule tensors (gradients are read in C++). Not for DTensor shards
        # (their local views are new tensors each time), gradients that need a copy into their
        # parameter's layout, or while torch.compile traces (the holder is opaque to it; the op
        # is not).
        make = next(iter(backends.values())).holder if lists.kernel_checks else None
        if make and self.skip_nonfinite and not make.scans_nonfinite:
            make = None  # the lists path's exact scan, then the op
        if make and any(s.remainders for s in lists.slots) and not make.takes_remainders:
            make = None  # remainders (master_weights="remainders") go through the op on the device holders
        if make and not (lists.relayout or lists.dtensor or torch.compiler.is_compiling()):
            (work,) = self._works(lists, groups, schedules).values()
            lists.holder = make(work)
        return lists

    def _apply(self, lists, groups, grads, schedules, grad_scale, found_inf) -> Tensor | None:
        works = self._works(lists, groups, schedules, grads)
        if self.clip is not None:
            grad_lists = {dev: [gr for g in w.groups for gr in g.grads] for dev, w in works.items()}
            found_inf, per = self.clip.prepare(
                grad_lists, lists.backends, schedules.primary_device, grad_scale, found_inf, lists.shard_group()
            )
            for dev, work in works.items():
                work.grad_scale, work.clip_coef = per[dev]
                work.found_inf = found_inf.to(dev, non_blocking=True)
                lists.backends[dev].step(work)
            return found_inf
        if self.skip_nonfinite:
            grad_lists = [[gr for g in w.groups for gr in g.grads] for w in works.values()]
            found_inf = nonfinite_flag(grad_lists, schedules.primary_device, found_inf)
        for dev, work in works.items():
            work.grad_scale, work.found_inf = amp_tensors(dev, grad_scale, found_inf)
            lists.backends[dev].step(work)
        return found_inf


def _fused_check(p: Tensor) -> None:
    """torch's own device/dtype check of ``fused=True`` (its error, at the first step, as torch)."""
    check = getattr(_torch_optimizer, "_device_dtype_check_for_fused", None)
    if check is not None:
        check(p)


# ------------------------------------------------------------------ pieces of a step
def group_work(group: dict, device: torch.device, rounding: float = 0.0) -> GroupWork:
    """A parameter group's hyperparameters, as the backends take them (no tensors yet)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):  # any shape with one element, as torch takes it
        lr = lr.reshape(()).to(device=device, dtype=torch.float64)
    beta1, beta2 = group["betas"]
    return GroupWork(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
        foreach=group["foreach"] is not False,
        rounding=rounding,
    )


def amp_tensors(dev: torch.device, grad_scale: Tensor | None, found_inf: Tensor | None):
    """GradScaler's tensors as the kernels take them on ``dev`` (float32, no sync)."""
    if grad_scale is not None:
        grad_scale = grad_scale.to(dev, torch.float32, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(dev, torch.float32, non_blocking=True)
    return grad_scale, found_inf


def nonfinite_flag(grad_lists: list[list[Tensor]], device: torch.device, found_inf: Tensor | None) -> Tensor:
    """found_inf, or 1.0 where any gradient holds a NaN or an Inf: exact, checked on the device, no
    sync, no copy (``backends.flag_nonfinite``). ``grad_lists``: the step's gradients, one list per
    device; the flag lives on ``device``. The CPU step holder's own scan says the same."""
    found = torch.zeros((), dtype=torch.float32, device=device) if found_inf is None else found_inf.reshape(())
    for grads in grad_lists:
        if grads:
            local_found = torch.zeros((), dtype=torch.float32, device=grads[0].device)
            local_found = flag_nonfinite(grads, local_found)
            found = torch.maximum(found, local_found.to(device, non_blocking=True))
    return found


def check_grads(groups: list[dict], grads: list[list[Tensor | None]]) -> None:
    """torch's errors for a gradient torch's AdamW refuses, and ours for one that does not match."""
    for group, gl in zip(groups, grads):
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
