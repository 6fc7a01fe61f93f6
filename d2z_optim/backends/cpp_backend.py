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

from ._work import DeviceWork, flatten

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


def step(work: DeviceWork) -> None:
    """Apply the whole step of ``work`` in one call of the op."""
    f = flatten(work)
    if not f.params:  # no gradients on this device: the schedule still moves (unless skipped)
        work.step_count.add_(1 if work.found_inf is None else (work.found_inf.reshape(()) == 0).to(torch.int64))
        return
    torch.ops.d2z.adamw_step_(*f.op_args(work, work.grad_scale, work.found_inf))


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
