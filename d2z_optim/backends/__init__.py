"""Backends: the kernels that apply one AdamW step, chosen by name.

Each backend is a module with ``name`` and ``step(work: DeviceWork) -> None``,
which updates every tensor of the step and advances ``work.step_count`` on the
device. ``"torch"`` is always available; the others need their kernels built
or installed, and naming one that is not says why.
"""

from __future__ import annotations

from types import ModuleType

from . import torch_backend
from ._work import DeviceWork, GroupWork

__all__ = ["NAMES", "DeviceWork", "GroupWork", "available", "resolve"]

NAMES = ("auto", "torch", "cpu", "cuda", "triton")
FUSED = ("cuda", "triton", "cpu")  # the order "auto" prefers them in

_NOT_BUILT = {
    "cpu": "the C++ CPU kernel (extension d2z_optim._C) is not part of this build",
    "cuda": "the CUDA kernel (extension d2z_optim._C) is not part of this build",
    "triton": "the Triton kernel is not part of this build",
}


def _load(name: str) -> ModuleType | str:
    """The backend module, or the reason it cannot be used."""
    if name == "torch":
        return torch_backend
    return _NOT_BUILT[name]


def available() -> dict[str, str | None]:
    """Each concrete backend name mapped to ``None`` if usable, else the reason it is not."""
    return {n: (None if isinstance(_load(n), ModuleType) else _load(n)) for n in NAMES[1:]}


def resolve(name: str, *, fused: bool | None = None) -> ModuleType:
    """The backend module for ``name`` (``"auto"`` picks the fastest usable one).

    ``fused=True`` (torch's flag) asks for a fused kernel; ``fused=False`` for the
    torch backend. Raises ``ValueError`` naming the backend, why it is unusable and
    what is available.
    """
    if name not in NAMES:
        raise ValueError(f"backend must be one of {list(NAMES)}, got {name!r}")
    usable = [n for n, why in available().items() if why is None]
    if name == "auto":
        fused_ok = [n for n in FUSED if n in usable]
        if fused is False or (not fused_ok and not fused):
            return torch_backend
        if not fused_ok:
            raise ValueError(
                "fused=True needs a fused kernel backend ('cuda', 'triton' or 'cpu'), but none is "
                f"available ({'; '.join(_NOT_BUILT[n] for n in FUSED)}); available backends: {usable}"
            )
        return _load(fused_ok[0])
    mod = _load(name)
    if isinstance(mod, str):
        raise ValueError(f"backend {name!r} is not available: {mod}; available backends: {usable}")
    if fused and name == "torch":
        raise ValueError("fused=True contradicts backend='torch' (the unfused reference backend)")
    return mod
