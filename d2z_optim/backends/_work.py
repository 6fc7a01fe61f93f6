"""What the optimizer hands a backend for one step: plain lists, no torch.optim objects."""

from __future__ import annotations

from dataclasses import dataclass, field

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
