"""Checkpoints: what ``AdamW.state_dict()`` adds to torch's layout, and the checks and the
conversion of a loaded one (ours, or torch's AdamW's).

torch's layout is kept as is; our entry ``"d2z"`` (torch.optim ignores unknown top-level keys)
holds the schedule position and a description of the schedule. A torch state_dict has no such
entry: its position is the largest per-parameter ``step``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .device_schedule import ScheduleTables
from .schedules import Schedule

__all__ = ["SAVE_KEY", "check_loadable", "entry", "position_after_load"]

SAVE_KEY = "d2z"


def entry(tables: ScheduleTables, schedule: Schedule | None, weight_decay_mode: str) -> dict[str, Any]:
    """The ``"d2z"`` entry of a state_dict: the schedule position and description."""
    return {
        "step_count": tables.primary.step_count.detach().clone(),
        "total_steps": tables.total_steps,
        "schedule": None
        if schedule is None
        else {"name": schedule.name, **{k: v for k, v in schedule.params.items() if k != "values"}},
        "weight_decay_mode": weight_decay_mode,
    }


def check_loadable(param_groups: list[dict], state_dict: dict[str, Any]) -> None:
    """Groups, parameter counts, and each state tensor's shape and dtype against our parameters.
    Raises ValueError before anything changes."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"optimizer state_dict has no {key!r} entry")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(param_groups)}"
        )
    params = {}
    for gi, (g, sg) in enumerate(zip(param_groups, saved_groups)):
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


def convert_loaded(param_groups: list[dict], state: dict) -> None:
    """torch's load left groups and states as saved: a group's ``initial_lr`` (left by a torch LR
    scheduler) becomes its peak ``lr``, and each ``step`` moves to its parameter's device (torch
    keeps it on the CPU; ours lives with the parameter)."""
    for group in param_groups:
        if "initial_lr" in group:
            group["lr"] = group.pop("initial_lr")
        group["decoupled_weight_decay"] = True
        for p in group["params"]:
            st = state.get(p)
            if st and "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device).clone()


def position_after_load(saved: dict[str, Any] | None, state: dict, tables: ScheduleTables) -> Tensor:
    """The schedule position to continue at (host int64 0-d): the saved one, or for a torch
    state_dict the largest per-parameter ``step`` (a host read, once, at load time)."""
    if saved is not None:
        position = torch.as_tensor(saved["step_count"], dtype=torch.int64)
        if saved.get("total_steps", tables.total_steps) != tables.total_steps and not tables.unbounded:
            warnings.warn(
                f"d2z_optim.AdamW: the checkpoint's schedule has {saved['total_steps']} steps, this "
                f"optimizer's has {tables.total_steps}: training continues at step {int(position)} of "
                "this optimizer's schedule",
                stacklevel=3,
            )
        return position
    steps = [st["step"].to("cpu") for st in state.values() if "step" in st]
    return torch.stack(steps).max().to(torch.int64) if steps else torch.zeros((), dtype=torch.int64)
