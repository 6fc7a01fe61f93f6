"""HF transformers' Trainer with d2z: ``use_d2z(Trainer(...))`` against the real package (issue 16).

A tiny GPT-2 built from a config (no download), random tokens, CPU. Checked step by step: the LR
each step applies equals the schedule (warmup, accumulation, epochs), the LR Trainer logs equals
the one applied, resume is bitwise, the naive setup (Trainer's own scheduler on top of ours)
warns, the logging path reads nothing from the device, and a later run of the same Trainer
(auto_find_batch_size's retry, another train() with a new max_steps) gets a schedule of its own
length.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from d2z_optim import AdamW, schedules
from d2z_optim.integrations import hf

from .conftest import framework
from .test_no_sync import HOST_READS, Recorder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
transformers = framework("transformers")

PEAK = 1e-2


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16):
        self.x = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def training_args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=PEAK,
        weight_decay=0.1,
        warmup_steps=3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Logged(transformers.TrainerCallback):
    """The LR Trainer logs, and the LR each step applies (read before the step: a sync, test only)."""

    def __init__(self):
        self.logged, self.applied = [], []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "learning_rate" in logs:
            self.logged.append(logs["learning_rate"])

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.applied.append([float(x) for x in hf.unwrap(optimizer).current_lr()])


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = state.global_step == self.step


class OutOfMemoryOnce(transformers.TrainerCallback):
    """Fails the first run at its ``at``-th step as a CUDA OOM does: auto_find_batch_size retries."""

    def __init__(self, at):
        self.at, self.raised = at, False

    def on_step_end(self, args, state, control, **kw):
        if not self.raised and state.global_step == self.at:
            self.raised = True
            raise RuntimeError("CUDA out of memory. (simulated)")


def trainer(out, callbacks=(), optimizers=(None, None), **kw):
    return transformers.Trainer(
        model=tiny_gpt2(),
        args=training_args(out, **kw),
        train_dataset=Tokens(),
        callbacks=list(callbacks),
        optimizers=optimizers,
    )


def test_one_line_applies_the_schedule_and_logs_it(tmp_path):
    rec = Logged()
    t = hf.use_d2z(trainer(tmp_path, [rec], max_steps=12, max_grad_norm=1.0))
    t.train()
    opt = hf.unwrap(t.optimizer)
    assert isinstance(opt, AdamW) and opt.total_steps == 12 and int(opt.step_count) == 12
    table = schedules.get("linear-d2z", 12, warmup=3).table()  # Trainer's "linear" with warmup_steps=3
    want = [PEAK * float(table[k]) for k in range(12)]
    assert [a[0] for a in rec.applied] == pytest.approx(want, rel=1e-7, abs=0)
    assert rec.logged == pytest.approx(want, rel=1e-7, abs=0)  # logged = applied, step by step
    # Trainer's groups: decay on weights, none on biases and norms; peak lr untouched
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    nodecay = {n for n, p in t.model.named_parameters() if any(p is q for q in opt.param_groups[1]["params"])}
    assert nodecay and all("bias" in n or "ln" in n for n in nodecay), nodecay
    assert all(g["lr"] == PEAK for g in opt.param_groups)


def test_epochs_accumulation_and_warmup_ratio(tmp_path):
    rec = Logged()
    # 64 samples / batch 4 = 16 micro-batches per epoch, 2 accumulated: 8 optimizer steps, x2 epochs
    t = hf.use_d2z(trainer(tmp_path, [rec], num_train_epochs=2, warmup_steps=0.25, lr_scheduler_type="cosine"))
    t.train()
    opt = hf.unwrap(t.optimizer)
    assert opt.total_steps == 16 == t.state.max_steps and int(opt.step_count) == 16
    table = schedules.get("cosine-d2z", 16, warmup=4).table()  # ceil(0.25 * 16), Trainer's rounding
    assert rec.logged == pytest.approx([PEAK * float(table[k]) for k in range(16)], rel=1e-7, abs=0)


def test_resume_is_bitwise(tmp_path):
    full = hf.use_d2z(trainer(tmp_path / "full", max_steps=12))
    full.train()
    first = hf.use_d2z(trainer(tmp_path / "part", max_steps=12, save_strategy="steps", save_steps=6))
    first.add_callback(StopAt(6))  # the checkpoint at 6 is written, then training stops
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first.train()
    assert any("ended after 6 of its schedule's total_steps=12" in str(w.message) for w in caught)  # said so
    second = hf.use_d2z(trainer(tmp_path / "part", max_steps=12))
    second.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    opt = hf.unwrap(second.optimizer)
    assert int(opt.step_count) == 12
    for (n, a), b in zip(full.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), n


def test_the_naive_setup_warns_of_double_scheduling(tmp_path):
    model = tiny_gpt2()
    opt = AdamW(model.parameters(), lr=PEAK, total_steps=12)
    t = transformers.Trainer(
        model=model, args=training_args(tmp_path, max_steps=12), train_dataset=Tokens(), optimizers=(opt, None)
    )
    with pytest.warns(UserWarning, match=r"changed from .* between steps while the optimizer's own schedule"):
        t.train()


def test_a_given_optimizer_is_kept_and_its_length_checked(tmp_path):
    model = tiny_gpt2()
    opt = AdamW(model.parameters(), lr=PEAK, total_steps=20)
    t = transformers.Trainer(
        model=model, args=training_args(tmp_path, max_steps=12), train_dataset=Tokens(), optimizers=(opt, None)
    )
    hf.use_d2z(t)
    with pytest.warns(UserWarning, match=r"total_steps=20 but the Trainer \(state.max_steps\) will run 12"):
        t.train()
    assert hf.unwrap(t.optimizer) is opt and int(opt.step_count) == 12
    assert isinstance(t.lr_scheduler, hf.ScheduleView)


class Norms(transformers.TrainerCallback):
    """The gradients' global norm before each step (a sync, test only) and the logged grad_norm."""

    def __init__(self):
        self.before, self.logged = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.before.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "grad_norm" in logs:
            self.logged.append(logs["grad_norm"])


