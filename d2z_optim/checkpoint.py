"""Checkpoints: what ``AdamW.state_dict()`` adds to torch's layout, and the checks and the
conversion of a loaded one (ours, or torch's AdamW's).

torch's layout is kept as is; our entry ``"d2z"`` (torch.optim ignores unknown top-level keys)
holds the schedule position, the count of skipped steps and a description of the schedule. A
torch state_dict has no such entry: its position is the largest per-parameter ``step``.

Loading is all or nothing: :func:`check_loadable` checks every part (torch's and ours) before
anything changes; the conversions after it cannot fail.

``initial_lr`` (left in a group by a torch LR scheduler), one rule: with ``schedule=None`` a
group's ``lr`` and ``initial_lr`` load exactly as torch loads them; into an optimizer with a
schedule, a torch checkpoint's ``initial_lr`` (the peak LR its scheduler started from) becomes
the group's peak ``lr`` and is removed. Our own checkpoints load as saved.

Moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are saved in their storage dtype (and
the entry's ``"state_dtypes"`` says which were asked for). A load converts each floating moment
into the dtype this optimizer stores it in (:mod:`d2z_optim.state_dtypes`), rounding to nearest
even: fp32 moments into an optimizer with bf16 ones and back, or a torch checkpoint. torch's AdamW
loads ours as it loads any floating state: cast to the parameter's dtype (exact from bf16/fp16
into fp32 parameters). A moment that is not floating, or complex for a real parameter, is refused.

A bf16 parameter's remainder (``master_weights="remainders"``: state ``"param_remainder"``, int16
of the parameter's shape) is saved as it is and loaded as it is into an optimizer that keeps one;
a checkpoint without one (fp32-free, or torch's) loads with a zero remainder (the master is the
saved bf16 value); an optimizer without remainders drops it, with a warning (the parameters keep
their bf16 values: the low bits of the masters are lost). torch's AdamW loads our checkpoint but
casts the remainder to the parameter's dtype as it casts any state of a floating parameter: an
unused entry there, which it does not read.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from .arguments import check_group
from .backends import fills_block
from .backends.contract import same_layout
from .device_schedule import ScheduleTables
from .schedules import Schedule
from .state_dtypes import AS_PARAMS, REMAINDER, StateDtypes

__all__ = [
    "GROUP_DEFAULTS",
    "SAVE_KEY",
    "check_loadable",
    "convert_loaded",
    "entry",
    "position_after_load",
    "put_moments",
    "take_moments",
]

SAVE_KEY = "d2z"
# torch's defaults for the flags a checkpoint of an older torch may lack (Adam.__setstate__)
GROUP_DEFAULTS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}
_TENSOR_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _describe(schedule: Schedule | None) -> dict[str, Any] | None:
    if schedule is None:
        return None
    params = {k: v for k, v in schedule.params.items() if k != "values"}
    return {"name": schedule.name, "warmup_steps": schedule.warmup_steps, **params}


def entry(tables: ScheduleTables, weight_decay_mode: str) -> dict[str, Any]:
    """The ``"d2z"`` entry of a state_dict: the schedule position and description."""
    return {
        "step_count": tables.primary.step_count.detach().clone(),
        "skipped_steps": tables.primary.skipped_steps.detach().clone(),
        "total_steps": tables.total_steps,
        "schedule": _describe(tables.lr_sched),
        "wd_schedule": _describe(tables.wd_sched),
        "weight_decay_mode": weight_decay_mode,
    }


# ------------------------------------------------------------------------- checks
def _count(value: Any, what: str) -> int:
    """A non-negative integer count: a Python/numpy int or a one-element integral tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{what} must be an integer tensor with one element, got {value.dtype} {list(value.shape)}"
            )
        value = int(value.reshape(()).item())
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def _step_value(value: Any, what: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{what} must be a number or a one-element tensor, got shape {list(value.shape)}")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_entry(saved: Any) -> None:
    if not isinstance(saved, dict):
        raise ValueError(f"the state_dict's {SAVE_KEY!r} entry must be a dict, got {type(saved).__name__}")
    if "step_count" not in saved:
        raise ValueError(f"the state_dict's {SAVE_KEY!r} entry has no 'step_count'")
    _count(saved["step_count"], f"{SAVE_KEY}['step_count']")
    if "skipped_steps" in saved:
        _count(saved["skipped_steps"], f"{SAVE_KEY}['skipped_steps']")
    if "total_steps" in saved and (_count(saved["total_steps"], f"{SAVE_KEY}['total_steps']") == 0):
        raise ValueError(f"{SAVE_KEY}['total_steps'] must be positive, got 0")
    for key in ("schedule", "wd_schedule"):
        desc = saved.get(key)
        if desc is not None and not (isinstance(desc, dict) and isinstance(desc.get("name"), str)):
            raise ValueError(f"{SAVE_KEY}[{key!r}] must be None or a dict with a 'name', got {desc!r}")
    mode = saved.get("weight_decay_mode", "coupled")
    if mode not in ("coupled", "independent"):
        raise ValueError(f"{SAVE_KEY}['weight_decay_mode'] must be 'coupled' or 'independent', got {mode!r}")


def _saved_params(param_groups: list[dict], state_dict: dict[str, Any]) -> dict[Any, Tensor]:
    """The saved parameter ids -> our parameters (groups already checked to match in length)."""
    params = {}
    for g, sg in zip(param_groups, state_dict["param_groups"]):
        params.update(zip(sg["params"], g["params"]))
    return params


def check_loadable(
    param_groups: list[dict], state_dict: dict[str, Any], saved: Any, dtypes: StateDtypes = AS_PARAMS
) -> None:
    """Everything a load would use, against our groups and parameters: groups and their settings,
    parameter counts, each state's step and tensors (shape, dtype, layout), and our ``"d2z"``
    entry. Raises ValueError before anything changes."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"optimizer state_dict has no {key!r} entry")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(param_groups)}"
        )
    for gi, (g, sg) in enumerate(zip(param_groups, saved_groups)):
        if not isinstance(sg, dict) or "params" not in sg:
            raise ValueError(f"parameter group {gi} of the loaded state dict is not a dict with 'params'")
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(
                f"parameter group {gi} of the loaded state dict has {len(sg['params'])} parameters, "
                f"this optimizer's has {len(g['params'])}"
            )
        merged = {**GROUP_DEFAULTS, **{k: v for k, v in g.items() if k != "params"}, **sg}
        try:
            check_group(merged)
        except (ValueError, TypeError) as e:
            raise ValueError(f"parameter group {gi} of the loaded state dict: {e}") from None
    params = _saved_params(param_groups, state_dict)
    for idx, st in state_dict["state"].items():
        p = params.get(idx)
        if p is None:
            raise ValueError(f"loaded state dict has state for parameter {idx!r}, which no group holds")
        if not isinstance(st, dict):
            raise ValueError(f"loaded state of parameter {idx} must be a dict, got {type(st).__name__}")
        for key, value in st.items():
            what = f"loaded state {key!r} of parameter {idx}"
            if key == "step":
                _step_value(value, what)
                continue
            if key in (*_TENSOR_STATES, REMAINDER) and not isinstance(value, Tensor):
                raise ValueError(f"{what} is {value!r}, not a tensor")
            if key == REMAINDER:
                if value.dtype != torch.int16 or value.shape != p.shape or value.layout != torch.strided:
                    raise ValueError(
                        f"{what} must be a dense int16 tensor of the parameter's shape {tuple(p.shape)}, "
                        f"got {value.layout} {value.dtype} {tuple(value.shape)}"
                    )
                continue
            if not isinstance(value, Tensor):
                continue
            if value.layout != torch.strided:
                raise ValueError(f"{what} is a {value.layout} tensor; states are dense (strided) tensors")
            if value.shape != p.shape:
                raise ValueError(f"{what} has shape {tuple(value.shape)}, the parameter has {tuple(p.shape)}")
            # torch casts a floating state to its floating parameter's dtype (this load casts a
            # moment to the dtype it is stored in); anything else must already be that dtype
            target = dtypes.of(key, p.dtype) if key in _TENSOR_STATES else p.dtype
            castable = p.is_floating_point() and value.is_floating_point()
            if value.dtype != target and not castable:
                raise ValueError(
                    f"{what} has dtype {value.dtype}, which cannot be converted to {target}, the dtype "
                    f"this optimizer stores it in for a {p.dtype} parameter"
                )
        if st and "step" not in st:
            raise ValueError(f"loaded state of parameter {idx} has no 'step'")
    if saved is not None:
        _check_entry(saved)


# --------------------------------------------------------------------- conversion
def take_moments(
    param_groups: list[dict], state_dict: dict[str, Any], dtypes: StateDtypes
) -> tuple[dict[str, Any], list[tuple[Tensor, str, Tensor]]]:
    """The moments stored in another dtype than their parameter's, taken out of (a copy of)
    ``state_dict`` before torch's load casts them to the parameter's dtype: (parameter, key, saved
    tensor) each, for :func:`put_moments`. Nothing is taken when no moment dtype was asked for."""
    if not dtypes.converts and not any(isinstance(st, dict) and REMAINDER in st for st in state_dict["state"].values()):
        return state_dict, []
    params = _saved_params(param_groups, state_dict)
    taken, state = [], {}
    for idx, st in state_dict["state"].items():
        p = params[idx]
        keep = dict(st)
        for key in _TENSOR_STATES:
            if isinstance(st.get(key), Tensor) and dtypes.of(key, p.dtype) != p.dtype:
                taken.append((p, key, keep.pop(key)))
        if REMAINDER in keep:  # never cast by torch's load
            taken.append((p, REMAINDER, keep.pop(REMAINDER)))
        state[idx] = keep
    return {**state_dict, "state": state}, taken


def put_moments(state: dict, taken: list[tuple[Tensor, str, Tensor]], dtypes: StateDtypes) -> None:
    """After torch's load: each taken moment converted (round to nearest even) into its storage
    dtype on its parameter's device, as torch's load puts a state (a copy only when either differs).
    A remainder goes back as it is where this optimizer keeps one for the parameter, else it is
    dropped, with a warning; a bf16 parameter's state saved without one gets a zero remainder."""
    dropped = 0
    for p, key, value in taken:
        if key != REMAINDER:
            state.setdefault(p, {})[key] = value.to(device=p.device, dtype=dtypes.of(key, p.dtype))
        elif dtypes.has_remainder(p.dtype):
            state.setdefault(p, {})[key] = value.to(device=p.device)
        else:
            dropped += 1
    # a bf16 parameter's state saved without a remainder (torch's AdamW, fp32 masters elsewhere):
    # its master is the saved bf16 value, exactly, so its remainder is zero
    for p, st in state.items():
        if st and dtypes.has_remainder(p.dtype) and REMAINDER not in st:
            st[REMAINDER] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)
    if dropped:
        warnings.warn(
            f"d2z_optim.AdamW: the checkpoint keeps {REMAINDER!r} for {dropped} parameter(s) (master_weights="
            "'remainders') and this optimizer does not: they continue from their bf16 values, and the low "
            "16 bits of their fp32 masters are dropped",
            stacklevel=3,
        )


