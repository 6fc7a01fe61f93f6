"""Lightning with d2z: ``total_steps(self.trainer)`` in configure_optimizers and ``D2ZCallback``,
against the real package (issue 16): the applied LR equals the schedule step by step, the logged
LR equals the applied one (under LearningRateMonitor's keys, for several optimizers and groups;
``log_every_n_steps=0`` never logs), ``gradient_clip_val`` moves into the optimizer (the same
parameters as Lightning's own clipping, the norm logged), ``bf16-mixed``/``16-mixed`` with
``gradient_clip_val`` clip either way (an fp16 overflow is a counted no-op; manual optimization
unscales once; a skipped batch leaves the GradScaler as it was), a ``pytorch_lightning`` Trainer
gets the same, resume is bitwise, and the logging path reads nothing from the device."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from d2z_optim import AdamW, schedules
from d2z_optim.integrations import lightning as d2z_lightning

from .conftest import framework
from .test_no_sync import HOST_READS, Recorder

L = framework("lightning.pytorch")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

PEAK = 1e-2


class Memory(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class Steps:
    """The tests' model, on either package's LightningModule (``Net``: lightning.pytorch's)."""

    def __init__(self, inf_at=None, d2z_kwargs=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.inf_at, self.d2z_kwargs = inf_at, d2z_kwargs or {}
        self.applied, self.norms = [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if batch_idx == self.inf_at:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        opt = AdamW(self.parameters(), lr=PEAK, total_steps=d2z_lightning.total_steps(self.trainer), warmup=2)
        opt.register_step_pre_hook(self.record)
        return opt

    def record(self, opt, args, kwargs):  # test only: reads the device (a sync)
        self.applied.append(float(opt.current_lr()[0]))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad.float() for p in self.parameters()]  # what the step will see (unscaled)
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


class Net(Steps, L.LightningModule):
    pass


def grad_norm(module):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in module.parameters()])))


class Manual(Net):
    """Manual optimization: clip with self.clip_gradients, then step; keeps the first step's
    clipped gradients and the moments that step left."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.net(x).float(), y))
        self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        self.norms.append(grad_norm(self))
        if batch_idx == 0:
            self.clipped = [p.grad.detach().clone() for p in self.parameters()]
        opt.step()
        if batch_idx == 0:
            self.exp_avg = [opt.optimizer.state[p]["exp_avg"].clone() for p in self.parameters()]


class TwoOptimizers(Net):
    """Manual optimization with two d2z optimizers, the first with two groups (one named)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.net(x).float(), y))
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        n, first = d2z_lightning.total_steps(self.trainer), self.net[0]
        groups = [{"params": [first.weight], "name": "body"}, {"params": [first.bias], "lr": PEAK / 4}]
        a = AdamW(groups, lr=PEAK, total_steps=n, warmup=2)
        b = AdamW(self.net[2].parameters(), lr=PEAK / 2, total_steps=n, warmup=2)
        return [a, b]


class SkipsABatch(Net):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 3 else super().training_step(batch, batch_idx)


def scaled_plugin():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))


class StopAfterEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def data(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) * 3)
    return torch.utils.data.DataLoader(ds, batch_size=batch)


