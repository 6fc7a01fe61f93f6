"""Backends: the kernels that apply one AdamW step, chosen by name.

A backend updates every tensor of one device's step and advances that
device's ``step_count``. ``"torch"`` is always available and runs on any
device and dtype; the fused ones need their kernels built or installed, run on
one device type and take fp32/bf16/fp16 parameters. Naming one that cannot be
used says why and what can.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from . import cpp_backend, torch_backend
from .contract import DeviceWork, GroupWork, StepStatus, fills_block, in_layout_of

__all__ = [
    "NAMES",
    "Backend",
    "DeviceWork",
    "GroupWork",
    "Selection",
    "StepStatus",
    "available",
    "device_norm",
    "fills_block",
    "flag_nonfinite",
    "in_layout_of",
    "preload",
    "resolve",
]

NAMES = ("auto", "torch", "cpu", "cuda", "triton")
# what "auto" prefers, per device type, in order: on CUDA the Triton kernel when Triton is
# installed (the design's choice: readable and tunable, compiled for the GPU at hand), else
# the CUDA C++ kernel of a CUDA build
FUSED_FOR = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


@dataclass(frozen=True)
class Backend:
    name: str
    step: Callable[[DeviceWork], None]
    device_type: str | None = None  # None: any device
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any dtype
    any_layout: bool = False  # False: parameters must fill one block of memory (the fused kernels)
    device_note: str = ""  # added to the "runs on ..." refusal
    # a step kept across steps for a fixed set of tensors, where the backend has one:
    # DeviceWork -> a step holder (``step(work, skip_nonfinite) -> StepStatus``, ``captured()``,
    # ``scans_nonfinite``, ``takes_remainders``), like cpp_backend.CpuStepHolder
    holder: Callable[[DeviceWork], Any] | None = None
    # a GPU the kernel has no code for, or that the compiler does not support: the reason, else None
    gpu_refusal: Callable[[torch.device], str | None] | None = None
    # the one-pass global norm of a list of gradients (ord 2.0 or inf), a float32 0-d tensor on
    # their device, where the backend has one; None: torch's per-tensor norms (device_norm)
    norm: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None
    # the whole clip of one device's step in one call (``d2z::clip_grad_norm_``'s arguments:
    # grads, grad_scale, found_inf, then GradClip.kernel_args), where the backend has one
    clip: Callable[..., None] | None = None

    def unsupported(self, device: torch.device, dtypes: Iterable[torch.dtype], dense: bool = True) -> str | None:
        if self.device_type is not None and device.type != self.device_type:
            where = "CUDA devices" if self.device_type == "cuda" else f"{self.device_type.upper()} tensors"
            return f"backend {self.name!r} runs on {where}, but a parameter is on {device}{self.device_note}"
        if self.gpu_refusal is not None and device.type == "cuda":
            why = self.gpu_refusal(device)
            if why:
                return f"backend {self.name!r} cannot run on {device}: {why}"
        bad = sorted({str(d) for d in dtypes if self.dtypes is not None and d not in self.dtypes})
        if bad:
            allowed = ", ".join(str(d) for d in self.dtypes)
            return f"backend {self.name!r} takes parameters of dtype {allowed}, got {', '.join(bad)}"
        if not dense and not self.any_layout:
            return (
                f"backend {self.name!r} takes parameters whose elements fill one block of memory "
                "(contiguous, channels_last, ...), but a parameter is a strided view with gaps or overlaps"
            )
        return None


TORCH = Backend("torch", torch_backend.step, any_layout=True)


_LOADED: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend, or the reason it cannot be used (checked once per process: a plain dict, so a
    step under torch.compile reads the answer instead of tracing the extension's checks)."""
    found = _LOADED.get(name)
    if found is None:
        found = _LOADED[name] = _load_now(name)
    return found


def preload(device_types: Iterable[str] = ("cpu",)) -> None:
    """Answer now which backends can run on these device types (the optimizer asks at construction:
    its first step may be traced by torch.compile, on a device its parameters move to only then)."""
    _load("torch")
    for t in device_types:
        for n in FUSED_FOR.get(t, ()):
            _load(n)