def convert_loaded(param_groups: list[dict], state: dict, *, scheduled: bool, ours: Any) -> None:
    """After torch's load (which cannot fail once :func:`check_loadable` passed): the ``initial_lr``
    rule (module docstring); each ``step`` on its parameter's device as float32 (torch keeps it on
    the CPU; ours lives with the parameter); each state laid out as its parameter (the fused
    kernels walk them alike: a transposed or gapped one is copied into the parameter's layout)."""
    for group in param_groups:
        if scheduled and ours is None and "initial_lr" in group:
            group["lr"] = group.pop("initial_lr")
        for p in group["params"]:
            st = state.get(p)
            if not st:
                continue
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).to(p.device).clone()
            if not fills_block(p):
                continue
            for key in (*_TENSOR_STATES, REMAINDER):
                t = st.get(key)
                if isinstance(t, Tensor) and not (fills_block(t) and same_layout(t, p)):
                    st[key] = torch.empty_like(p, dtype=t.dtype, memory_format=torch.preserve_format).copy_(t)


def _differences(saved: dict[str, Any], tables: ScheduleTables, mode: str) -> list[str]:
    """What differs, each as "<the checkpoint's>, this optimizer's <ours>"."""
    out = []
    if saved.get("total_steps", tables.total_steps) != tables.total_steps:
        out.append(f"has {saved['total_steps']} steps, this optimizer's has {tables.total_steps}")
    for key, mine in (("schedule", _describe(tables.lr_sched)), ("wd_schedule", _describe(tables.wd_sched))):
        if key not in saved:
            continue
        theirs = saved[key]
        name = lambda d: None if d is None else d["name"]
        if name(theirs) != name(mine):
            out.append(f"{key} is {name(theirs)!r}, this optimizer's is {name(mine)!r}")
            continue
        for k in sorted(set(theirs or {}) - {"name"}):
            if theirs.get(k) != mine.get(k):
                out.append(f"{key} has {k}={theirs.get(k)!r}, this optimizer's has {mine.get(k)!r}")
    if saved.get("weight_decay_mode", mode) != mode:
        out.append(f"weight_decay_mode is {saved['weight_decay_mode']!r}, this optimizer's is {mode!r}")
    return out


def position_after_load(
    saved: dict[str, Any] | None, state: dict, tables: ScheduleTables, mode: str
) -> tuple[Tensor, Tensor | None]:
    """The schedule position to continue at and the skipped-step count (host int64 0-d): the
    saved ones, or for a torch state_dict the largest per-parameter ``step`` (a host read, once,
    at load time). A checkpoint saved with another schedule warns, naming what differs."""
    if saved is not None:
        position = torch.tensor(_count(saved["step_count"], "step_count"), dtype=torch.int64)
        skipped = saved.get("skipped_steps")
        skipped = None if skipped is None else torch.tensor(_count(skipped, "skipped_steps"), dtype=torch.int64)
        diffs = [] if tables.unbounded and saved.get("schedule") is None else _differences(saved, tables, mode)
        if diffs:
            warnings.warn(
                f"d2z_optim.AdamW: the checkpoint's schedule {'; '.join(diffs)}: training continues at step "
                f"{int(position)} of this optimizer's schedule",
                stacklevel=3,
            )
        return position, skipped
    steps = [st["step"].to("cpu") for st in state.values() if "step" in st]
    position = torch.stack(steps).max().to(torch.int64) if steps else torch.zeros((), dtype=torch.int64)
    return position, None