def fit(model, ckpt_path=None, callbacks=None, **kw):
    logger = Memory()
    base = dict(
        max_epochs=2,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    base.update(kw)
    cbs = [d2z_lightning.D2ZCallback()] if callbacks is None else callbacks
    trainer = L.Trainer(callbacks=cbs, **base)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*The number of training batches.*")
        warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
        trainer.fit(model, data(), ckpt_path=ckpt_path)
    return trainer, logger


def test_recipe_applies_the_schedule_and_the_callback_logs_it():
    model = Net()
    trainer, logger = fit(model)
    opt = trainer.optimizers[0]
    # 8 batches per epoch, 2 accumulated, 2 epochs: 8 optimizer steps
    assert opt.total_steps == 8 == trainer.estimated_stepping_batches and int(opt.step_count) == 8
    table = schedules.get("linear-d2z", 8, warmup=2).table()
    want = [PEAK * float(table[k]) for k in range(8)]
    assert model.applied == pytest.approx(want, rel=1e-7, abs=0)
    logged = [(step, m["lr-AdamW"]) for step, m in logger.rows if "lr-AdamW" in m]
    assert [s for s, _ in logged] == list(range(8))
    assert [v for _, v in logged] == pytest.approx(want, rel=1e-7, abs=0)  # logged = applied


def test_clipping_moves_into_the_optimizer_with_the_parameters_lightnings_clipping_gives():
    inside, outside = Net(), Net()
    trainer, logger = fit(inside, gradient_clip_val=0.05)
    opt = trainer.optimizers[0]
    assert opt.max_grad_norm == 0.05 and int(opt.step_count) == 8
    fit(outside, callbacks=[d2z_lightning.D2ZCallback(clip_inside=False)], gradient_clip_val=0.05)
    assert max(outside.norms) <= 0.05 * (1 + 1e-3)  # Lightning clipped .grad there; not here:
    assert min(inside.norms) > 0.05
    for a, b in zip(inside.parameters(), outside.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the kernels' rounding vs torch's
    logged = [m["grad_norm-AdamW"] for _, m in logger.rows if "grad_norm-AdamW" in m]
    assert logged == pytest.approx(inside.norms, rel=1e-5)  # the pre-clip norm of each step


def test_bf16_mixed_clips_with_the_callback():
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):  # Lightning alone
        fit(Net(), callbacks=[], precision="bf16-mixed", gradient_clip_val=0.05, max_epochs=1)
    model = Net()
    trainer, _ = fit(model, precision="bf16-mixed", gradient_clip_val=0.05)
    opt = trainer.optimizers[0]
    assert int(opt.step_count) == 8 and opt.max_grad_norm == 0.05
    assert float(opt.grad_norm) == pytest.approx(model.norms[-1], rel=1e-5)
    model = Net()  # Lightning's clipping kept: unscaled (no scaler here) and clipped in .grad
    trainer, _ = fit(model, callbacks=[d2z_lightning.D2ZCallback(clip_inside=False)], precision="bf16-mixed",
                     gradient_clip_val=0.05)  # fmt: skip
    assert int(trainer.optimizers[0].step_count) == 8 and trainer.optimizers[0].max_grad_norm is None
    assert max(model.norms) <= 0.05 * (1 + 1e-3), model.norms  # every step saw clipped gradients


@pytest.mark.parametrize("clip_inside", [True, False], ids=["inside", "lightning"])
def test_16_mixed_with_a_grad_scaler_clips_and_skips_an_overflow_without_a_sync(clip_inside):
    model = Net(inf_at=2)  # batch 2 of each epoch: an inf loss, every gradient inf
    cb = d2z_lightning.D2ZCallback(clip_inside=clip_inside)
    trainer, _ = fit(model, callbacks=[cb], plugins=[scaled_plugin()], gradient_clip_val=0.05)
    opt = trainer.optimizers[0]
    assert int(opt.skipped_steps) == 2 and int(opt.step_count) == 6  # overflows: no-ops, counted
    assert all(p.isfinite().all() for p in model.parameters())
    finite = [n for n in model.norms if math.isfinite(n)]
    assert len(finite) == 6
    if clip_inside:  # .grad stays scaled; the optimizer's norm is the true one
        assert math.isfinite(float(opt.grad_norm)) and float(opt.grad_norm) < finite[-1]
    else:
        assert max(finite) <= 0.05 * (1 + 1e-3), model.norms


def test_resume_is_bitwise(tmp_path):
    full = Net()
    fit(full)
    part = Net()  # the same 2-epoch run, stopped after its first epoch and saved
    with pytest.warns(UserWarning, match=r"ended after 4 of its schedule's total_steps=8"):
        trainer, _ = fit(part, callbacks=[d2z_lightning.D2ZCallback(), StopAfterEpoch()])
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Net()
    trainer, _ = fit(resumed, ckpt_path=tmp_path / "epoch1.ckpt")
    assert int(trainer.optimizers[0].step_count) == 8
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_short_run_says_so_and_the_logging_path_reads_nothing_from_the_device():
    model = Net(d2z_kwargs={})
    cb = d2z_lightning.D2ZCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, logger = fit(model, callbacks=[cb], max_steps=3)
    assert int(trainer.optimizers[0].step_count) == 3 and trainer.optimizers[0].total_steps == 3
    assert not [w for w in caught if "d2z_optim" in str(w.message)], [str(w.message) for w in caught]
    cb.stepped_at, rows = -1, len(logger.rows)  # as if the last batch had just stepped
    with Recorder() as rec:
        cb.on_train_batch_end(trainer, model, None, None, 0)
    assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
    assert len(logger.rows) == rows + 1 and "lr-AdamW" in logger.rows[-1][1]  # it did log


def test_a_trainer_without_a_step_count_names_total_steps():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(8), torch.zeros(1))] * 4)

    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit_loop._data_source  # noqa: B018
    model = Net()
    with pytest.raises(ValueError, match=r"total_steps="):
        trainer.fit(model, torch.utils.data.DataLoader(Stream(), batch_size=2))


def test_manual_optimization_under_16_mixed_unscales_once():
    model = Manual()
    trainer, _ = fit(model, plugins=[scaled_plugin()], accumulate_grad_batches=1, max_epochs=1)
    assert int(trainer.optimizers[0].step_count) == 8 and max(model.norms) <= 0.05 * (1 + 1e-3), model.norms
    # the first step's first moment is (1 - beta1) x the gradients clip_gradients left (unscaled
    # once: twice would leave them 2**4 too small)
    for m, g in zip(model.exp_avg, model.clipped):
        torch.testing.assert_close(m, 0.1 * g, rtol=1e-5, atol=0)


