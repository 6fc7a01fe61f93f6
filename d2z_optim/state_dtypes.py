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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AS_PARAMS", "LEAN_DTYPES", "MOMENTS", "StateDtypes", "check_rounding", "check_state_dtypes", "rounds_any"]

LEAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAMES = {str(d).removeprefix("torch."): d for d in LEAN_DTYPES}
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_FOLLOWS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "exp_avg_sq"}


@dataclass(frozen=True)
class StateDtypes:
    """The dtypes asked for (None: the parameter's)."""

    exp_avg: torch.dtype | None = None
    exp_avg_sq: torch.dtype | None = None

    def of(self, key: str, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype state ``key`` (a name of :data:`MOMENTS`) is stored in for a parameter of ``param_dtype``."""
        asked = getattr(self, _FOLLOWS[key])
        return param_dtype if asked is None or param_dtype not in LEAN_DTYPES else asked

    @property
    def lean(self) -> bool:
        """Some moment may be stored in another dtype than its parameter's."""
        return self.exp_avg is not None or self.exp_avg_sq is not None

    def describe(self) -> dict[str, str | None]:
        """For ``state_dict()``: the names of the dtypes asked for (None: the parameter's)."""
        name = lambda d: None if d is None else str(d).removeprefix("torch.")
        return {"exp_avg": name(self.exp_avg), "exp_avg_sq": name(self.exp_avg_sq)}


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
    """Some value a step writes is 16-bit: a bf16/fp16 parameter, or a moment asked in bf16/fp16 of
    an fp32/bf16/fp16 parameter (what stochastic rounding would round)."""
    lean = [d for d in (dtypes.exp_avg, dtypes.exp_avg_sq) if d is not None]
    return any(d in NARROW or (d in LEAN_DTYPES and any(x in NARROW for x in lean)) for d in param_dtypes)
