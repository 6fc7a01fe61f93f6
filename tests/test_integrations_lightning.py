"""Lightning with d2z: ``total_steps(self.trainer)`` in configure_optimizers and ``D2ZCallback``,
against the real package (issue 16): the applied LR equals the schedule step by step, the logged
LR equals the applied one, ``bf16-mixed``/``16-mixed`` with ``gradient_clip_val`` clip (and an
fp16 overflow is a counted no-op), resume is bitwise, and the logging path reads nothing from
the device."""

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


class Net(L.LightningModule):
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


def test_bf16_mixed_clips_with_the_callback():
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):  # Lightning alone
        fit(Net(), callbacks=[], precision="bf16-mixed", gradient_clip_val=0.05, max_epochs=1)
    model = Net()
    trainer, _ = fit(model, precision="bf16-mixed", gradient_clip_val=0.05)
    assert int(trainer.optimizers[0].step_count) == 8
    assert max(model.norms) <= 0.05 * (1 + 1e-3), model.norms  # every step saw clipped gradients


def test_16_mixed_with_a_grad_scaler_clips_and_skips_an_overflow_without_a_sync():
    model = Net(inf_at=2)  # batch 2 of each epoch: an inf loss, every gradient inf
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    trainer, _ = fit(model, plugins=[plugin], gradient_clip_val=0.05)
    opt = trainer.optimizers[0]
    assert int(opt.skipped_steps) == 2 and int(opt.step_count) == 6  # overflows: no-ops, counted
    assert all(p.isfinite().all() for p in model.parameters())
    finite = [n for n in model.norms if math.isfinite(n)]
    assert len(finite) == 6 and max(finite) <= 0.05 * (1 + 1e-3), model.norms


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
        trainer, _ = fit(model, callbacks=[cb], max_steps=3)
    assert int(trainer.optimizers[0].step_count) == 3 and trainer.optimizers[0].total_steps == 3
    assert not [w for w in caught if "d2z_optim" in str(w.message)], [str(w.message) for w in caught]
    cb.logged_at = -1
    with Recorder() as rec:
        cb.on_train_batch_end(trainer, model, None, None, 0)
    assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)


def test_a_trainer_without_a_step_count_names_total_steps():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(8), torch.zeros(1))] * 4)

    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit_loop._data_source  # noqa: B018
    model = Net()
    with pytest.raises(ValueError, match=r"total_steps="):
        trainer.fit(model, torch.utils.data.DataLoader(Stream(), batch_size=2))
