"""Lightning with d2z's AdamW: the ``configure_optimizers`` recipe and one callback.

>>> from d2z_optim.integrations.lightning import D2ZCallback, total_steps
>>> class Model(L.LightningModule):
...     def configure_optimizers(self):
...         return AdamW(self.parameters(), lr=3e-3, weight_decay=0.1, total_steps=total_steps(self.trainer))
>>> L.Trainer(max_epochs=2, callbacks=[D2ZCallback()], precision="bf16-mixed", gradient_clip_val=1.0)

Return the optimizer alone (no ``lr_scheduler``: the schedule runs on the device).
:func:`total_steps` is ``trainer.estimated_stepping_batches`` (optimizer steps, after gradient
accumulation, capped by ``max_steps``), or an error naming ``total_steps=`` when the trainer
cannot know it. :class:`D2ZCallback`:

- logs the LR each optimizer step applied, under ``LearningRateMonitor``'s names
  (``lr-AdamW``, ``lr-AdamW/pg{i}`` for several groups), every ``log_every_n_steps`` steps, from
  the host (no device read; see :meth:`d2z_optim.AdamW.last_lr_host`). ``LearningRateMonitor``
  itself logs ``param_groups[i]["lr"]``, which is the peak here;
- makes ``gradient_clip_val`` work under ``precision="bf16-mixed"`` and ``"16-mixed"``:
  Lightning refuses to clip for an optimizer that takes AMP's unscaling into its step (ours does:
  no sync), even where no GradScaler exists. With the callback, a d2z optimizer's gradients are
  unscaled by the GradScaler (when there is one) and then clipped; the scaler still hands the
  step ``found_inf``, so an overflow is a no-op counted in ``skipped_steps``, without a sync;
- checks the optimizer's ``total_steps`` against the trainer's when training starts, and says so
  when training ends before the schedule's last step.

Works with ``lightning.pytorch`` (preferred when installed) or ``pytorch_lightning``; imported
only when :class:`D2ZCallback` is first used.
"""

from __future__ import annotations

import functools
from typing import Any

from .common import check_planned_steps, planned_steps, unwrap

__all__ = ["D2ZCallback", "total_steps"]  # noqa: F822 (D2ZCallback: built on first use, by __getattr__)


def total_steps(trainer: Any) -> int:
    """The run's optimizer steps, for ``AdamW(total_steps=...)`` in ``configure_optimizers``."""
    return planned_steps(trainer.estimated_stepping_batches, "the Lightning Trainer (estimated_stepping_batches)")


def __getattr__(name: str) -> Any:
    if name == "D2ZCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lightning() -> tuple[type, type, type]:
    try:
        from lightning.pytorch import Callback
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    except ImportError:
        from pytorch_lightning import Callback
        from pytorch_lightning.plugins.precision import MixedPrecision, Precision
    return Callback, MixedPrecision, Precision


def _clip_d2z_too(plugin: Any, precision_cls: type) -> None:
    """Let a MixedPrecision plugin clip a d2z optimizer's gradients: unscale them first with its
    GradScaler, if any (the step then gets found_inf and grad_scale=None), then clip as the base
    Precision does. Other optimizers keep the plugin's own behaviour."""
    if getattr(plugin, "d2z_clips", False):
        return
    own = plugin.clip_gradients

    def clip_gradients(optimizer: Any, clip_val: float = 0.0, *args: Any, **kwargs: Any) -> None:
        if clip_val and clip_val > 0 and unwrap(optimizer) is not None:
            if plugin.scaler is not None:
                plugin.scaler.unscale_(optimizer)
            return precision_cls.clip_gradients(plugin, optimizer, clip_val, *args, **kwargs)
        return own(optimizer, clip_val, *args, **kwargs)

    plugin.clip_gradients = clip_gradients
    plugin.d2z_clips = True


@functools.cache
def _callback_class() -> type:
    callback_cls, mixed_cls, precision_cls = _lightning()

    class D2ZCallback(callback_cls):
        """Logs the applied LR of every d2z optimizer; clipping under mixed precision; run-length
        checks (see :mod:`d2z_optim.integrations.lightning`)."""

        def __init__(self, log_every_n_steps: int | None = None) -> None:
            super().__init__()
            self.log_every_n_steps = log_every_n_steps
            self.logged_at = -1

        @staticmethod
        def optimizers(trainer: Any) -> list[Any]:
            found = [unwrap(o) for o in trainer.optimizers]
            return [o for o in found if o is not None]

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if isinstance(trainer.precision_plugin, mixed_cls):
                _clip_d2z_too(trainer.precision_plugin, precision_cls)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            planned = trainer.estimated_stepping_batches
            if planned != float("inf"):
                for opt in self.optimizers(trainer):
                    check_planned_steps(opt, int(planned), "the Lightning Trainer (estimated_stepping_batches)")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step  # optimizer steps taken: changes only when one ran
            every = self.log_every_n_steps or trainer.log_every_n_steps
            if step == self.logged_at or step == 0 or (step - 1) % every:
                return
            self.logged_at = step
            metrics = {}
            opts = self.optimizers(trainer)
            for k, opt in enumerate(opts):
                name = f"lr-{type(opt).__name__}" + (f"-{k}" if len(opts) > 1 else "")
                lrs = opt.last_lr_host()
                metrics.update({name: lrs[0]} if len(lrs) == 1 else {f"{name}/pg{i + 1}": v for i, v in enumerate(lrs)})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)  # the step's index, as LearningRateMonitor's rows

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            for opt in self.optimizers(trainer):
                opt.check_run_end()

    D2ZCallback.__module__ = __name__
    return D2ZCallback
