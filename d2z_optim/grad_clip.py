"""Clip-by-global-norm inside the step: the norm on the device, a coefficient for the kernels, the
skip decisions (non-finite norm, spike), no host sync.

Each step the gradients the step applies are reduced to one global norm on the device (per
device: the extension's or Triton's one-pass norm where the device's backend is a fused kernel,
torch's ``_foreach_norm`` for the torch backend, which then matches ``clip_grad_norm_`` bit for
bit; across devices and shards: the norm of the pieces, as ``clip_grad_norm_`` takes it; under
FSDP2 the squared norm, or the max, is all-reduced over the gradients' mesh). From it, in
``clip_grad_norm_``'s formula, ``coef = min(1, max_grad_norm / (norm + 1e-6))``, which the fused
kernels receive folded into their gradient divisor (``grad_scale / coef``) and the torch backend
multiplies into the gradients it reads (never into ``.grad``). A non-finite norm, or one that
spikes above the window's mean + sigma standard deviations, makes the step a no-op through the
same ``found_inf`` that AMP uses. The window records every finite norm of a step AMP did not
skip, spikes included (as OLMo-core's rolling statistic): a window of applied steps only would
never move after a lasting rise of the norm (the end of warmup, a data change), and every later
step would be skipped.

The decision math (:func:`finalize`) is here once for Python; the C++ and Triton norm kernels
return only the norm of their device.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .backends import Backend, device_norm

__all__ = ["NORM_TYPES", "SPIKE_DEFAULTS", "ClipSettings", "GradClip", "check_settings", "finalize"]

NORM_TYPES = (2.0, math.inf)
SPIKE_DEFAULTS = {"spike_window": 128, "spike_sigma": 6.0}  # OLMo-core's rolling window and factor
EPS = 1e-6  # clip_grad_norm_'s: coef = max_norm / (norm + 1e-6)


@dataclass(frozen=True)
class ClipSettings:
    """What the step does with the gradient norm (``max_grad_norm`` None: no clipping, but a norm is
    still computed for ``spike_skip``)."""

    max_grad_norm: float | None
    norm_type: float
    spike_skip: bool
    spike_window: int
    spike_sigma: float

    @property
    def active(self) -> bool:
        return self.max_grad_norm is not None or self.spike_skip


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_settings(
    max_grad_norm: Any, norm_type: Any, spike_skip: Any, spike_window: Any, spike_sigma: Any
) -> ClipSettings:
    """The settings, or ValueError naming the argument (nothing is stored before every check)."""
    if max_grad_norm is not None:
        if not _number(max_grad_norm) or math.isnan(max_grad_norm) or max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be None or a positive number, got {max_grad_norm!r}")
        max_grad_norm = float(max_grad_norm)
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        norm_type = math.inf
    if not _number(norm_type) or float(norm_type) not in NORM_TYPES:
        raise ValueError(f"norm_type must be 2.0 or inf (float('inf')), got {norm_type!r}")
    if not isinstance(spike_skip, bool):
        raise ValueError(f"spike_skip must be a bool, got {spike_skip!r}")
    if not isinstance(spike_window, int) or isinstance(spike_window, bool) or spike_window < 2:
        raise ValueError(f"spike_window must be an int >= 2 (steps whose norms are averaged), got {spike_window!r}")
    if not _number(spike_sigma) or not math.isfinite(spike_sigma) or spike_sigma <= 0:
        raise ValueError(f"spike_sigma must be a positive finite number, got {spike_sigma!r}")
    return ClipSettings(max_grad_norm, float(norm_type), spike_skip, int(spike_window), float(spike_sigma))


class GradClip:
    """An optimizer's clipping state on its primary device: the last step's norm and the spike
    window (the last ``spike_window`` applied steps' norms, a ring, and how many were recorded)."""

    def __init__(self, settings: ClipSettings) -> None:
        self.settings = settings
        self.grad_norm = torch.full((), math.nan, dtype=torch.float32)
        self.ring = torch.zeros(settings.spike_window, dtype=torch.float32)
        self.recorded = torch.zeros((), dtype=torch.int64)
        self._out: tuple[Tensor, Tensor] | None = None  # a fused clip's grad_scale_out, found_out

    def configure(self, settings: ClipSettings) -> None:
        """New settings between steps; a new window length keeps the most recent norms (in new
        tensors: a CUDA graph captured before must be captured again), another norm type empties
        the window (its norms measured something else)."""
        if settings.norm_type != self.settings.norm_type:
            self.recorded.zero_()
        if settings.spike_window != self.settings.spike_window:
            self.ring, self.recorded = _resized(self.ring, self.recorded, settings.spike_window)
        self.settings = settings

    def on(self, device: torch.device) -> None:
        """Keep the state on ``device`` (the primary one: where the decisions are taken)."""
        if self.grad_norm.device != device:
            self.grad_norm, self.ring, self.recorded = (
                t.to(device) for t in (self.grad_norm, self.ring, self.recorded)
            )

    def kernel_args(self, device: torch.device) -> tuple:
        """The clipping arguments of ``d2z::clip_grad_norm_`` after its AMP tensors (the step
        holders' clipped steps take the same): the state, two outputs kept across steps (a
        CUDA graph replays them), and the settings (max_norm -1: spike skip only)."""
        self.on(device)
        if self._out is None or self._out[0].device != device:
            self._out = (torch.ones((), dtype=torch.float32, device=device), torch.zeros((), device=device))
        s = self.settings
        max_norm = -1.0 if s.max_grad_norm is None else s.max_grad_norm
        return (
            self.ring,
            self.recorded,
            self.grad_norm,
            *self._out,
            max_norm,
            s.norm_type,
            s.spike_skip,
            s.spike_sigma,
        )

    @property
    def found_out(self) -> Tensor:
        """A fused clip's verdict of the last step (1: skipped)."""
        assert self._out is not None
        return self._out[1]

    def snapshot(self) -> tuple[Tensor, ...]:
        """What a step writes here, to put back when the step is refused after its clip ran."""
        return tuple(t.clone() for t in (self.ring, self.recorded, self.grad_norm))

    def restore(self, kept: tuple[Tensor, ...]) -> None:
        for t, old in zip((self.ring, self.recorded, self.grad_norm), kept):
            t.copy_(old)

    # -------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "spike_ring": self.ring.detach().clone(),
            "spike_recorded": self.recorded.detach().clone(),
            "grad_norm": self.grad_norm.detach().clone(),
        }

    @staticmethod
    def check_state(saved: Any) -> None:
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise ValueError(f"the state_dict's d2z['clip'] entry must be a dict, got {type(saved).__name__}")
        ring, recorded = saved.get("spike_ring"), saved.get("spike_recorded")
        if not (isinstance(ring, Tensor) and ring.dim() == 1 and ring.numel() >= 2 and ring.is_floating_point()):
            raise ValueError(f"d2z['clip']['spike_ring'] must be a 1-D float tensor of >= 2 norms, got {ring!r}")
        if not (isinstance(recorded, Tensor) and recorded.numel() == 1 and not recorded.is_floating_point()):
            raise ValueError(f"d2z['clip']['spike_recorded'] must be an integer tensor, got {recorded!r}")
        if int(recorded) < 0:
            raise ValueError(f"d2z['clip']['spike_recorded'] must be >= 0, got {int(recorded)}")

    def load(self, saved: dict[str, Any] | None) -> None:
        """A checkpoint's window (a host read at load time); none: an empty window. Written into
        the tensors in place (a captured CUDA graph keeps reading them)."""
        if saved is None:
            self.ring.zero_()
            self.recorded.zero_()
            self.grad_norm.fill_(math.nan)
            return
        ring = saved["spike_ring"].detach().to("cpu", torch.float32)
        recorded = saved["spike_recorded"].detach().to("cpu", torch.int64).reshape(())
        ring, recorded = _resized(ring, recorded, self.settings.spike_window)
        self.ring.copy_(ring)
        self.recorded.copy_(recorded)
        norm = saved.get("grad_norm")
        if isinstance(norm, Tensor) and norm.numel() == 1:
            self.grad_norm.copy_(norm.detach().reshape(()))
        else:
            self.grad_norm.fill_(math.nan)

    # --------------------------------------------------------------------- step
    def prepare(
        self,
        grads: dict[torch.device, list[Tensor]],
        backends: dict[torch.device, Backend],
        primary: torch.device,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        shard_groups: list | None = None,
    ) -> tuple[Tensor, dict[torch.device, tuple[Tensor | None, Tensor | None]]]:
        """This step's norm and decisions. Returns ``found`` (float32 0-d on ``primary``: nonzero
        skips the step) and, per device, ``(grad_scale, clip_coef)`` for its backend: the fused
        kernels get the coefficient folded into their divisor, the torch backend both apart.
        ``shard_groups``: the process groups the gradients are sharded over (FSDP2), in turn."""
        s = self.settings
        if len(grads) == 1 and not shard_groups:  # one device: its backend's fused clip, where it has one
            ((dev, gl),) = grads.items()
            if backends[dev].clip is not None:
                amp = [
                    None if t is None else t.to(dev, torch.float32, non_blocking=True) for t in (grad_scale, found_inf)
                ]
                args = self.kernel_args(dev)
                backends[dev].clip(gl, *amp, *args)
                return self.found_out, {dev: (args[3], None)}
        self.on(primary)
        inv = None if grad_scale is None else _to(grad_scale, primary).double().reciprocal().to(torch.float32)
        pieces = []
        for dev, gl in grads.items():
            inv_here = None if inv is None else _to(inv, dev)
            pieces += device_norm(backends[dev], gl, s.norm_type, inv_here)
        norm = _combine(pieces, s.norm_type, primary)
        for group in shard_groups or ():  # DTensor shards: each sharded mesh dimension in turn
            norm = _all_reduce(norm, s.norm_type, group)
        found, coef = finalize(norm, s, self.ring, self.recorded, found_inf)
        self.grad_norm.copy_(norm)
        out = {}
        for dev, b in backends.items():
            c = _to(coef, dev)
            if b.name == "torch":
                out[dev] = (None if grad_scale is None else _to(grad_scale, dev).float(), c)
            else:  # the kernels divide by grad_scale: g / (scale / coef) = g * coef / scale
                scale = c.reciprocal() if grad_scale is None else _to(grad_scale, dev).float() / c
                out[dev] = (scale, None)
        return found, out


