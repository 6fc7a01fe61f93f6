"""What the optimizer hands a backend for one step: plain lists, no torch.optim objects."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


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


# Columns of the per-group hyperparameter table the fused kernels read (float64 [G, 8]).
HP_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "unused")


@dataclass
class FlatWork:
    """A DeviceWork as the fused ops take it: one list per argument, the group of each tensor,
    and the groups' hyperparameters as a float64 [G, 8] device tensor (columns HP_COLUMNS)."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]  # empty when no group has amsgrad; else 0-element placeholders
    steps: list[Tensor]
    group_index: list[int]
    hparams: Tensor

    def op_args(self, work: DeviceWork, grad_scale: Tensor | None, found_inf: Tensor | None) -> tuple:
        """The arguments of ``d2z::adamw_step_`` and ``d2z::adamw_step_triton`` (one schema)."""
        lists = (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.steps)
        tables = (work.step_count, work.lr_table, work.wd_table, self.hparams)
        return (*lists, *tables, self.group_index, work.independent_wd, grad_scale, found_inf)


def flatten(work: DeviceWork) -> FlatWork:
    """The groups with tensors, concatenated (empty groups are dropped)."""
    groups = [g for g in work.groups if g.params]
    flat = FlatWork([], [], [], [], [], [], [], hparams(work))
    any_amsgrad = any(g.amsgrad for g in groups)
    for gi, g in enumerate(groups):
        flat.params += g.params
        flat.grads += g.grads
        flat.exp_avgs += g.exp_avgs
        flat.exp_avg_sqs += g.exp_avg_sqs
        flat.steps += g.steps
        flat.group_index += [gi] * len(g.params)
        if any_amsgrad:
            flat.max_exp_avg_sqs += g.max_exp_avg_sqs if g.amsgrad else [_placeholder(p) for p in g.params]
    return flat


def _placeholder(p: Tensor) -> Tensor:
    return torch.empty(0, dtype=p.dtype, device=p.device)


_HP_CACHE: dict[tuple, Tensor] = {}


def hparams(work: DeviceWork) -> Tensor:
    """The hyperparameters of ``work``'s groups with tensors (the rows group_index points at, as
    flatten() numbers them): float64 [G, 8] on the device, cached by value and rebuilt only when
    a value changes: one upload from pinned memory then, never a sync. A tensor LR is filled in
    on the device."""
    groups = [g for g in work.groups if g.params]
    device = work.step_count.device
    if not groups:
        return torch.zeros((1, len(HP_COLUMNS)), dtype=torch.float64, device=device)
    rows, tensor_lrs = [], []
    for gi, g in enumerate(groups):
        lr = g.lr
        if isinstance(lr, Tensor):
            tensor_lrs.append((gi, lr))
            lr = 0.0
        rows.append((float(lr), g.beta1, g.beta2, g.eps, g.weight_decay, float(g.amsgrad), float(g.maximize), 0.0))
    key = (device, tuple(rows))
    hp = _HP_CACHE.get(key)
    if hp is None:
        if len(_HP_CACHE) > 64:  # hyperparameters changed many times (a host LR schedule): drop stale ones
            _HP_CACHE.clear()
        host = torch.tensor(rows, dtype=torch.float64)
        if device.type == "cuda":
            host = host.pin_memory()  # a pageable upload would wait for the stream: a sync
        hp = host.to(device, non_blocking=True)
        _HP_CACHE[key] = hp
    if tensor_lrs:
        hp = hp.clone()
        for gi, lr in tensor_lrs:
            hp[gi, 0] = lr.reshape(()).to(hp.device, torch.float64)
    return hp


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
