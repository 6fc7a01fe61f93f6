"""HF transformers' ``Trainer`` with d2z's AdamW: one line.

>>> from d2z_optim.integrations.hf import use_d2z
>>> trainer = use_d2z(Trainer(model=model, args=args, train_dataset=ds))
>>> trainer.train()

The Trainer then builds :class:`d2z_optim.AdamW` itself, when it knows the run's length: its
parameter groups (weight decay on all but biases and norms, as Trainer groups them), peak LR
``args.learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``; the schedule from
``args.lr_scheduler_type`` (``linear``, Trainer's default, is linear decay to zero: D2Z;
``cosine``, ``constant``, ``constant_with_warmup``), over ``state.max_steps`` optimizer steps
(from ``max_steps`` or the epochs, after gradient accumulation) with ``args.warmup_steps`` (an
int, or a fraction of the run as Trainer rounds it: up). The LR schedule runs on the device;
Trainer's scheduler slot holds a view that steps nothing and reports the LR each step applied,
from the host (no device read; see :meth:`d2z_optim.AdamW.last_lr_host` for the skipped-step
caveat), which is what Trainer logs as ``learning_rate``. Checkpoints resume bitwise: the
schedule position is in ``optimizer.pt``. ``args.max_grad_norm`` (Trainer clips at 1.0 by
default) moves into the optimizer: its ``max_grad_norm``, with ``args.max_grad_norm`` set to 0 so
that Trainer does not clip too; the norm is taken on the device inside the step (one pass over
the gradients instead of three, the true norm under AMP, no sync) and logged as Trainer logs its
own, ``grad_norm``, with each row (one device read per row, as the loss's). ``.grad`` is no longer
scaled in place. ``max_grad_norm=None`` in use_d2z's keywords keeps Trainer's clipping instead,
as does a Trainer with FSDP or DeepSpeed (their gradients are shards that are not DTensors: the
global norm needs the engine's own clipping).

The schedule is sized for the run that builds the optimizer, so Trainer builds it inside
``train()`` (``create_optimizer()`` called before, with no ``total_steps=``, refuses and says
so; ``create_optimizer_and_scheduler(num_training_steps=n)`` sizes it for ``n``). A later run of
the same Trainer gets a new optimizer when its step count differs or the optimizer has stepped,
as Trainer gives every run a new scheduler: ``auto_find_batch_size`` retrying with a smaller
batch (more steps), another ``train()`` after changing ``max_steps`` or the epochs.

Keyword arguments of :func:`use_d2z` override what it reads from the Trainer (any
:class:`d2z_optim.AdamW` argument: ``schedule``, ``warmup``, ``backend``, ``total_steps``...;
with ``total_steps=`` every run keeps that length). transformers is imported by the Trainer you
pass, never by this module.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

from ..optimizer import AdamW
from .common import check_planned_steps, planned_steps, unwrap

__all__ = ["SCHEDULES", "ScheduleView", "optimizer_kwargs", "use_d2z"]

# Trainer's lr_scheduler_type -> the d2z schedule of the same shape (HF's linear and cosine decay to 0)
SCHEDULES = {"linear": "linear-d2z", "cosine": "cosine-d2z", "constant": "constant", "constant_with_warmup": "constant"}


class ScheduleView:
    """What Trainer keeps as its ``lr_scheduler``: ``step()`` does nothing (the optimizer moves
    its own position on the device), ``get_last_lr()`` is the LR each group applied in the last
    step, computed on the host (Trainer reads it after every step), and its state is empty (the
    position is saved with the optimizer; Trainer needs a scheduler file to resume at all)."""

    def __init__(self, optimizer: AdamW) -> None:
        self.optimizer = optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return self.optimizer.last_lr_host()

    def state_dict(self) -> dict[str, Any]:
        return {"d2z": "the schedule position is saved in the optimizer's state_dict"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def optimizer_kwargs(args: Any, total_steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """:class:`d2z_optim.AdamW`'s arguments from Trainer's ``TrainingArguments`` for a run of
    ``total_steps`` optimizer steps; ``overrides`` win."""
    kwargs: dict[str, Any] = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        total_steps=total_steps,
    )
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if "schedule" not in overrides:
        if kind not in SCHEDULES or getattr(args, "lr_scheduler_kwargs", None):
            raise ValueError(
                f"d2z_optim.integrations.hf: TrainingArguments(lr_scheduler_type={kind!r}"
                f"{', lr_scheduler_kwargs=...' if kind in SCHEDULES else ''}) has no d2z equivalent here "
                f"(known: {', '.join(SCHEDULES)}); pass schedule= to use_d2z (a d2z schedule name, a "
                "d2z_optim.schedules.Schedule, or a table of multipliers)"
            )
        kwargs["schedule"] = SCHEDULES[kind]
    kwargs.update(overrides)
    if isinstance(kwargs["schedule"], str) and "warmup" not in overrides:  # a table holds its own
        constant = kind == "constant" and "schedule" not in overrides  # HF's constant has no warmup
        kwargs["warmup"] = 0 if constant else int(args.get_warmup_steps(total_steps))
    return kwargs


def use_d2z(trainer: Any, **overrides: Any) -> Any:
    """Make ``trainer`` (a ``transformers.Trainer`` or subclass, before ``train()``) build and
    schedule :class:`d2z_optim.AdamW`; returns the trainer. Given ``optimizers=(d2z_opt, None)``
    it keeps that optimizer and only replaces Trainer's scheduler. Either way the optimizer's
    schedule length is checked against Trainer's when training begins, and a run that ends short
    of it says so when training ends.

    The optimizer it builds is sized for the run that creates it: a later run of the same Trainer
    (``auto_find_batch_size`` retrying with a smaller batch, another ``train()`` after changing
    ``max_steps`` or the epochs) gets a new one when the run's step count differs or the old one
    has stepped, as Trainer gives such a run a new scheduler (the new optimizer's moments start at
    zero; ``resume_from_checkpoint`` then loads them with the schedule position)."""
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError(
            "d2z_optim.integrations.hf.use_d2z builds the optimizer: pass its arguments to use_d2z, "
            "not Trainer(optimizer_cls_and_kwargs=...)"
        )
    given = getattr(trainer, "optimizer", None)
    if given is not None and unwrap(given) is None:
        raise TypeError(
            f"d2z_optim.integrations.hf.use_d2z: the Trainer was given a {type(given).__name__}, not a "
            "d2z_optim.AdamW: drop optimizers= (use_d2z builds one) or pass a d2z_optim.AdamW"
        )
    if getattr(trainer, "lr_scheduler", None) is not None:
        raise ValueError(
            "d2z_optim.integrations.hf.use_d2z replaces Trainer's LR scheduler (the schedule runs in "
            "the optimizer): pass optimizers=(optimizer, None)"
        )
    if given is not None and overrides:
        raise ValueError("use_d2z: keyword arguments build the optimizer; the Trainer already has one")
    if "total_steps" in overrides and overrides["total_steps"] is None:
        del overrides["total_steps"]  # None: the Trainer's count, as when left out
    clip = getattr(trainer.args, "max_grad_norm", None)
    # FSDP (1) and DeepSpeed shard gradients as plain tensors: the optimizer would see this rank's
    # shard only, and Trainer's clipping (through the model or engine) is the right one there
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if clip is not None and clip > 0 and not sharded:  # Trainer would clip: the optimizer does it instead
        ours = unwrap(given) if given is not None else None
        if given is None and "max_grad_norm" not in overrides:
            overrides["max_grad_norm"] = float(clip)
            trainer.args.max_grad_norm = 0.0
        elif ours is not None and ours.max_grad_norm is not None:  # it clips already: not twice
            trainer.args.max_grad_norm = 0.0
    # the class's (or a subclass's override), bound
    create_optimizer, create_both = trainer.create_optimizer, trainer.create_optimizer_and_scheduler
    built: list[weakref.ref] = []  # the AdamW this wrapper built last (rebuilt for a run it does not fit)
    asked: list[int] = []  # num_training_steps of a create_optimizer_and_scheduler call in progress

    def run_steps() -> int | None:
        """The optimizer steps of the run being set up; None outside one."""
        if "total_steps" in overrides:
            return overrides["total_steps"]
        if asked:
            return planned_steps(asked[-1], "create_optimizer_and_scheduler(num_training_steps=...)")
        if getattr(trainer, "is_in_train", False):
            return planned_steps(trainer.state.max_steps, "the Trainer (state.max_steps)")
        return None

    def build(model: Any, steps: int) -> Any:
        trainer.optimizer_cls_and_kwargs = (AdamW, optimizer_kwargs(trainer.args, steps, overrides))
        try:
            created = create_optimizer(model)
        finally:
            trainer.optimizer_cls_and_kwargs = None
        built[:] = [weakref.ref(unwrap(created))]
        return created

    @functools.wraps(create_optimizer)
    def create_d2z_optimizer(model: Any = None) -> Any:
        if trainer.optimizer is None:
            steps = run_steps()
            if steps is None:
                raise ValueError(
                    "d2z_optim.integrations.hf.use_d2z: create_optimizer() was called outside train(), where "
                    "the Trainer does not know the run's number of optimizer steps yet (it sets state.max_steps "
                    "when train() starts), so the schedule cannot be sized. Let train() create the optimizer, "
                    "call create_optimizer_and_scheduler(num_training_steps=...), or pass total_steps= (the "
                    "run's optimizer steps) to use_d2z. Nothing was changed."
                )
            return build(model, steps)
        ours = unwrap(trainer.optimizer)
        steps = run_steps() if ours is not None and built and built[0]() is ours else None
        # a run that this optimizer does not fit: another length, or it has stepped (a new run
        # starts its schedule at 0, as Trainer's new scheduler would). One read, at setup only.
        if steps is not None and (ours.total_steps != steps or int(ours.step_count) != 0):
            old = trainer.optimizer
            trainer.optimizer = None
            try:
                created = build(model, steps)
            except BaseException:
                trainer.optimizer = old
                raise
            with warnings.catch_warnings():  # the old one's run was superseded, not cut short
                warnings.simplefilter("ignore")
                ours.check_run_end()
            return created
        return create_optimizer(model)

    @functools.wraps(create_both)
    def create_d2z_optimizer_and_scheduler(num_training_steps: int) -> Any:
        asked.append(num_training_steps)
        try:
            return create_both(num_training_steps)
        finally:
            asked.pop()

    def create_d2z_scheduler(num_training_steps: int, optimizer: Any = None) -> ScheduleView:
        opt = unwrap(trainer.optimizer if optimizer is None else optimizer)
        current = trainer.lr_scheduler
        stale = isinstance(current, ScheduleView) and current.optimizer is not opt  # the optimizer was rebuilt
        if current is None or stale:
            if opt is None:
                raise TypeError("use_d2z: the Trainer's optimizer is not a d2z_optim.AdamW")
            trainer.lr_scheduler = ScheduleView(opt)
        return trainer.lr_scheduler

    own_log = trainer.log

    @functools.wraps(own_log)
    def log_with_grad_norm(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
        opt = unwrap(trainer.optimizer) if trainer.optimizer is not None else None
        if opt is not None and opt.grad_norm is not None and "loss" in logs and "grad_norm" not in logs:
            logs = {**logs, "grad_norm": float(opt.grad_norm)}  # where Trainer puts its own
        return own_log(logs, *args, **kwargs)

    trainer.log = log_with_grad_norm
    trainer.create_optimizer = create_d2z_optimizer
    trainer.create_optimizer_and_scheduler = create_d2z_optimizer_and_scheduler
    trainer.create_scheduler = create_d2z_scheduler
    trainer.add_callback(_callback_class()())
    return trainer


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback  # the caller's Trainer has imported it already

    class D2ZTrainerCallback(TrainerCallback):
        """Checks the schedule's length against Trainer's when training begins; says so when
        training ends before the schedule's last step."""

        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            opt = unwrap(optimizer)
            if opt is not None and state.max_steps > 0:
                check_planned_steps(opt, state.max_steps, "the Trainer (state.max_steps)")

        def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            opt = unwrap(optimizer)
            if opt is not None:
                opt.check_run_end()

    return D2ZTrainerCallback
