"""Learning-rate schedules as tables of per-step multipliers.

A schedule is a function of the step index only. The optimizer multiplies each
group's peak ``lr`` by ``table[t]`` on the device, so every parameter group (for
example muP groups with different peak LRs) shares one schedule shape.

The convention, shared by every schedule here:

* Entry ``i`` (0-based) is the multiplier used by the ``(i+1)``-th call of
  ``optimizer.step()``; it is what ``LambdaLR(opt, lambda i: schedule.multiplier(i))``
  hands to the same call.
* Warmup of ``W`` steps (an int, or a float fraction of ``total_steps``):
  ``m_i = (i + 1) / W`` for ``i < W``, so no update is wasted at LR 0 and the
  last warmup step reaches the peak exactly.
* After warmup the progress is ``p = (i - W + 1) / (T - W)`` in ``(0, 1]``:
  linear ``m = 1 - (1 - d) p``, cosine ``m = d + (1 - d)(1 + cos(pi p)) / 2``.
  The last update (``i = T - 1``) uses exactly ``d = decay_to``: 0 for D2Z,
  0.1 for 10x.
* Past the end of the table the optimizer reuses the last multiplier.

The multipliers are computed in float64 by one vectorised function per schedule
(:meth:`Schedule.multipliers`); :meth:`Schedule.multiplier` and
:meth:`Schedule.table` both read it, so the host value and the device table
never disagree by more than the float32 rounding of the table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Schedule", "from_values", "get", "names"]

_WSD_SHAPES = ("linear", "1-sqrt", "cosine")
_F32_MAX = torch.finfo(torch.float32).max


# --------------------------------------------------------------------------- #
# argument checks (each error names the argument and what is allowed)
# --------------------------------------------------------------------------- #
def _check_total_steps(total_steps: Any, name: str) -> int:
    if total_steps is None:
        raise ValueError(
            f"total_steps is required for schedule {name!r}: pass the number of "
            "optimizer steps of the run (a positive int)"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps}")
    return int(total_steps)


def _steps_or_fraction(value: Any, total_steps: int, arg: str) -> int:
    """An int counts steps; a float in [0, 1] is a fraction of ``total_steps``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{arg} must be an int number of steps or a float fraction of total_steps, got {value!r}")
    if isinstance(value, numbers.Integral):
        steps = int(value)
    else:
        value = float(value)
        if not (0.0 <= value <= 1.0):
            raise ValueError(f"{arg} as a float is a fraction of total_steps and must be in [0, 1], got {value}")
        steps = round(value * total_steps)
    if steps < 0:
        raise ValueError(f"{arg} must be >= 0 steps, got {steps}")
    return steps


def _check_warmup(warmup: Any, total_steps: int) -> int:
    w = _steps_or_fraction(warmup, total_steps, "warmup")
    if w >= total_steps:
        raise ValueError(
            f"warmup must be shorter than total_steps: warmup={warmup!r} is {w} steps but total_steps={total_steps}"
        )
    return w


