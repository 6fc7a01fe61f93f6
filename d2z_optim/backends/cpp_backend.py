"""The C++/CUDA backends: one call of the fused op ``d2z::adamw_step_`` per device and step.

Torch glue only. The op (``csrc/``) updates every tensor of the call, reads
``lr_table[step_count]`` and ``wd_table[step_count]`` and advances
``step_count`` on the device. Here the optimizer's groups are flattened into
the op's lists, and the per-group hyperparameters into a small float64 tensor
``hparams [G, 8]`` that is cached on the device and rebuilt only when a value
changes (a host-to-device copy at that moment, never a sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._work import DeviceWork, GroupWork

HP_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "unused")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_LOADED = False


def load_extension() -> str | None:
    """Import ``d2z_optim._C`` (registers the ``d2z`` ops); the reason on failure."""
    global _LOADED
    if _LOADED:
        return None
    try:
        from .. import _C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension d2z_optim._C is not built or failed to import ({e})"
    _register_fake()
    _LOADED = True
    return None


def has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("d2z::adamw_step_", dispatch_key)


_HP_CACHE: dict[tuple, Tensor] = {}


def _hparams(groups: list[GroupWork], device: torch.device) -> Tensor:
    rows, tensor_lrs = [], []
    for gi, g in enumerate(groups):
        lr = g.lr
        if isinstance(lr, Tensor):  # a tensor LR stays on the device: filled in below
            tensor_lrs.append((gi, lr))
            lr = 0.0
        rows.append((float(lr), g.beta1, g.beta2, g.eps, g.weight_decay, float(g.amsgrad), float(g.maximize), 0.0))
    key = (device, tuple(rows))
    hp = _HP_CACHE.get(key)
    if hp is None:
        if len(_HP_CACHE) > 64:  # hyperparameters changed many times: drop stale entries
            _HP_CACHE.clear()
        hp = torch.tensor(rows, dtype=torch.float64).to(device, non_blocking=True)
        _HP_CACHE[key] = hp
    if tensor_lrs:
        hp = hp.clone()
        for gi, lr in tensor_lrs:
            hp[gi, 0] = lr.reshape(())
    return hp


def step(work: DeviceWork) -> None:
    """Flatten ``work`` into the op's lists and apply the whole step in one call."""
    groups = [g for g in work.groups if g.params]
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, group_index = [], [], [], [], [], [], []
    any_amsgrad = any(g.amsgrad for g in groups)
    for gi, g in enumerate(groups):
        params += g.params
        grads += g.grads
        exp_avgs += g.exp_avgs
        exp_avg_sqs += g.exp_avg_sqs
        steps += g.steps
        group_index += [gi] * len(g.params)
        if any_amsgrad:
            max_sqs += g.max_exp_avg_sqs if g.amsgrad else [_placeholder(p) for p in g.params]
    if not params:  # no gradients on this device: the schedule still moves (unless skipped)
        work.step_count.add_(1 if work.found_inf is None else (work.found_inf.reshape(()) == 0).to(torch.int64))
        return
    hp = _hparams(groups, params[0].device)
    torch.ops.d2z.adamw_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_sqs,
        steps,
        work.step_count,
        work.lr_table,
        work.wd_table,
        hp,
        group_index,
        work.independent_wd,
        work.grad_scale,
        work.found_inf,
    )


def _placeholder(p: Tensor) -> Tensor:
    return torch.empty(0, dtype=p.dtype, device=p.device)


def _register_fake() -> None:
    """The op's fake kernel, so torch.compile and FakeTensor tracing see a proper op."""

    @torch.library.register_fake("d2z::adamw_step_")
    def _(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        step_count,
        lr_table,
        wd_table,
        hparams,
        group_index,
        independent_wd,
        grad_scale,
        found_inf,
    ):
        return None
