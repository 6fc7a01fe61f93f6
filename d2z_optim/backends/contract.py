"""The work contract between the optimizer and its backends: what one step hands a kernel.

Plain lists of tensors and numbers, no torch.optim objects:

* :class:`GroupWork`: one parameter group's tensors on one device and its hyperparameters;
* :class:`DeviceWork`: one device's step (its groups, the schedule tables and counter, AMP);
* :class:`FlatWork` / :func:`flatten`: a DeviceWork as the fused ops take it (one list per
  argument, the group of each tensor, the groups' hyperparameters as a float64 [G, HP_COLS]
  device tensor whose columns are :class:`HpCol`, mirrored from ``csrc``);
* :class:`StepStatus`: what a backend's step holder answers (mirrored from ``csrc``);
* the memory-layout helpers the fused kernels rely on (:func:`fills_block`, ...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "HP_COLS",
    "DeviceWork",
    "FlatWork",
    "GroupWork",
    "HpCol",
    "HparamsTable",
    "StepStatus",
    "capturing",
    "fills_block",
    "flatten",
    "hparams_tensor",
    "in_layout_of",
    "no_remainder",
    "same_layout",
]


class HpCol(enum.IntEnum):
    """Columns of the per-group hyperparameter table (``csrc/kernels/adamw_math.h``: ``enum HpCol``)."""

    LR = 0
    BETA1 = 1
    BETA2 = 2
    EPS = 3
    WEIGHT_DECAY = 4
    AMSGRAD = 5
    MAXIMIZE = 6
    ROUNDING = 7  # 0: to nearest even; seed + 1: stochastic (every 16-bit value the step writes)


HP_COLS = 8  # the table's width (``kHpCols``): the columns above and spare ones, zero
# plain ints for the step's own code (torch.compile cannot trace a list indexed by an IntEnum)
_LR, _BETA1, _BETA2, _EPS, _WD, _AMSGRAD, _MAXIMIZE, _ROUNDING = (int(c) for c in HpCol)


def capturing(device: torch.device) -> bool:
    """The current stream of ``device`` is capturing a CUDA graph (buffers a capture records must
    live, unchanged, as long as the graph can replay). Tests replace it to take that path here."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def step_device_holder(holder, refused: type[Exception], work: DeviceWork) -> tuple[StepStatus, torch.Tensor]:
    """One step of a C++ ``DeviceStepHolder`` (kind cuda or triton) on ``work``: its status (a
    ``refused`` exception, the op's checks refusing a tensor, is DECLINED) and the hparams table used."""
    hp = work.hparams if work.hparams is not None else hparams_tensor(work)
    try:
        status = holder.step(
            work.step_count, work.lr_table, work.wd_table, hp, work.independent_wd, work.grad_scale,
            work.found_inf, capturing(work.step_count.device),
        )  # fmt: skip
    except refused:
        return StepStatus.DECLINED, hp
    return StepStatus(status), hp


class StepStatus(enum.IntEnum):
    """What a step holder's ``step()`` answers (``csrc/torch/adamw_step_holder.h``)."""

    APPLIED = 0  # the step ran (or was a no-op for a nonzero found_inf)
    SKIPPED_NONFINITE = 1  # skip_nonfinite found a NaN or an Inf: a no-op
    DECLINED = 2  # the holder's tensors no longer match: nothing written, step through the op


@dataclass
class GroupWork:
    """The tensors of one parameter group on one device that have a gradient this step."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    foreach: bool = True
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)  # empty unless amsgrad
    steps: list[Tensor] = field(default_factory=list)  # float32 0-d, on the device
    rounding: float = 0.0  # 0: to nearest even; seed + 1: stochastic rounding with that seed
    # master_weights="remainders": one int16 tensor per parameter (a bf16 one's remainder, or 0
    # elements: none), or empty when no parameter of the group has one
    remainders: list[Tensor] = field(default_factory=list)

    def row(self) -> tuple[float, ...]:
        """This group's row of the hyperparameter table (a tensor LR: 0, filled in on the device)."""
        row = [0.0] * HP_COLS
        row[_LR] = 0.0 if isinstance(self.lr, Tensor) else float(self.lr)
        row[_BETA1], row[_BETA2] = self.beta1, self.beta2
        row[_EPS], row[_WD] = self.eps, self.weight_decay
        row[_AMSGRAD], row[_MAXIMIZE] = float(self.amsgrad), float(self.maximize)
        row[_ROUNDING] = float(self.rounding)
        return tuple(row)


@dataclass
class DeviceWork:
    """One step's work on one device: its groups, the schedule tables and the counter."""

    lr_table: Tensor  # float32 [T]
    wd_table: Tensor  # float32 [T]
    step_count: Tensor  # int64 0-d: steps applied so far, the table index
    independent_wd: bool
    groups: list[GroupWork] = field(default_factory=list)
    grad_scale: Tensor | None = None  # float32 0-d: grads are divided by it (AMP)
    found_inf: Tensor | None = None  # float32 0-d: nonzero makes the whole step a no-op
    # float32 0-d, the torch backend only: the unscaled gradients are multiplied by it (clipping by
    # the global norm, as clip_grad_norm_ scales .grad); the fused kernels get it folded into
    # grad_scale instead (grad_scale / clip_coef), by the step cache (grad_clip.py)
    clip_coef: Tensor | None = None
    hparams: Tensor | None = None  # the fused kernels' table of ``groups``, when its owner keeps one


