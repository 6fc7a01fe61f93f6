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

- logs the LR each optimizer step applied, from the host (no device read; see
  :meth:`d2z_optim.AdamW.last_lr_host`), under the keys ``LearningRateMonitor`` gives the same
  optimizer: ``lr-AdamW``; ``lr-AdamW-1``, ``lr-AdamW-2``... for the second, third optimizer of
  the class; ``/pg1``, ``/pg2``... (or ``/{name}`` for a group with a ``"name"``) for several
  groups; see :meth:`D2ZCallback.lr_keys`. ``LearningRateMonitor`` itself logs
  ``param_groups[i]["lr"]``, which is the peak here. Rows go on Lightning's step axis (the
  index of the batch that stepped, as ``self.log``'s rows: with several optimizers one row
  holds them all) at steps 0, n, 2n... for n = ``log_every_n_steps`` (the callback's, else the
  Trainer's; ``0`` never logs, as in Lightning);
- makes ``gradient_clip_val`` (and ``self.clip_gradients`` in manual optimization) work under
  ``precision="bf16-mixed"`` and ``"16-mixed"``: Lightning refuses to clip for an optimizer
  that takes AMP's unscaling into its step (ours does: no sync), even where no GradScaler
  exists. With the callback, a d2z optimizer's gradients are unscaled by the GradScaler (when
  there is one, once, keyed on the optimizer the scaler steps, not Lightning's wrapper) and
  then clipped; the scaler still hands the step ``found_inf``, so an overflow is a no-op counted
  in ``skipped_steps``, without a sync. A batch whose ``training_step`` returns None is not
  unscaled (no step follows it, as in Lightning), so it leaves the scaler as it found it;
- moves ``gradient_clip_val`` (algorithm ``"norm"``) into every d2z optimizer that does not clip
  already, under one device or DDP (FSDP and DeepSpeed keep their own clipping): it sets the
  optimizer's ``max_grad_norm`` when training starts and Lightning's own clipping of that
  optimizer becomes a no-op, so the norm is taken on the device inside the step
  (one pass over the gradients instead of three, the true norm under AMP without unscaling, no
  sync) and logged as ``grad_norm-AdamW`` (the LR keys with ``grad_norm`` for ``lr``: one device
  read per logged row, as the loss's); ``.grad`` is no longer scaled in place.
  ``D2ZCallback(clip_inside=False)`` keeps Lightning's clipping (unscaled first, as below);
- checks the optimizer's ``total_steps`` against the trainer's when training starts, and says so
  when training ends before the schedule's last step.

Works with ``lightning.pytorch`` and ``pytorch_lightning``: the precision classes come from the
package of the Trainer the callback runs in; its base ``Callback`` from the package imported
(``lightning.pytorch`` when both or neither are). Imported only when :class:`D2ZCallback` is
first used.
"""

from __future__ import annotations

import functools
import importlib
import sys
import weakref
from collections import defaultdict
from typing import Any

from ..optimizer import AdamW
from .common import check_planned_steps, planned_steps, unwrap

__all__ = ["PACKAGES", "D2ZCallback", "lr_keys", "move_clipping", "package_of", "total_steps"]  # noqa: F822 (D2ZCallback: built on first use, by __getattr__)

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def total_steps(trainer: Any) -> int:
    """The run's optimizer steps, for ``AdamW(total_steps=...)`` in ``configure_optimizers``."""
    return planned_steps(trainer.estimated_stepping_batches, "the Lightning Trainer (estimated_stepping_batches)")


def __getattr__(name: str) -> Any:
    if name == "D2ZCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def package_of(obj: Any) -> str | None:
    """The Lightning package (one of :data:`PACKAGES`) ``obj``'s class, or the first class it
    derives from that is Lightning's, was defined in; None for none."""
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", None) or ""
        for root in PACKAGES:
            if module == root or module.startswith(root + "."):
                return root
    return None


@functools.cache
def _classes(root: str) -> tuple[type, type, type]:
    """``root``'s MixedPrecision, Precision and LightningOptimizer."""
    precision = importlib.import_module(root + ".plugins.precision")
    optimizer = importlib.import_module(root + ".core.optimizer")
    return precision.MixedPrecision, precision.Precision, optimizer.LightningOptimizer


def _install(plugin: Any, precision_cls: type, wrapper_cls: type) -> None:
    """Let a MixedPrecision plugin clip a d2z optimizer's gradients: unscale them first with its
    GradScaler, if any (the step then gets found_inf and grad_scale=None), then clip as the base
    Precision does. The unscale is keyed on the optimizer itself (what the plugin's
    ``scaler.step`` gets), never on a LightningOptimizer wrapping it, and is left out for a batch
    whose closure returned None in automatic optimization (no ``scaler.step``/``update`` follows
    to clear it): the plugin's ``optimizer_step`` is wrapped to see the closure's result. Other
    optimizers keep the plugin's own behaviour."""
    if plugin.__dict__.get("d2z_clips", False):
        return
    own_step, own_clip = plugin.optimizer_step, plugin.clip_gradients
    no_step = [False]  # the step in progress: its closure returned None (automatic optimization)

    def optimizer_step(optimizer: Any, model: Any = None, closure: Any = None, **kwargs: Any) -> Any:
        if plugin.scaler is None or unwrap(optimizer) is None:
            return own_step(optimizer, model=model, closure=closure, **kwargs)

        def seen() -> Any:
            result = closure()
            no_step[0] = result is None and getattr(model, "automatic_optimization", True)
            return result

        try:
            return own_step(optimizer, model=model, closure=seen, **kwargs)
        finally:
            no_step[0] = False

    def clip_gradients(optimizer: Any, clip_val: float = 0.0, *args: Any, **kwargs: Any) -> None:
        if unwrap(optimizer) is None:
            return own_clip(optimizer, clip_val, *args, **kwargs)
        if isinstance(optimizer, wrapper_cls):
            optimizer = optimizer._optimizer  # what scaler.step gets: unscale_ keys on id(optimizer)
        if clip_val and clip_val > 0 and plugin.scaler is not None and not no_step[0]:
            plugin.scaler.unscale_(optimizer)
        return precision_cls.clip_gradients(plugin, optimizer, clip_val, *args, **kwargs)

    plugin.optimizer_step = optimizer_step
    plugin.clip_gradients = clip_gradients
    plugin.d2z_clips = True


def _clip_inside(plugin: Any, optimizers: list[AdamW]) -> None:
    """The plugin's clipping is a no-op for ``optimizers`` (they clip inside their step)."""
    inside = plugin.__dict__.get("d2z_inside")
    if inside is None:
        inside = plugin.d2z_inside = weakref.WeakSet()
        own_clip = plugin.clip_gradients

        def clip_gradients(optimizer: Any, clip_val: float = 0.0, *args: Any, **kwargs: Any) -> None:
            if unwrap(optimizer) in inside:
                return None
            return own_clip(optimizer, clip_val, *args, **kwargs)

        plugin.clip_gradients = clip_gradients
    inside.update(optimizers)


def unsharded(strategy: Any) -> bool:
    """One device or DDP: every rank holds whole gradients (FSDP and DeepSpeed shard them as plain
    tensors, whose global norm needs the strategy's own clipping)."""
    names = [c.__name__ for c in type(strategy).__mro__]
    if any("FSDP" in n or "DeepSpeed" in n or "XLA" in n for n in names):
        return False
    return "SingleDeviceStrategy" in names or "DDPStrategy" in names


def move_clipping(trainer: Any, optimizers: list[AdamW]) -> list[AdamW]:
    """Give the Trainer's ``gradient_clip_val`` (algorithm ``"norm"``) to those of ``optimizers``
    that do not clip already (their ``max_grad_norm``), and make Lightning's own clipping of them a
    no-op. Returns the optimizers that clip inside their step now."""
    val, algo = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
    algo = str(getattr(algo, "value", algo) or "norm")
    if not val or algo != "norm" or not unsharded(trainer.strategy):
        return []
    moved = [opt for opt in optimizers if opt.max_grad_norm is None]
    for opt in moved:
        opt.max_grad_norm = float(val)
    if moved:
        _clip_inside(trainer.precision_plugin, moved)
    return moved


def lr_keys(trainer: Any) -> list[tuple[AdamW, list[str]]]:
    """Each d2z optimizer of ``trainer`` with the keys ``LearningRateMonitor`` logs its groups
    under: the same names, suffixes and counting (optimizers with a scheduler first, by the
    scheduler's ``name`` if it has one, then the others; ``-1``, ``-2``... for later optimizers
    of a class; ``/pg{i}`` or the group's ``"name"``)."""
    seen: list[Any] = []
    counts: defaultdict[type, int] = defaultdict(int)
    out: list[tuple[AdamW, list[str]]] = []

    def add(opt: Any, name: str, counted: bool) -> None:
        seen.append(opt)
        cls = type(opt)
        if counted:
            counts[cls] += 1
        if cls in counts and counts[cls] > 1:
            name += f"-{counts[cls] - 1}"
        groups = opt.param_groups
        if len(groups) > 1:
            keys = [f"{name}/{g.get('name', f'pg{i + 1}')}" for i, g in enumerate(groups)]
        else:
            keys = [f"{name}/{g['name']}" if g.get("name") else name for g in groups]
        d2z = unwrap(opt)
        if d2z is not None:
            out.append((d2z, keys))

    for config in getattr(trainer, "lr_scheduler_configs", None) or []:
        opt = config.scheduler.optimizer
        add(opt, config.name if config.name is not None else "lr-" + type(opt).__name__, config.name is None)
    for opt in trainer.optimizers:
        opt = opt.optimizer if hasattr(opt, "optimizer") else opt
        if any(opt is s for s in seen):
            continue
        add(opt, "lr-" + type(opt).__name__, True)
    return out


def _callback_base() -> type:
    """The ``Callback`` of the Lightning package imported (``lightning.pytorch`` first)."""
    for root in sorted(PACKAGES, key=lambda p: p not in sys.modules):
        try:
            return importlib.import_module(root).Callback
        except ImportError:
            continue
    raise ImportError(
        "d2z_optim.integrations.lightning.D2ZCallback needs Lightning: pip install lightning (or pytorch_lightning)"
    )


def _check_every(value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(
            f"D2ZCallback(log_every_n_steps={value!r}): pass None (the Trainer's log_every_n_steps) or an "
            "int >= 0 (0: never log, as Trainer(log_every_n_steps=0))"
        )


@functools.cache
def _callback_class() -> type:
    callback_cls = _callback_base()

    class D2ZCallback(callback_cls):
        """Logs the applied LR of every d2z optimizer; clipping under mixed precision; run-length
        checks (see :mod:`d2z_optim.integrations.lightning`)."""

        def __init__(self, log_every_n_steps: int | None = None, clip_inside: bool = True) -> None:
            _check_every(log_every_n_steps)
            if not isinstance(clip_inside, bool):
                raise ValueError(f"D2ZCallback(clip_inside=...) must be a bool, got {clip_inside!r}")
            super().__init__()
            self.log_every_n_steps = log_every_n_steps
            self.clip_inside = clip_inside
            self.stepped_at = -1  # trainer.global_step at the last batch that stepped

        @staticmethod
        def optimizers(trainer: Any) -> list[AdamW]:
            found = [unwrap(o) for o in trainer.optimizers]
            return [o for o in found if o is not None]

        lr_keys = staticmethod(lr_keys)

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            plugin = trainer.precision_plugin
            root = package_of(trainer) or package_of(plugin)  # the Trainer's own package
            if root is None:
                return
            mixed_cls, precision_cls, wrapper_cls = _classes(root)
            if isinstance(plugin, mixed_cls):
                _install(plugin, precision_cls, wrapper_cls)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if self.clip_inside:
                move_clipping(trainer, self.optimizers(trainer))
            self.stepped_at = trainer.global_step  # restored on resume: no row for the step saved
            planned = trainer.estimated_stepping_batches
            if planned != float("inf"):
                for opt in self.optimizers(trainer):
                    check_planned_steps(opt, int(planned), "the Lightning Trainer (estimated_stepping_batches)")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step  # optimizer steps taken: changes only in a batch that stepped
            if step == self.stepped_at:
                return
            self.stepped_at = step
            every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
            if not every or not trainer.loggers:  # 0: never, as Lightning's own logging
                return
            # the index of this batch among those that stepped: Lightning's step axis for the rows
            # of self.log and LearningRateMonitor (global_step counts each optimizer's steps)
            index = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", step - 1)
            if index % every:
                return
            metrics = {}
            for opt, keys in lr_keys(trainer):
                metrics.update(zip(keys, opt.last_lr_host()))
                if opt.grad_norm is not None:  # one device read per logged row, as the loss's
                    metrics[keys[0].split("/")[0].replace("lr-", "grad_norm-", 1)] = float(opt.grad_norm)
            if metrics:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=index)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            for opt in self.optimizers(trainer):
                opt.check_run_end()

    D2ZCallback.__module__ = __name__
    return D2ZCallback