def _load_now(name: str) -> Backend | str:
    if name == "torch":
        return TORCH
    if name in ("cpu", "cuda"):
        why = cpp_backend.load_extension()
        if why:
            return why
        key = name.upper()
        if not cpp_backend.has_kernel(key):
            return f"d2z_optim._C was built without a {key} kernel (a CPU-only build; see README: building for CUDA)"
        norm = cpp_backend.norm if cpp_backend.has_norm(key) else None
        clip = cpp_backend.clip if cpp_backend.has_clip(key) else None
        if name == "cpu":
            return Backend(
                name, cpp_backend.step, name, cpp_backend.DTYPES, holder=cpp_backend.CpuStepHolder, norm=norm,
                clip=clip,
            )  # fmt: skip
        return Backend(
            name, cpp_backend.step, name, cpp_backend.DTYPES, holder=cpp_backend.CudaStepHolder,
            gpu_refusal=cpp_backend.arch_refusal, norm=norm, clip=clip,
        )  # fmt: skip
    if name == "triton":  # imported here, on first use: a CPU install never needs Triton
        try:
            from . import triton_backend
        except Exception as e:  # not installed, or an install that cannot load
            return f"Triton is not installed or failed to import ({type(e).__name__}: {e}); pip install triton"
        # under TRITON_INTERPRET=1 (tests) the kernel runs on CPU tensors
        device = None if triton_backend.interpreting() else "cuda"
        note = " (TRITON_INTERPRET=1 runs Triton on CPU tensors, for tests only)"
        return Backend(
            "triton", triton_backend.step, device, triton_backend.DTYPES, device_note=note,
            holder=triton_backend.TritonStepHolder, gpu_refusal=_triton_gpu_refusal,
        )  # fmt: skip
    raise AssertionError(name)


TRITON_MIN_CAPABILITY = (8, 0)  # what Triton supports on NVIDIA GPUs (its README: compute capability 8.0+)


def _triton_gpu_refusal(device: torch.device) -> str | None:
    try:
        cap = tuple(torch.cuda.get_device_capability(device))
    except (AssertionError, RuntimeError) as e:  # no such device, or a torch without CUDA
        return f"cannot read the compute capability of {device} ({e})"
    if cap >= TRITON_MIN_CAPABILITY:
        return None
    need = ".".join(map(str, TRITON_MIN_CAPABILITY))
    return f"Triton supports compute capability {need} and later, and {device} has {cap[0]}.{cap[1]}"


def flag_nonfinite(grads: list[torch.Tensor], found: torch.Tensor) -> torch.Tensor:
    """``found`` (float32 0-d on the gradients' device), or 1 where an element of ``grads`` is a
    NaN or an Inf: exact (a finite 1e20 counts as finite), on the device, no sync, and no copy of
    the gradients (they may be bf16 of billions of elements). On the CPU the extension's bit scan
    (``d2z::any_nonfinite_``); elsewhere (or without the extension) torch's max-abs norm per tensor
    (``_foreach_norm`` with ord=inf: exact, fused on CUDA), which a NaN or an Inf makes non-finite."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return found
    if cpp_backend.has_scan(grads[0].device):
        out = found.clone()
        torch.ops.d2z.any_nonfinite_(grads, out)
        return out
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        norms = torch._foreach_norm(same, float("inf"))
        bad = ~torch.isfinite(torch.stack(norms)).all()
        found = torch.maximum(found, bad.to(device=found.device, dtype=torch.float32, non_blocking=True))
    return found


def device_norm(backend: Backend, grads: list[torch.Tensor], norm_type: float, inv_scale: torch.Tensor | None):
    """The norm of one device's gradients (times ``inv_scale``, AMP's 1/scale, when given) as a list
    of pieces whose norm is the device's: one 0-d float32 tensor from a fused kernel's one-pass
    reduction, or, for the torch backend, torch's per-tensor ``_foreach_norm`` of each dtype (of
    the unscaled gradients, as ``unscale_`` leaves them), which ``clip_grad_norm_`` combines."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return []
    if backend.norm is not None:
        out = backend.norm(grads, norm_type)
        return [out if inv_scale is None else out * inv_scale]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    pieces = []
    for same in by_dtype.values():
        if inv_scale is not None:
            same = torch._foreach_mul(same, inv_scale)
        pieces += torch._foreach_norm(same, norm_type)
    return pieces


