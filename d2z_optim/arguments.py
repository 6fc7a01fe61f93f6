"""The optimizer's arguments checked before anything is built or changed.

torch's own checks give torch's exact errors for every argument torch's AdamW has (run on each
parameter group's values, not only the defaults: the README promises that invalid settings always
raise); ours name the argument and what is allowed for the rest.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_index", "as_python_flags", "check_distinct", "check_flags", "check_group", "is_bool", "scalar_betas"]

FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")  # bool
OPTIONAL_FLAGS = ("foreach", "fused")  # bool or None


def is_bool(value: Any) -> bool:
    t = type(value)
    return isinstance(value, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))  # numpy too


def check_flags(values: dict[str, Any]) -> None:
    """``amsgrad``, ``maximize``, ... are bools (``amsgrad='yes'`` would otherwise fail only at step)."""
    for name in FLAGS:
        if name in values and not is_bool(values[name]):
            raise TypeError(f"{name} must be a bool, got {values[name]!r}")
    for name in OPTIONAL_FLAGS:
        if name in values and values[name] is not None and not is_bool(values[name]):
            raise TypeError(f"{name} must be a bool or None, got {values[name]!r}")


def check_group(group: dict[str, Any]) -> None:
    """One parameter group's settings (the defaults merged with its own), as the constructor
    checks them: our flag types, then torch's AdamW checks with torch's errors, then ours."""
    check_flags(group)
    torch.optim.AdamW(
        [torch.empty(0)],
        group["lr"],
        group["betas"],
        group["eps"],
        group["weight_decay"],
        group["amsgrad"],
        maximize=group["maximize"],
        foreach=group["foreach"],
        capturable=group["capturable"],
        differentiable=group["differentiable"],
        fused=group["fused"],
    )
    if group["differentiable"]:
        raise ValueError(
            "differentiable=True is not supported by d2z_optim.AdamW: its step is an in-place "
            "kernel that autograd cannot differentiate through; use torch.optim.AdamW"
        )


def as_python_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The flags as Python bools (a numpy bool passes the checks, but ``fused is False`` fails for it)."""
    out = dict(values)
    for name in (*FLAGS, *OPTIONAL_FLAGS):
        if name in out and out[name] is not None:
            out[name] = bool(out[name])
    return out


def scalar_betas(betas: Sequence[float | Tensor]) -> tuple[float, float]:
    """Tensor betas (torch allows them) as the floats the kernels take: read once, here."""
    return tuple(float(b) if isinstance(b, Tensor) else b for b in betas)


def check_distinct(params: list[Tensor], where: str) -> None:
    """A parameter listed twice would be updated twice per step (torch warns; this refuses)."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        j = seen.setdefault(id(p), i)
        if j != i:
            raise ValueError(
                f"{where} lists the same parameter twice (entries {j} and {i}): each parameter must appear "
                "once, or its update would be applied twice; remove the duplicate (e.g. tied weights: pass "
                "model.parameters(), which lists a shared parameter once)"
            )


def as_index(value: Any, arg: str) -> int:
    """An int argument: Python and numpy integers (``operator.index``); bool and float refused."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{arg} must be a positive int, got {value!r}") from None