def _check_unit(value: Any, arg: str, *, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{arg} must be a float in [0, 1], got {value!r}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{arg} must be in {interval}, got {value!r}")
    return v


def _check_positive(value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{arg} must be a positive finite float, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{arg} must be a positive finite float, got {value!r}")
    return v


def _check_values(values: Any, arg: str = "schedule") -> torch.Tensor:
    """A custom table: 1-D, non-empty, finite, non-negative; returned as float64 CPU."""
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{arg} must be a 1-D sequence of non-negative finite multipliers: {e}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{arg} must be a non-empty 1-D sequence of multipliers, got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{arg} must hold non-negative finite multipliers; entry {i} is {t[i].item()!r}")
    big = t > _F32_MAX
    if bool(big.any()):
        i = int(big.nonzero()[0, 0])
        raise ValueError(
            f"{arg} must hold multipliers that are finite in float32 (the device table's dtype, at most "
            f"{_F32_MAX:.4g}); entry {i} is {t[i].item()!r}"
        )
    return t.contiguous()


# --------------------------------------------------------------------------- #
# the schedule object
# --------------------------------------------------------------------------- #
class Schedule:
    """A learning-rate multiplier schedule of ``total_steps`` entries.

    Build one with :func:`get` (by name) or :func:`from_values` (a table or a
    callable). ``name`` and ``params`` describe how it was made and are saved
    in the optimizer's ``state_dict``.

    Attributes:
        name: the registered name (``"linear-d2z"``, ``"custom"``, ...).
        total_steps: number of entries ``T``.
        warmup_steps: ``W``, the number of warmup entries.
        params: the keyword arguments that built it (for display and checkpoints).
    """

    def __init__(
        self,
        name: str,
        total_steps: int,
        warmup_steps: int,
        fn: Callable[[torch.Tensor], torch.Tensor],
        params: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.params = dict(params or {})
        self._fn = fn  # float64 index tensor (i >= W) -> float64 multipliers
        self._cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.total_steps

    def __getstate__(self) -> dict[str, Any]:
        # pickle / deepcopy (the building function is a closure): what get() built, its description
        # (rebuilt from it, no table carried); a table (from_values), its values; any other, its
        # multipliers
        if getattr(self, "_by_name", False) or "values" in self.params:
            return {**self.__dict__, "_cache": None, "_fn": None}
        return {**self.__dict__, "_cache": self.multipliers(), "_fn": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._cache is not None:
            table = self._cache
        elif getattr(self, "_by_name", False):
            self._fn = _BUILDERS[self.name](self.total_steps, self.warmup_steps, **self.params)[0]
            return
        else:
            table = self.params["values"]
        self._fn = lambda i: table[i.long()]

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items() if k != "values")
        return f"Schedule({self.name!r}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}{extra})"

    def multipliers(self) -> torch.Tensor:
        """All ``T`` multipliers as a float64 CPU tensor (computed once, cached)."""
        if self._cache is None:
            try:
                i = torch.arange(self.total_steps, dtype=torch.float64)
                out = torch.empty_like(i)
            except (RuntimeError, MemoryError):  # the allocator refused: say which argument
                gb = self.total_steps * 16 / 1e9
                raise ValueError(
                    f"total_steps={self.total_steps} is too large to tabulate: its multipliers need about "
                    f"{gb:.3g} GB of float64 to compute (and the device table 4 bytes per step)"
                ) from None
            w = self.warmup_steps
            out[:w] = (i[:w] + 1.0) / w if w else i[:0]
            out[w:] = self._fn(i[w:])
            self._cache = out
        return self._cache

    def multiplier(self, i: int) -> float:
        """The float64 multiplier of step ``i``; past the end, the last one."""
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"step index must be a non-negative int, got {i!r}")
        return float(self.multipliers()[min(int(i), self.total_steps - 1)])

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The multipliers as a float32 tensor of length ``total_steps`` on ``device``."""
        return self.multipliers().to(dtype=torch.float32).to(device=device)


# --------------------------------------------------------------------------- #
# decay shapes after warmup: each maps float64 indices i >= W to multipliers
# --------------------------------------------------------------------------- #
def _progress(i: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(i - start + 1) / length: in (0, 1] over the ``length`` steps after ``start``."""
    return (i - start + 1.0) / length


def _shape(kind: str, p: torch.Tensor, d: float) -> torch.Tensor:
    if kind == "linear":
        return d + (1.0 - d) * (1.0 - p)  # == 1 - (1 - d) p, and exactly d at p = 1
    if kind == "cosine":
        return d + (1.0 - d) * (1.0 + torch.cos(math.pi * p)) / 2.0
    if kind == "1-sqrt":
        return d + (1.0 - d) * (1.0 - torch.sqrt(p))
    raise AssertionError(kind)


def _decay(kind: str, T: int, W: int, decay_to: float) -> Callable:
    return lambda i: _shape(kind, _progress(i, W, T - W), decay_to)


def _build_constant(T: int, W: int) -> tuple[Callable, dict]:
    return (lambda i: torch.ones_like(i)), {}


def _build_linear(T: int, W: int, decay_to: float = 0.0) -> tuple[Callable, dict]:
    d = _check_unit(decay_to, "decay_to")
    return _decay("linear", T, W, d), {"decay_to": d}


def _build_cosine(T: int, W: int, decay_to: float = 0.0) -> tuple[Callable, dict]:
    d = _check_unit(decay_to, "decay_to")
    return _decay("cosine", T, W, d), {"decay_to": d}


def _build_invsqrt(T: int, W: int) -> tuple[Callable, dict]:
    # Vaswani et al.: m = sqrt(W / (i + 1)) after warmup, continuous with its end
    # (the last warmup step, i = W - 1, has m = 1). With no warmup, 1/sqrt(i + 1).
    w = max(W, 1)
    return (lambda i: torch.sqrt(w / (i + 1.0))), {}


def _build_step(T: int, W: int, milestones: Sequence = (0.9,), gamma: float = 0.001) -> tuple[Callable, dict]:
    # Defaults from the paper's Step decay (Appendix B, Figure 18): after 90% of
    # training, drop to 0.1% of the peak. Multiplied by gamma once the step index
    # reaches each milestone, like torch's MultiStepLR under the LambdaLR convention.
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise ValueError(f"milestones must be a sequence of steps or fractions, got {milestones!r}")
    ms = [_steps_or_fraction(m, T, "milestones") for m in milestones]
    if any(m > T for m in ms):  # a milestone at T is allowed (a fraction may round to it): no effect
        raise ValueError(f"milestones must be <= total_steps={T}, got {ms}")
    if ms != sorted(ms):
        raise ValueError(f"milestones must be increasing, got {ms}")
    g = _check_positive(gamma, "gamma")
    bounds = torch.tensor(ms, dtype=torch.float64)

    def fn(i: torch.Tensor) -> torch.Tensor:
        n = torch.searchsorted(bounds, i, right=True).to(torch.float64)
        return torch.pow(torch.tensor(g, dtype=torch.float64), n)

    return fn, {"milestones": tuple(ms), "gamma": g}


def _build_wsd(
    T: int, W: int, cooldown: float = 0.2, shape: str = "linear", decay_to: float = 0.0
) -> tuple[Callable, dict]:
    if shape not in _WSD_SHAPES:
        raise ValueError(f"shape must be one of {list(_WSD_SHAPES)}, got {shape!r}")
    d = _check_unit(decay_to, "decay_to")
    c = _steps_or_fraction(cooldown, T, "cooldown")
    if c < 1 or c > T - W:
        raise ValueError(
            f"cooldown must be between 1 step and total_steps - warmup = {T - W} steps, got {cooldown!r} ({c} steps)"
        )
    start = T - c  # first cooldown step

    def fn(i: torch.Tensor) -> torch.Tensor:
        p = _progress(i, start, c).clamp(min=0.0)
        return torch.where(i < start, torch.ones_like(i), _shape(shape, p, d))

    return fn, {"cooldown": c, "shape": shape, "decay_to": d}


def _build_cyclic(T: int, W: int, period: float = 0.25, low: float = 0.1) -> tuple[Callable, dict]:
    # A triangular wave (Smith, 2017) that starts at the peak when warmup ends,
    # reaches `low` half a period later and returns to the peak each period.
    n = _steps_or_fraction(period, T, "period")
    if n < 2:
        raise ValueError(f"period must be at least 2 steps, got {period!r} ({n} steps)")
    lo = _check_unit(low, "low")

    def fn(i: torch.Tensor) -> torch.Tensor:
        phase = torch.remainder(i - W + 1.0, n) / n
        return lo + (1.0 - lo) * torch.abs(1.0 - 2.0 * phase)

    return fn, {"period": n, "low": lo}


def _build_rational(
    T: int, W: int, peak_lr: float | None = None, weight_decay: float | None = None
) -> tuple[Callable, dict]:
    # The paper's Eq. 7, eta_{i+1} = eta_i / (1 + eta_i * lambda), iterated from the
    # peak at the last warmup step: with a = peak_lr * weight_decay, its closed form
    # is m_i = 1 / (1 + a (i - k)), k = W - 1 (k = 0 without warmup, which starts at
    # the peak). alpha_i = a m_i then satisfies alpha_{i+1} = alpha_i / (1 + alpha_i),
    # which makes every dual coefficient after warmup equal (Eq. 6).
    if peak_lr is None or weight_decay is None:
        raise ValueError(
            "schedule 'rational' needs peak_lr and weight_decay (its decay rate is "
            "peak_lr * weight_decay, the paper's eta * lambda)"
        )
    a = _check_positive(peak_lr, "peak_lr") * _check_positive(weight_decay, "weight_decay")
    k = max(W - 1, 0)
    return (lambda i: 1.0 / (1.0 + a * (i - k))), {
        "peak_lr": float(peak_lr),
        "weight_decay": float(weight_decay),
    }


def _preset(builder: Callable, **fixed) -> Callable:
    def build(T: int, W: int, **params):
        clash = sorted(k for k in set(params) & set(fixed) if params[k] != fixed[k])
        if clash:
            raise ValueError(f"{clash[0]} is fixed by this schedule's name; use 'linear' or 'cosine'")
        return builder(T, W, **{**params, **fixed})

    return build


_BUILDERS: dict[str, Callable] = {
    "constant": _build_constant,
    "linear-d2z": _preset(_build_linear, decay_to=0.0),
    "linear-10x": _preset(_build_linear, decay_to=0.1),
    "cosine-d2z": _preset(_build_cosine, decay_to=0.0),
    "cosine-10x": _preset(_build_cosine, decay_to=0.1),
    "linear": _build_linear,
    "cosine": _build_cosine,
    "invsqrt": _build_invsqrt,
    "step": _build_step,
    "wsd": _build_wsd,
    "cyclic": _build_cyclic,
    "rational": _build_rational,
}


def names() -> list[str]:
    """Every schedule name :func:`get` accepts."""
    return [*_BUILDERS, "custom"]


def get(name: str, total_steps: int, *, warmup: int | float = 0.1, **params: Any) -> Schedule:
    """Build a named schedule.

    Args:
        name: one of :func:`names`.
        total_steps: ``T``, the number of ``optimizer.step()`` calls of the run.
        warmup: warmup steps (int) or fraction of ``total_steps`` (float); 10% by
            default, as in the paper. Ignored by ``custom`` tables, which carry their own.
        **params: the schedule's own parameters: ``decay_to`` (``linear``, ``cosine``,
            ``wsd``), ``milestones``/``gamma`` (``step``), ``cooldown``/``shape`` (``wsd``),
            ``period``/``low`` (``cyclic``), ``peak_lr``/``weight_decay`` (``rational``),
            ``values`` (``custom``: a sequence, or a callable of the step index).

    Raises:
        ValueError: an unknown name, a bad ``total_steps`` or ``warmup``, or a
            parameter out of range; the message names the argument.
    """
    if name == "custom":
        return _build_custom(total_steps, warmup, params)
    if name not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(names())}")
    T = _check_total_steps(total_steps, name)
    W = _check_warmup(warmup, T)
    try:
        fn, used = _BUILDERS[name](T, W, **params)
    except TypeError as e:  # an unexpected keyword
        raise ValueError(f"schedule {name!r}: {e}") from None
    sched = Schedule(name, T, W, fn, used)
    sched._by_name = True  # rebuilt from (name, total_steps, warmup_steps, params) when unpickled
    m = sched.multipliers()
    big = ~(m.abs() <= _F32_MAX)
    if bool(big.any()):
        i = int(big.nonzero()[0, 0])
        args = ", ".join(f"{k}={v!r}" for k, v in used.items()) or "its defaults"
        raise ValueError(
            f"schedule {name!r} with {args} has multiplier {m[i].item()!r} at step {i}, which is not finite "
            f"in float32 (the device table's dtype, at most {_F32_MAX:.4g})"
        )
    return sched


def _build_custom(total_steps: Any, warmup: Any, params: dict) -> Schedule:
    if set(params) != {"values"}:
        raise ValueError("schedule 'custom' takes exactly one parameter, values= (a sequence or a callable)")
    values = params["values"]
    if callable(values) and not isinstance(values, torch.Tensor):
        T = _check_total_steps(total_steps, "custom")
        values = [values(i) for i in range(T)]
    table = _check_values(values, "values")
    if total_steps is not None and _check_total_steps(total_steps, "custom") != table.numel():
        raise ValueError(f"total_steps={total_steps} does not match the custom table's length {table.numel()}")
    return from_values(table)


def from_values(values: Sequence[float] | torch.Tensor, name: str = "custom", *, arg: str = "schedule") -> Schedule:
    """A schedule from an explicit table of non-negative finite multipliers (an error names ``arg``)."""
    table = _check_values(values, arg)
    T = table.numel()
    return Schedule(name, T, 0, lambda i: table[i.long()], {"values": table})