def finalize(
    norm: Tensor, s: ClipSettings, ring: Tensor, recorded: Tensor, found_inf: Tensor | None
) -> tuple[Tensor, Tensor]:
    """From the global norm (float32 0-d): ``found`` (AMP's, or 1 for a non-finite norm or a spike)
    and ``coef``; the spike window records every finite norm of a step AMP did not skip (see the
    module docstring). In place on ``ring`` and ``recorded``, no sync. (csrc/kernels/clip_math.h
    and triton_kernels/clip.py say the same.)"""
    found = torch.zeros((), dtype=torch.float32, device=norm.device) if found_inf is None else found_inf
    amp = _to(found, norm.device).float().reshape(()) != 0
    finite = torch.isfinite(norm)
    skip = amp | ~finite
    if s.spike_skip:
        window = ring.numel()
        wide = ring.to(torch.float64)  # as the C++ finalize: the statistics in double
        mean = wide.mean()
        std = wide.std()  # Bessel-corrected, as torch.std (OLMo-core's rolling statistic)
        sigma = struct.unpack("f", struct.pack("f", s.spike_sigma))[0]  # float32, as the kernels take it
        spike = (recorded >= window) & (norm.to(torch.float64) > mean + sigma * std)
        skip = skip | spike
        record = finite & ~amp
        slot = torch.remainder(recorded, window).view(1)
        ring.index_copy_(0, slot, torch.where(record, norm, ring.index_select(0, slot).squeeze(0)).view(1))
        recorded.add_(record.to(torch.int64))
    if s.max_grad_norm is None:
        coef = torch.ones((), dtype=torch.float32, device=norm.device)
    else:
        coef = torch.clamp(s.max_grad_norm / (norm + EPS), max=1.0)
    return skip.to(torch.float32), coef