@dataclass
class FlatWork:
    """A DeviceWork as the fused ops take it: one list per argument, the group of each tensor,
    and the groups' hyperparameters as a float64 [G, HP_COLS] device tensor (columns HpCol)."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty when no group has amsgrad; else 0-element placeholders
    steps: list[Tensor]
    group_index: list[int]
    hparams: Tensor
    remainders: list[Tensor] = field(default_factory=list)  # empty when none; else 0-element placeholders

    def op_args(self, work: DeviceWork, grad_scale: Tensor | None, found_inf: Tensor | None) -> tuple:
        """The arguments of ``d2z::adamw_step_`` and ``d2z::adamw_step_triton`` (one schema)."""
        lists = (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.steps)
        tables = (work.step_count, work.lr_table, work.wd_table, self.hparams)
        return (*lists, *tables, self.group_index, work.independent_wd, grad_scale, found_inf, self.remainders)


def flatten(work: DeviceWork) -> FlatWork:
    """The groups with tensors, concatenated (empty groups are dropped)."""
    groups = [g for g in work.groups if g.params]
    hp = work.hparams if work.hparams is not None else hparams_tensor(work)
    flat = FlatWork([], [], [], [], [], [], [], hp)
    any_amsgrad = any(g.amsgrad for g in groups)
    any_remainder = any(g.remainders for g in groups)
    for gi, g in enumerate(groups):
        flat.params += g.params
        flat.grads += g.grads
        flat.exp_avgs += g.exp_avgs
        flat.exp_avg_sqs += g.exp_avg_sqs
        flat.steps += g.steps
        flat.group_index += [gi] * len(g.params)
        if any_amsgrad:
            flat.max_exp_avg_sqs += g.max_exp_avg_sqs if g.amsgrad else [_placeholder(v) for v in g.exp_avg_sqs]
        if any_remainder:
            flat.remainders += g.remainders or [no_remainder(p) for p in g.params]
    return flat


def no_remainder(p: Tensor) -> Tensor:
    """A parameter without a remainder: 0 int16 elements (the ops' placeholder)."""
    return torch.empty(0, dtype=torch.int16, device=p.device)


def _placeholder(v: Tensor) -> Tensor:
    """No amsgrad state: 0 elements in exp_avg_sq's dtype (which max_exp_avg_sq would have)."""
    return torch.empty(0, dtype=v.dtype, device=v.device)


def _upload(rows: list[tuple[float, ...]], device: torch.device) -> Tensor:
    host = torch.tensor(rows, dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()  # a pageable upload would wait for the stream: a sync
    return host.to(device, non_blocking=True)


def _fill_tensor_lrs(hp: Tensor, groups: list[GroupWork]) -> Tensor:
    """A tensor LR is written into its row on the device (no host read)."""
    tensor_lrs = [(gi, g.lr) for gi, g in enumerate(groups) if isinstance(g.lr, Tensor)]
    if tensor_lrs:
        hp = hp.clone()
        for gi, lr in tensor_lrs:
            hp[gi, _LR] = lr.reshape(()).to(hp.device, torch.float64)
    return hp


def hparams_tensor(work: DeviceWork) -> Tensor:
    """The hyperparameters of ``work``'s groups with tensors (the rows group_index points at, as
    flatten() numbers them), uploaded now: float64 [G, HP_COLS] on the device."""
    groups = [g for g in work.groups if g.params]
    device = work.step_count.device
    if not groups:
        return torch.zeros((1, HP_COLS), dtype=torch.float64, device=device)
    return _fill_tensor_lrs(_upload([g.row() for g in groups], device), groups)


class HparamsTable:
    """The hyperparameter table of one device's groups, kept by its owner (the step cache) and
    rebuilt only when a value changes: one upload from pinned memory then, never a sync. A table a
    CUDA graph capture used is kept (``retained``) when a change replaces it, for as long as its
    owner lives; a table used on another stream than its own is recorded there."""

    def __init__(self) -> None:
        self._rows: tuple | None = None
        self._uploaded: Tensor | None = None
        self._captured = False
        self._streams: list = []
        self.retained: list[Tensor] = []

    def get(self, work: DeviceWork) -> Tensor:
        groups = [g for g in work.groups if g.params]
        if not groups:
            return hparams_tensor(work)
        dev = work.step_count.device
        rows = tuple(g.row() for g in groups)
        if rows != self._rows or self._uploaded is None or self._uploaded.device != dev:
            if self._captured:
                self.retained.append(self._uploaded)
            self._uploaded = _upload(list(rows), dev)
            self._rows, self._captured = rows, False
            self._streams = [torch.cuda.current_stream(dev)] if dev.type == "cuda" else []
        if dev.type == "cuda":
            stream = torch.cuda.current_stream(dev)
            if stream not in self._streams:
                self._uploaded.record_stream(stream)
                self._streams.append(stream)
        self._captured = self._captured or capturing(dev)
        return _fill_tensor_lrs(self._uploaded, groups)


# ---- memory layouts the fused kernels take: a parameter and its tensors walked as one flat block
def fills_block(t: Tensor) -> bool:
    """The elements fill one block of ``numel()`` elements from ``data_ptr()``: contiguous,
    channels_last, any dense permutation (no gaps, no overlap). All the fused kernels need."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= n
    return True


def same_layout(t: Tensor, p: Tensor) -> bool:
    """``t`` stores its elements in the order ``p`` does (strides of size-1 dims do not matter)."""
    if t.is_contiguous() and p.is_contiguous():
        return True
    return fills_block(t) and all(n == 1 or a == b for a, b, n in zip(t.stride(), p.stride(), p.shape))


def in_layout_of(grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """The gradients, each in its parameter's memory layout: a copy where it is not (e.g. a
    transposed or expanded gradient); the usual case costs one stride comparison per tensor."""
    if list(map(Tensor.stride, grads)) == list(map(Tensor.stride, params)):
        return grads
    return [g if same_layout(g, p) else torch.empty_like(p).copy_(g) for g, p in zip(grads, params)]
