"""The storage dtypes of the optimizer's moments (``exp_avg_dtype``, ``exp_avg_sq_dtype``).

A moment is stored in the dtype asked for, or in its parameter's dtype when none is (torch's
behaviour). Every backend loads it into its compute registers (float32; float64 for float64
parameters) and rounds it to nearest even on the way back, so only the storage changes: 2 bytes
per moment and parameter instead of 4 for fp32 parameters with bf16/fp16 moments.

Rules, in one place (the optimizer, its step cache and the checkpoint code ask here):

* allowed: ``float32``, ``bfloat16``, ``float16`` (a ``torch.dtype`` or its name), or None;
* they apply to fp32, bf16 and fp16 parameters; float64 and complex parameters keep their
  moments in their own dtype (a documented no-op: 16-bit moments would undo what float64 is for);
* ``max_exp_avg_sq`` (amsgrad) is stored as ``exp_avg_sq`` is;
* ``stochastic_rounding``: every bfloat16/float16 value a step writes (parameters, moments) is
  rounded stochastically instead of to nearest even, with bits that depend on (``rounding_seed``,
  the schedule position, the tensor, the element) only (``backends/stochastic.py``); float32 and
  float64 values are written as they are (a no-op for them). Asked for where nothing is 16-bit
  (no such parameter, no such moment dtype), it is refused: it would round nothing.
* ``master_weights="remainders"``: each bfloat16 parameter keeps an int16 remainder (state
  ``param_remainder``) that with the parameter gives back its fp32 master value exactly
  (``backends/remainders.py``); the step computes from that value and writes both. Such a
  parameter's moments follow the master's dtype: float32 unless asked otherwise. It applies to
  bfloat16 parameters only (float32 and float64 ones are their own masters, a documented no-op; a
  float16 parameter is not the high half of a float32 and steps as without); asked for where no
  parameter is bfloat16, it is refused. With it, stochastic rounding rounds the 16-bit moments
  only: the parameter's bits come from the split, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "AS_PARAMS",
    "LEAN_DTYPES",
    "MOMENTS",
    "REMAINDER",
    "StateDtypes",
    "check_master_weights",
    "check_rounding",
    "check_state_dtypes",
    "rounds_any",
]

LEAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAMES = {str(d).removeprefix("torch."): d for d in LEAN_DTYPES}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_FOLLOWS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "exp_avg_sq"}
REMAINDER = "param_remainder"  # the state key of a bf16 parameter's remainder (int16, its shape)


@dataclass(frozen=True)
class StateDtypes:
    """The dtypes asked for (None: the parameter's)."""

    exp_avg: torch.dtype | None = None
    exp_avg_sq: torch.dtype | None = None
    remainders: bool = False  # master_weights="remainders"

    def has_remainder(self, param_dtype: torch.dtype) -> bool:
        """A parameter of ``param_dtype`` keeps a remainder (state :data:`REMAINDER`)."""
        return self.remainders and param_dtype == torch.bfloat16

    def of(self, key: str, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype state ``key`` (a name of :data:`MOMENTS`) is stored in for a parameter of ``param_dtype``."""
        asked = getattr(self, _FOLLOWS[key])
        own = torch.float32 if self.has_remainder(param_dtype) else param_dtype  # the master's dtype
        return own if asked is None or param_dtype not in LEAN_DTYPES else asked

    @property
    def converts(self) -> bool:
        """Some moment may be stored in another dtype than its parameter's (asked for, or the fp32
        moments beside a bf16 parameter's remainder): ``state_dict`` describes the dtypes and
        ``load_state_dict`` converts what it loads into them."""
        return self.exp_avg is not None or self.exp_avg_sq is not None or self.remainders

    def describe(self) -> dict[str, str | None]:
        """For ``state_dict()``: the names of the dtypes asked for (None: the parameter's)."""
        name = lambda d: None if d is None else str(d).removeprefix("torch.")
        out = {"exp_avg": name(self.exp_avg), "exp_avg_sq": name(self.exp_avg_sq)}
        return {**out, "master_weights": "remainders"} if self.remainders else out


AS_PARAMS = StateDtypes()  # every moment in its parameter's dtype (torch's behaviour, the default)


def _dtype(value: Any, arg: str) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _NAMES:
        return _NAMES[value]
    if isinstance(value, torch.dtype) and value in LEAN_DTYPES:
        return value
    raise ValueError(
        f"{arg} must be None (the parameter's dtype), torch.float32, torch.bfloat16 or torch.float16 "
        f"(or their names), got {value!r}"
    )


def check_state_dtypes(exp_avg_dtype: Any = None, exp_avg_sq_dtype: Any = None) -> StateDtypes:
    """The constructor's ``exp_avg_dtype`` / ``exp_avg_sq_dtype``, checked (ValueError naming the argument)."""
    return StateDtypes(_dtype(exp_avg_dtype, "exp_avg_dtype"), _dtype(exp_avg_sq_dtype, "exp_avg_sq_dtype"))


def check_master_weights(master_weights: Any, param_dtypes: list[torch.dtype]) -> bool:
    """The constructor's ``master_weights`` (None or ``"remainders"``), checked against the
    parameters (ValueError naming the argument): True for remainders."""
    if master_weights is None:
        return False
    if master_weights != "remainders":
        raise ValueError(f"master_weights must be None or 'remainders', got {master_weights!r}")
    if torch.bfloat16 not in param_dtypes:
        found = sorted({str(d).removeprefix("torch.") for d in param_dtypes}) or ["no parameters"]
        raise ValueError(
            "master_weights='remainders' keeps a remainder for bfloat16 parameters and there is none here "
            f"({', '.join(found)}): float32 parameters are their own master weights"
        )
    return True


NARROW = (torch.bfloat16, torch.float16)


def check_rounding(stochastic_rounding: Any, rounding_seed: Any) -> float:
    """The constructor's ``stochastic_rounding`` / ``rounding_seed``, checked (ValueError naming the
    argument), as the hparams column ROUNDING takes them: 0.0 (to nearest even) or seed + 1."""
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"stochastic_rounding must be a bool, got {stochastic_rounding!r}")
    if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int) or not 0 <= rounding_seed < 2**32:
        raise ValueError(f"rounding_seed must be an int in [0, 2**32), got {rounding_seed!r}")
    return float(rounding_seed + 1) if stochastic_rounding else 0.0


def rounds_any(param_dtypes: list[torch.dtype], dtypes: StateDtypes) -> bool:
    """Some value a step writes is 16-bit and rounded: a bf16/fp16 parameter (not one with a
    remainder: its bits are exact), or a moment stored in bf16/fp16 (what stochastic rounding rounds)."""
    return any(
        (d in NARROW and not dtypes.has_remainder(d)) or any(dtypes.of(k, d) in NARROW for k in MOMENTS[:2])
        for d in param_dtypes
    )
