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

from ._work import DeviceWork, flatten, hparams

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


class CpuPlan:
    """The CPU step of a fixed set of tensors, kept in C++ across steps (``torch.classes.d2z.CpuPlan``).

    Handing the op its six lists costs more than the update itself for thousands of small
    tensors: every tensor crosses from Python and is unpacked each step (10,000 x 1,024 fp32: an
    ~18 ms call, of which the update is ~4.5 ms). A plan takes the lists once; each step it is
    handed the schedule tensors and hyperparameters only, reads the gradients from the
    parameters in C++, runs the op's checks and kernel (with skip_nonfinite, after a scan of
    every gradient for a NaN or an Inf: exact, and one read of the gradients).
    """

    APPLIED, SKIPPED_NONFINITE = 0, -1

    def __init__(self, work: DeviceWork) -> None:
        f = flatten(work)
        self._plan = torch.classes.d2z.CpuPlan(
            f.params, f.exp_avgs, f.exp_avg_sqs, f.max_exp_avg_sqs, f.steps, f.group_index
        )

    def step(self, work: DeviceWork, skip_nonfinite: bool = False) -> int:
        """Apply the step of ``work`` (its tensors must be the plan's, their gradients those the
        parameters hold now). Returns ``APPLIED`` (also when ``work.found_inf`` is nonzero: a
        no-op), ``SKIPPED_NONFINITE`` when ``skip_nonfinite`` found a NaN or an Inf in a gradient
        (a no-op too), or a positive number, with nothing written, when a parameter has no
        gradient or changed size. A bad tensor raises the op's error, also before any write."""
        return self._plan.step(
            work.step_count,
            work.lr_table,
            work.wd_table,
            hparams(work),
            work.independent_wd,
            work.grad_scale,
            work.found_inf,
            skip_nonfinite,
        )


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
