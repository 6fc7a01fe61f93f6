"""accelerate with d2z, against the real package (issue 16): ``prepare()`` keeps the LR
behaviour, ``total_steps(accelerator, dataloader, epochs)`` counts optimizer steps per process,
a schedule sized in micro-batches says it ended short, an AMP overflow is a counted no-op
without a sync, and save_state/load_state resume bitwise."""

from __future__ import annotations

import pytest
import torch

from d2z_optim import AdamW, schedules
from d2z_optim.integrations import accelerate as d2z_accelerate

from .conftest import framework
from .test_no_sync import HOST_READS, Recorder

accelerate = framework("accelerate")
PEAK = 1e-2


def setup(ga=2, steps=None, seed=0):
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ga)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    model, dl = acc.prepare(model, dl)
    total = d2z_accelerate.total_steps(acc, dl, num_epochs=2) if steps is None else steps
    opt = acc.prepare(AdamW(model.parameters(), lr=PEAK, weight_decay=0.1, total_steps=total, warmup=2))
    return acc, model, opt, dl


def train(acc, model, opt, dl, epochs=2, applied=None):
    for _ in range(epochs):
        for x, y in dl:
            with acc.accumulate(model):
                acc.backward(torch.nn.functional.mse_loss(model(x), y))
                if applied is not None and acc.sync_gradients:
                    applied.append(float(opt.optimizer.current_lr()[0]))  # test only: a sync
                opt.step()
                opt.zero_grad()


def test_prepare_keeps_the_schedule_and_total_steps_counts_optimizer_steps():
    acc, model, opt, dl = setup()
    d2z = opt.optimizer
    assert d2z.total_steps == 8  # 8 batches per epoch, 2 accumulated, 2 epochs
    assert [g["lr"] for g in d2z.param_groups] == [PEAK]  # prepare's state_dict round trip
    applied = []
    train(acc, model, opt, dl, applied=applied)
    assert int(d2z.step_count) == 8 and not d2z.check_run_end()
    table = schedules.get("linear-d2z", 8, warmup=2).table()
    assert applied == pytest.approx([PEAK * float(table[k]) for k in range(8)], rel=1e-7, abs=0)


def test_a_schedule_sized_in_micro_batches_says_it_ended_short():
    acc, model, opt, dl = setup(steps=2 * 8)  # len(dl) x epochs: micro-batches, not optimizer steps
    train(acc, model, opt, dl)
    with pytest.warns(UserWarning, match=r"ended after 8 of its schedule's total_steps=16 steps"):
        assert opt.optimizer.check_run_end()


def test_an_overflow_is_a_counted_no_op_without_a_sync():
    _, model, opt, _ = setup(ga=1)
    d2z = opt.optimizer
    scaler = torch.amp.GradScaler("cpu")
    scaled = accelerate.optimizer.AcceleratedOptimizer(d2z, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(1, 8)).sum() * float("inf")).backward()  # every gradient non-finite
    with Recorder() as rec:
        scaled.step()
    assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
    assert int(d2z.skipped_steps) == 1 and int(d2z.step_count) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not scaled.step_was_skipped  # documented: the optimizer skips, the scaler does not


def test_save_state_and_load_state_resume_bitwise(tmp_path):
    acc, model, opt, dl = setup()
    train(acc, model, opt, dl)
    full = [p.detach().clone() for p in model.parameters()]
    acc, model, opt, dl = setup()
    train(acc, model, opt, dl, epochs=1)
    acc.save_state(str(tmp_path))
    acc, model, opt, dl = setup(seed=1)  # other initial weights: everything comes from the checkpoint
    acc.load_state(str(tmp_path))
    assert int(opt.optimizer.step_count) == 4
    train(acc, model, opt, dl, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(full, model.parameters()))


def test_total_steps_needs_the_prepared_dataloader():
    acc = accelerate.Accelerator(cpu=True)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    with pytest.raises(ValueError, match=r"accelerator.prepare\(\) returned.*total_steps="):
        d2z_accelerate.total_steps(acc, dl)
