"""The fused ops' argument checks in Python: every check before anything is written.

One layer for every op of the step schema: the Triton op runs it before its launches, and it is
the fake (meta) kernel of ``d2z::adamw_step_`` and ``d2z::adamw_step_triton``, so that
``torch.compile`` and FakeTensor tracing refuse what the kernels refuse. It reads metadata only
(dtypes, shapes, strides, devices: valid on fake tensors) and mirrors ``csrc/torch/adamw_checks.h``
(the C++ op's own checks, with the same words). A refusal raises :class:`StepArgumentError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .contract import HP_COLS, DeviceWork, fills_block, same_layout

__all__ = ["DTYPES", "StepArgumentError", "check_device_work", "check_step_args"]

# what the fused kernels take (gradients have their parameter's dtype, moments too or, for the
# first three, any of the first three: exp_avg_dtype; the math runs in float32 for the first three
# and in float64 for float64, as torch's fused)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LEAN = DTYPES[:3]


def moment_dtype_ok(param: torch.dtype, moment: torch.dtype) -> bool:
    """A moment's storage dtype: its parameter's, or for fp32/bf16/fp16 parameters any of those three."""
    return moment == param or (param in LEAN and moment in LEAN)


class StepArgumentError(RuntimeError):
    """A fused op refused its arguments (nothing was written). The message names the argument."""


class _Checker:
    def __init__(self, op: str) -> None:
        self.op = op

    def fail(self, msg: str):
        raise StepArgumentError(f"{self.op}: {msg}")

    def scalar(self, t: Tensor, dev: torch.device, dtype: torch.dtype, name: str) -> None:
        if not isinstance(t, Tensor) or t.layout != torch.strided:
            self.fail(f"{name} must be a dense tensor")
        if t.dtype != dtype:
            self.fail(f"{name} must be {dtype}, got {t.dtype}")
        if t.numel() != 1:
            self.fail(f"{name} must have one element, got {t.numel()}")
        if t.device != dev:
            self.fail(f"{name} is on {t.device} but the call is on {dev}")


def check_step_args(
    op: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    step_count: Tensor,
    lr_table: Tensor,
    wd_table: Tensor,
    hparams: Tensor,
    group_index: Sequence[int],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    remainders: Sequence[Tensor] | None = None,
) -> torch.device:
    """Every check of the step schema's arguments; returns the call's device."""
    c = _Checker(op)
    dev = step_count.device
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        if len(lst) != n:
            c.fail(f"{name} has {len(lst)} entries but params has {n}")
    if len(group_index) != n:
        c.fail(f"group_index has {len(group_index)} entries but params has {n}")
    if max_exp_avg_sqs and len(max_exp_avg_sqs) != n:
        c.fail(f"max_exp_avg_sqs has {len(max_exp_avg_sqs)} entries: it must be empty or as long as params ({n})")
    if remainders and len(remainders) != n:
        c.fail(f"remainders has {len(remainders)} entries: it must be empty or as long as params ({n})")
    c.scalar(step_count, dev, torch.int64, "step_count")
    for name, tab in (("lr_table", lr_table), ("wd_table", wd_table)):
        if tab.layout != torch.strided or tab.dim() != 1 or tab.dtype != torch.float32:
            c.fail(f"{name} must be a 1-D float32 tensor, got {tab.dtype} with {tab.dim()} dims")
        if tab.numel() == 0:
            c.fail(f"{name} is empty")
        if not tab.is_contiguous():
            c.fail(f"{name} must be contiguous")
        if tab.device != dev:
            c.fail(f"{name} is on {tab.device} but the call is on {dev}")
    if lr_table.numel() != wd_table.numel():
        c.fail(f"lr_table ({lr_table.numel()}) and wd_table ({wd_table.numel()}) must have the same length")
    if (
        hparams.layout != torch.strided
        or hparams.dtype != torch.float64
        or hparams.dim() != 2
        or hparams.shape[1] != HP_COLS
        or not hparams.is_contiguous()
    ):
        c.fail(f"hparams must be a contiguous float64 tensor [G, {HP_COLS}], got {hparams.dtype} {list(hparams.shape)}")
    if hparams.device != dev:
        c.fail(f"hparams is on {hparams.device} but the call is on {dev}")
    if grad_scale is not None:
        c.scalar(grad_scale, dev, torch.float32, "grad_scale")
    if found_inf is not None:
        c.scalar(found_inf, dev, torch.float32, "found_inf")
    groups = hparams.shape[0]
    for i in range(n):
        p = params[i]
        if not 0 <= group_index[i] < groups:
            c.fail(f"group_index[{i}] = {group_index[i]} is out of range for hparams with {groups} rows")
        if p.layout != torch.strided:
            c.fail(f"params[{i}] must be a dense tensor")
        if p.dtype not in DTYPES:
            c.fail(f"params[{i}] has dtype {p.dtype}; supported: float32, bfloat16, float16, float64")
        if p.device != dev:
            c.fail(f"params[{i}] is on {p.device} but the call is on {dev} (all tensors of one call on one device)")
        if not fills_block(p):
            c.fail(
                f"params[{i}] is not dense (strides {list(p.stride())}): its elements must fill one block "
                "of memory, as contiguous and channels_last tensors do"
            )
        same = [(grads[i], "grads"), (exp_avgs[i], "exp_avgs"), (exp_avg_sqs[i], "exp_avg_sqs")]
        if max_exp_avg_sqs and max_exp_avg_sqs[i].numel() != 0:
            same.append((max_exp_avg_sqs[i], "max_exp_avg_sqs"))
        for t, name in same:
            if t.layout != torch.strided:
                c.fail(f"{name}[{i}] is {t.layout}; only dense (strided) tensors are supported")
            if name == "grads" and t.dtype != p.dtype:
                c.fail(f"{name}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype}")
            if name == "max_exp_avg_sqs" and t.dtype != exp_avg_sqs[i].dtype:
                c.fail(f"{name}[{i}] has dtype {t.dtype} but exp_avg_sqs[{i}] has {exp_avg_sqs[i].dtype}")
            if name in ("exp_avgs", "exp_avg_sqs") and not moment_dtype_ok(p.dtype, t.dtype):
                c.fail(
                    f"{name}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype} (a moment is stored in its "
                    "parameter's dtype, or for float32/bfloat16/float16 parameters in one of those three)"
                )
            if t.shape != p.shape:
                c.fail(f"{name}[{i}] has shape {list(t.shape)} but params[{i}] has {list(p.shape)}")
            if t.device != dev:
                c.fail(f"{name}[{i}] is on {t.device} but the call is on {dev}")
            if not same_layout(t, p):
                c.fail(
                    f"{name}[{i}] has strides {list(t.stride())} but params[{i}] has {list(p.stride())} "
                    "(the tensors of a parameter must share its memory layout)"
                )
        if max_exp_avg_sqs:
            x = max_exp_avg_sqs[i]
            if x.layout != torch.strided or x.dtype != exp_avg_sqs[i].dtype:
                c.fail(
                    f"max_exp_avg_sqs[{i}] must be a dense {exp_avg_sqs[i].dtype} tensor, as exp_avg_sqs[i] "
                    "(a 0-element placeholder when its group has no amsgrad)"
                )
            if x.device != dev:
                c.fail(f"max_exp_avg_sqs[{i}] is on {x.device} but the call is on {dev}")
        if remainders:
            _check_remainder(c, i, p, remainders[i], dev)
        st = steps[i]
        if st.layout != torch.strided or st.dtype != torch.float32 or st.numel() != 1:
            c.fail(f"steps[{i}] must be a float32 tensor with one element")
        if st.device != dev:
            c.fail(f"steps[{i}] is on {st.device} but the call is on {dev}")
    return dev


def _check_remainder(c: _Checker, i: int, p: Tensor, r: Tensor, dev: torch.device) -> None:
    """Parameter i's entry of remainders: int16, 0 elements (none) or a bf16 parameter's shape and layout."""
    if not isinstance(r, Tensor) or r.layout != torch.strided or r.dtype != torch.int16:
        c.fail(f"remainders[{i}] must be a dense int16 tensor (0 elements: none)")
    if r.device != dev:
        c.fail(f"remainders[{i}] is on {r.device} but the call is on {dev}")
    if r.numel() == 0:
        return
    if p.dtype != torch.bfloat16:
        c.fail(
            f"remainders[{i}] is given but params[{i}] has dtype {p.dtype} (a remainder completes a bfloat16 parameter)"
        )
    if r.shape != p.shape:
        c.fail(f"remainders[{i}] has shape {list(r.shape)} but params[{i}] has {list(p.shape)}")
    if not same_layout(r, p):
        c.fail(
            f"remainders[{i}] has strides {list(r.stride())} but params[{i}] has {list(p.stride())} "
            "(the tensors of a parameter must share its memory layout)"
        )


def check_device_work(op: str, work: DeviceWork) -> None:
    """What the flat lists can no longer tell apart: each group's lists match its parameters."""
    c = _Checker(op)
    for gi, g in enumerate(work.groups):
        k = len(g.params)
        for name in ("grads", "exp_avgs", "exp_avg_sqs", "steps"):
            if len(getattr(g, name)) != k:
                c.fail(f"group {gi}: {name} has {len(getattr(g, name))} entries but params has {k}")
        if g.amsgrad and len(g.max_exp_avg_sqs) != k:
            c.fail(f"group {gi} has amsgrad=True but {len(g.max_exp_avg_sqs)} max_exp_avg_sqs for {k} params")
        if g.amsgrad:
            for j, (p, x) in enumerate(zip(g.params, g.max_exp_avg_sqs)):
                if x.numel() != p.numel():
                    c.fail(f"group {gi}: max_exp_avg_sqs[{j}] has {x.numel()} elements but its param {p.numel()}")
