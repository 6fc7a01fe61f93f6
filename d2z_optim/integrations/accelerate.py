"""accelerate with d2z's AdamW: nothing to wrap, one count to get right.

>>> model, dl = accelerator.prepare(model, dl)
>>> opt = AdamW(model.parameters(), lr=3e-3, total_steps=total_steps(accelerator, dl, num_epochs))
>>> opt = accelerator.prepare(opt)
>>> for batch in dl:                      # inside accelerator.accumulate(model), as usual
...     accelerator.backward(loss(model, batch)); opt.step(); opt.zero_grad()

``prepare()`` keeps the optimizer's LR behaviour (its state_dict round trip keeps the schedule
position and the peak LR), and needs no scheduler: do not pass one (accelerate's
``AcceleratedScheduler`` steps a torch scheduler ``num_processes`` times per optimizer step).
``total_steps`` counts **optimizer steps per process**: the batches of the dataloader that
``prepare`` returned (this process's share) over gradient accumulation, times the epochs, which
is what :func:`total_steps` computes. Sizing the schedule by ``len(dataloader)`` before
``prepare`` (micro-batches, all processes) makes the run end before the schedule's last step;
the optimizer says so at exit.

AMP: with a GradScaler, an overflow step is a no-op inside the optimizer (no sync), counted on
the device in ``opt.skipped_steps``; accelerate's ``optimizer_step_was_skipped`` stays False for
d2z, as it does for torch's fused AdamW, since the optimizer, not the scaler, skips the step.
"""

from __future__ import annotations

import math
from typing import Any

from .common import planned_steps

__all__ = ["total_steps"]


def total_steps(accelerator: Any, dataloader: Any, num_epochs: int = 1) -> int:
    """Optimizer steps per process of ``num_epochs`` over ``dataloader`` (the one
    ``accelerator.prepare`` returned) with the accelerator's gradient accumulation."""
    from accelerate.data_loader import DataLoaderAdapter  # the caller's accelerator imported it

    if not isinstance(dataloader, DataLoaderAdapter):
        raise ValueError(
            "d2z_optim.integrations.accelerate.total_steps: pass the dataloader accelerator.prepare() "
            f"returned (its length is this process's batches), got a {type(dataloader).__name__}; "
            "or pass total_steps= (optimizer steps per process) to AdamW yourself"
        )
    try:
        batches = len(dataloader)
    except TypeError:
        batches = None
    steps = None if batches is None else math.ceil(batches / accelerator.gradient_accumulation_steps) * num_epochs
    return planned_steps(steps, "the prepared dataloader (len(dataloader): an iterable dataset has none)")