def test_a_skipped_batch_under_16_mixed_leaves_the_scaler_as_it_was():
    model = SkipsABatch()  # batch 3 of each epoch (an optimizer step's last micro-batch) returns None
    with pytest.warns(UserWarning, match=r"ended after 6 of its schedule's total_steps=8"):
        cb = d2z_lightning.D2ZCallback(clip_inside=False)  # the unscale-then-clip path
        trainer, _ = fit(model, callbacks=[cb], plugins=[scaled_plugin()], gradient_clip_val=0.05)
    opt = trainer.optimizers[0]
    assert int(opt.step_count) == 6 and int(opt.skipped_steps) == 0 and trainer.global_step == 8
    assert all(p.isfinite().all() for p in model.parameters())


def test_the_precision_classes_come_from_the_trainers_package():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)

    class Mine(L.Trainer):
        pass

    assert d2z_lightning.package_of(trainer) == "lightning.pytorch"
    assert d2z_lightning.package_of(Mine.__new__(Mine)) == "lightning.pytorch"  # a subclass: its base's
    fake = type("Trainer", (), {"__module__": "pytorch_lightning.trainer.trainer"})
    assert d2z_lightning.package_of(fake()) == "pytorch_lightning"
    assert d2z_lightning.package_of(object()) is None
    assert d2z_lightning._classes("lightning.pytorch")[0] is MixedPrecision


def test_a_pytorch_lightning_trainer_clips_too():
    PL = framework("pytorch_lightning")

    class PLNet(Steps, PL.LightningModule):
        pass

    model = PLNet()
    trainer = PL.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        gradient_clip_val=0.05,
        callbacks=[d2z_lightning.D2ZCallback()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, data())
    opt = trainer.optimizers[0]
    assert int(opt.step_count) == 8 and opt.max_grad_norm == 0.05  # moved into the optimizer
    assert float(opt.grad_norm) == pytest.approx(model.norms[-1], rel=1e-5)


def test_log_every_n_steps():
    _, logger = fit(Net(), log_every_n_steps=0)  # Lightning's "never log"
    assert not [m for _, m in logger.rows if "lr-AdamW" in m]
    _, logger = fit(Net(), callbacks=[d2z_lightning.D2ZCallback(log_every_n_steps=0)])
    assert not [m for _, m in logger.rows if "lr-AdamW" in m]
    _, logger = fit(Net(), callbacks=[d2z_lightning.D2ZCallback(log_every_n_steps=3)])
    assert [s for s, m in logger.rows if "lr-AdamW" in m] == [0, 3, 6]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"log_every_n_steps=.*int >= 0"):
            d2z_lightning.D2ZCallback(log_every_n_steps=bad)


def test_the_keys_are_learning_rate_monitors_for_several_optimizers_and_groups():
    model, lrm, cb = TwoOptimizers(), L.callbacks.LearningRateMonitor(), d2z_lightning.D2ZCallback()
    trainer, logger = fit(model, callbacks=[lrm, cb], accumulate_grad_batches=1, max_epochs=1)
    named = cb.lr_keys(trainer)
    assert [opt for opt, _ in named] == trainer.optimizers
    keys = [k for _, ks in named for k in ks]
    assert keys == list(lrm.lrs) == ["lr-AdamW/body", "lr-AdamW/pg2", "lr-AdamW-1"]
    assert {k for _, m in logger.rows for k in m} == set(keys)  # LearningRateMonitor's rows and ours
    table = schedules.get("linear-d2z", 8, warmup=2).table()
    peaks = [PEAK, PEAK / 4, PEAK / 2]
    for step in range(8):  # our row of each step: the applied LR, on Lightning's step axis
        want = {k: pytest.approx(p * float(table[step]), rel=1e-7, abs=0) for k, p in zip(keys, peaks)}
        assert any(s == step and m == want for s, m in logger.rows), (step, logger.rows)


class Quiet(Net):
    """Net without the test's own device reads (the applied LR, the gradients' norm)."""

    def record(self, opt, args, kwargs):
        pass

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def test_the_16_mixed_step_reads_nothing_from_the_device():
    model = Quiet()
    trainer, _ = fit(model, plugins=[scaled_plugin()], gradient_clip_val=0.05, max_steps=3)
    plugin, opt = trainer.precision_plugin, trainer.optimizers[0]
    x, y = next(iter(data()))

    def closure():  # what Lightning's closure does: forward, scaled backward
        loss = torch.nn.functional.mse_loss(model.net(x), y)
        plugin.scaler.scale(loss).backward()
        return loss

    before = int(opt.step_count)
    with Recorder() as rec:  # the wrapped optimizer_step: closure, unscale, clip, scaler.step/update
        plugin.optimizer_step(opt, model=model, closure=closure)
    assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
    assert rec.ops.count("_amp_foreach_non_finite_check_and_unscale_") == 1  # unscaled once, for the clip
    assert int(opt.step_count) == before + 1
    with Recorder() as rec:  # and a skipped batch's
        plugin.optimizer_step(opt, model=model, closure=lambda: None)
    assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
    assert "_amp_foreach_non_finite_check_and_unscale_" not in rec.ops
    assert int(opt.step_count) == before + 1
