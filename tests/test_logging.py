"""The LR actually applied, for logging (last_lr on the device, last_lr_host without a device read),
and the warning when something outside the optimizer schedules the LR too (issue 16)."""

from __future__ import annotations

import warnings

import pytest
import torch

from d2z_optim import AdamW, schedules

from .conftest import make_params


def _step(opt, params, found_inf=None):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.found_inf = found_inf
    opt.step()


def test_last_lr_is_the_lr_each_group_applied(backend):
    params = make_params()
    groups = [{"params": params[:2], "lr": 1e-3}, {"params": params[2:], "lr": 4e-3}]
    opt = AdamW(groups, total_steps=10, warmup=2, backend=backend)
    table = schedules.get("linear-d2z", 10, warmup=2).table()
    for k in range(12):  # past the end too: the last multiplier is reused (and warned)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _step(opt, params)
        i = min(k, 9)
        want = [float(table[i]) * 1e-3, float(table[i]) * 4e-3]
        got = [float(x) for x in opt.last_lr()]
        assert got == pytest.approx(want, rel=1e-7, abs=0), (k, got, want)
        assert opt.last_lr_host() == pytest.approx(want, rel=1e-7, abs=0)
        assert [g["lr"] for g in opt.param_groups] == [1e-3, 4e-3]  # the peak, untouched


def test_a_skipped_step_is_not_an_applied_one():
    params = make_params()
    opt = AdamW(params, lr=1.0, total_steps=4, warmup=0)
    table = schedules.get("linear-d2z", 4, warmup=0).table()
    _step(opt, params)
    _step(opt, params, found_inf=torch.tensor(1.0))  # AMP overflow: a no-op
    assert float(opt.last_lr()[0]) == pytest.approx(float(table[0]))  # the device knows
    assert opt.last_lr_host()[0] == pytest.approx(float(table[1]))  # the host counted a call (documented)


def test_last_lr_needs_no_sync():
    params = make_params()
    opt = AdamW(params, total_steps=5)
    _step(opt, params)
    out = opt.last_lr()
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.float64 and x.dim() == 0 for x in out)


def test_outside_scheduler_warns_once_naming_the_cause():
    params = make_params()
    opt = AdamW(params, lr=1e-3, total_steps=20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 20)  # as HF Trainer's default
    with pytest.warns(UserWarning, match=r"param_groups\[0\]\['lr'\] changed.*linear-d2z.*product of both") as w:
        for _ in range(5):
            _step(opt, params)
            sched.step()
    assert sum("changed from" in str(x.message) for x in w) == 1


def test_a_loop_setting_lr_warns_and_schedule_none_does_not():
    params = make_params()
    opt = AdamW(params, lr=1e-3, total_steps=20)
    with pytest.warns(UserWarning, match="changed from 0.001 to 0.0005"):
        _step(opt, params)
        opt.param_groups[0]["lr"] = 5e-4
        _step(opt, params)
    plain = AdamW(make_params(), lr=1e-3)  # schedule=None: torch schedulers drive the LR, as in torch
    sched = torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1 - s / 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            _step(plain, plain.param_groups[0]["params"])
            sched.step()