def _combine(pieces: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """The norm of the pieces' norms (``clip_grad_norm_``'s ``vector_norm(stack(norms))``)."""
    if not pieces:
        return torch.zeros((), dtype=torch.float32, device=device)
    if len(pieces) == 1:
        return _to(pieces[0], device).float().reshape(())
    stacked = torch.stack([_to(p, device).float().reshape(()) for p in pieces])
    return torch.linalg.vector_norm(stacked, norm_type)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``: without waiting, except into the CPU from a GPU (the CPU ops that read
    it next would not wait for the copy: a decision taken on the CPU for GPU gradients syncs)."""
    return t.to(device, non_blocking=not (device.type == "cpu" and t.device.type != "cpu"))


def _all_reduce(norm: Tensor, norm_type: float, group: Any) -> Tensor:
    """The norm over every rank's shard (FSDP2): the sum of squares, or the max, all-reduced."""
    import torch.distributed as dist

    if norm_type == math.inf:  # a NaN as +inf: gloo's MAX drops a NaN or keeps it by rank order
        total = torch.nan_to_num(norm, nan=math.inf)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    total = norm.to(torch.float64).square()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.sqrt().to(torch.float32)


def _resized(ring: Tensor, recorded: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """A window of another length holding the most recent norms, oldest first (a host read)."""
    old = ring.numel()
    if old == window:  # as saved: the next norm goes where it would have
        return ring.detach().clone(), recorded.detach().clone().reshape(())
    n = min(int(recorded), old, window)
    order = [(int(recorded) - n + i) % old for i in range(n)]
    new = torch.zeros(window, dtype=torch.float32, device=ring.device)
    if n:
        new[:n] = ring.detach().to(torch.float32)[torch.tensor(order, dtype=torch.long, device=ring.device)]
    # recorded counts norms pushed: n of them now sit at slots 0..n-1, the next goes to slot n
    return new, torch.tensor(n, dtype=torch.int64, device=recorded.device)