def test_max_grad_norm_moves_into_the_optimizer_with_trainers_parameters(tmp_path):
    inside = Norms()
    t = hf.use_d2z(trainer(tmp_path / "a", [inside], max_steps=8, max_grad_norm=0.3))
    assert t.args.max_grad_norm == 0.0  # Trainer does not clip: the optimizer does
    t.train()
    opt = hf.unwrap(t.optimizer)
    assert opt.max_grad_norm == 0.3 and int(opt.step_count) == 8
    assert min(inside.before) > 0.3  # .grad was not clipped in place; the update was
    assert inside.logged == pytest.approx(inside.before, rel=1e-5)  # logged: the pre-clip norm
    # Trainer's own clipping of a d2z optimizer that does not clip: the same parameters
    model = tiny_gpt2()
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    by_id = {id(p): q for p, q in zip(t.model.parameters(), model.parameters())}
    groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]
    plain = AdamW(groups, lr=PEAK, total_steps=8, warmup=3)
    outside = Norms()
    u = transformers.Trainer(
        model=model, args=training_args(tmp_path / "b", max_steps=8, max_grad_norm=0.3), train_dataset=Tokens(),
        callbacks=[outside], optimizers=(plain, None),
    )  # fmt: skip
    hf.use_d2z(u)
    assert u.args.max_grad_norm == 0.3
    u.train()
    assert plain.max_grad_norm is None and outside.logged == pytest.approx(inside.before, rel=1e-4)
    # rtol: one rounding apart per step (the coefficient folded into the kernel's divisor vs
    # multiplied into .grad); atol: the key third of c_attn.bias has a gradient that is zero in
    # exact arithmetic (softmax ignores a constant added to every key), so its float noise differs
    # once the parameters differ by a rounding, and Adam scales noise below eps up to lr * g / eps
    for a, b in zip(t.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_the_logging_path_reads_nothing_from_the_device(tmp_path):
    t = hf.use_d2z(trainer(tmp_path, max_steps=4))
    t.train()
    opt = hf.unwrap(t.optimizer)
    with Recorder() as rec:
        lr = t._get_learning_rate()  # what Trainer calls after every step
        opt.last_lr()
    assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
    assert lr == pytest.approx(opt.last_lr_host()[0]) and lr == pytest.approx(float(opt.last_lr()[0]))


def test_bad_input_names_what_is_needed(tmp_path):
    t = hf.use_d2z(trainer(tmp_path, max_steps=4))
    with pytest.raises(ValueError, match=r"called outside train\(\).*state.max_steps.*total_steps="):
        t.create_optimizer()  # outside train(): no step count yet
    assert t.optimizer is None and t.optimizer_cls_and_kwargs is None
    t = hf.use_d2z(trainer(tmp_path, max_steps=4, lr_scheduler_type="polynomial"))
    with pytest.raises(ValueError, match=r"lr_scheduler_type='polynomial'.*pass schedule="):
        t.train()
    model = tiny_gpt2()
    with pytest.raises(TypeError, match=r"not a d2z_optim\.AdamW"):
        hf.use_d2z(
            transformers.Trainer(
                model=model,
                args=training_args(tmp_path, max_steps=4),
                train_dataset=Tokens(),
                optimizers=(torch.optim.AdamW(model.parameters()), None),
            )
        )
    t = hf.use_d2z(trainer(tmp_path, max_steps=4), schedule="wsd", warmup=1, backend="torch")
    t.train()
    assert hf.unwrap(t.optimizer).schedule.name == "wsd" and hf.unwrap(t.optimizer).backend_name == "torch"


def steps_of(rec, n, warmup=3):
    """The LR the last ``n`` steps applied, against an ``n``-step schedule."""
    table = schedules.get("linear-d2z", n, warmup=warmup).table()
    assert [a[0] for a in rec.applied[-n:]] == pytest.approx([PEAK * float(table[k]) for k in range(n)], rel=1e-7)


def test_auto_find_batch_size_gets_a_schedule_for_the_run_it_retries(tmp_path):
    rec = Logged()
    oom = OutOfMemoryOnce(at=2)
    t = hf.use_d2z(trainer(tmp_path, [rec, oom], num_train_epochs=1, auto_find_batch_size=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.train()  # batch 4: 8 steps, fails at step 2; batch 3: 22 micro-batches, 11 steps
    assert oom.raised and t._train_batch_size == 3
    opt = hf.unwrap(t.optimizer)
    assert opt.total_steps == 11 == t.state.max_steps and int(opt.step_count) == 11
    assert len(rec.applied) == 2 + 11
    steps_of(rec, 11)
    said = [str(w.message) for w in caught if "d2z_optim" in str(w.message)]
    assert not said, said  # neither a length mismatch nor a short run (the failed run was superseded)
    assert t.lr_scheduler.optimizer is opt and t.lr_scheduler.get_last_lr() == opt.last_lr_host()


def test_another_train_follows_the_new_max_steps(tmp_path):
    rec = Logged()
    t = hf.use_d2z(trainer(tmp_path, [rec], max_steps=4))
    t.train()
    first = hf.unwrap(t.optimizer)
    t.args.max_steps = 6
    t.train()
    opt = hf.unwrap(t.optimizer)
    assert opt is not first and opt.total_steps == 6 and int(opt.step_count) == 6
    steps_of(rec, 6)
    t.train()  # the same length again: a new run starts its schedule at 0, as Trainer's scheduler
    assert int(hf.unwrap(t.optimizer).step_count) == 6 and len(rec.applied) == 4 + 6 + 6
    steps_of(rec, 6)


def test_create_optimizer_and_scheduler_sizes_it_and_train_resizes_it(tmp_path):
    t = hf.use_d2z(trainer(tmp_path, max_steps=4))
    t.create_optimizer_and_scheduler(num_training_steps=5)  # outside train(): the count given
    opt = hf.unwrap(t.optimizer)
    assert opt.total_steps == 5 and isinstance(t.lr_scheduler, hf.ScheduleView) and t.lr_scheduler.optimizer is opt
    t.train()
    assert hf.unwrap(t.optimizer).total_steps == 4 and t.lr_scheduler.optimizer is hf.unwrap(t.optimizer)
    t = hf.use_d2z(trainer(tmp_path, max_steps=4), total_steps=4)
    kept = t.create_optimizer()  # total_steps= given: it can be built before train(), and is kept
    t.train()
    assert hf.unwrap(t.optimizer) is kept and int(kept.step_count) == 4