def available() -> dict[str, str | None]:
    """Each concrete backend name mapped to ``None`` if usable, else the reason it is not."""
    return {n: (None if isinstance(_load(n), Backend) else _load(n)) for n in NAMES[1:]}


class Selection:
    """The backend for each device: one named backend, or the fastest usable one ("auto")."""

    def __init__(self, name: str, fused: bool | None) -> None:
        self.name, self.fused = name, fused
        # choices made, by (device, dtypes, dense): a step under torch.compile finds the choice the
        # optimizer made eagerly (add_param_group) instead of tracing the extension's checks
        self._memo: dict[tuple, Backend] = {}

    def __getstate__(self) -> dict:
        return {"name": self.name, "fused": self.fused, "_memo": {}}

    def for_device(self, device: torch.device, dtypes: Iterable[torch.dtype], dense: bool = True) -> Backend:
        """``dense``: every parameter fills one block of memory (see ``contract.fills_block``)."""
        key = (device, frozenset(dtypes), dense)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._choose(device, set(dtypes), dense)
        return found

    def _choose(self, device: torch.device, dtypes: set[torch.dtype], dense: bool) -> Backend:
        if self.name != "auto":
            b = _load(self.name)
            why = b.unsupported(device, dtypes, dense)
            if why:
                raise ValueError(f"{why}; use backend='auto' or 'torch' for such parameters")
            return b
        if self.fused is not False:
            for n in FUSED_FOR.get(device.type, ()):
                b = _load(n)
                if isinstance(b, Backend) and b.unsupported(device, dtypes, dense) is None:
                    return b
            if self.fused is None:
                _warn_missing(device)
        if self.fused:
            reasons = "; ".join(
                f"{n}: {b if isinstance(b, str) else b.unsupported(device, dtypes, dense)}"
                for n in FUSED_FOR.get(device.type, ("cpu",))
                for b in [_load(n)]
            )
            raise ValueError(
                f"fused=True needs a fused kernel backend for {device} parameters, but none fits ({reasons})"
            )
        return TORCH


_WARNED_MISSING: set[str] = set()


def _warn_missing(device: torch.device) -> None:
    """Once per device type: "auto" falls back to the torch backend because no fused kernel of this
    device type is installed (not because of the parameters' dtypes or layout)."""
    missing = [(n, _load(n)) for n in FUSED_FOR.get(device.type, ())]
    if device.type in _WARNED_MISSING or not missing or not all(isinstance(b, str) for _, b in missing):
        return
    _WARNED_MISSING.add(device.type)
    reasons = "; ".join(f"{n}: {why}" for n, why in missing)
    warnings.warn(
        f"d2z_optim: no fused kernel is installed for {device.type} parameters ({reasons}); backend='auto' "
        "runs the slower 'torch' backend. Reinstall with `pip install --no-build-isolation d2z_optim` "
        "(README: Install), or pass backend='torch' to choose it explicitly.",
        RuntimeWarning,
        stacklevel=2,
    )


def resolve(name: str, *, fused: bool | None = None) -> Selection:
    """Check ``backend`` (and torch's ``fused`` flag) and return the per-device selection.

    ``fused=True`` asks for a fused kernel; ``fused=False`` for the torch backend.
    Raises ``ValueError`` naming the backend, why it is unusable and what is available.
    """
    if name not in NAMES:
        raise ValueError(f"backend must be one of {list(NAMES)}, got {name!r}")
    # what a step may meet later: the CPU, and CUDA devices where torch has them
    preload(("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    if name != "auto":
        b = _load(name)
        if isinstance(b, str):
            usable = [n for n, why in available().items() if why is None]
            raise ValueError(f"backend {name!r} is not available: {b}; available backends: {usable}")
        if fused and name == "torch":
            raise ValueError("fused=True contradicts backend='torch' (the unfused reference backend)")
        if fused is False and name != "torch":
            raise ValueError(f"fused=False contradicts backend={name!r} (a fused kernel)")
    return Selection(name, fused)
