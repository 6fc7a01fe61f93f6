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


RUN = """
import torch, d2z_optim
def train(n):  # function scope: the optimizer is collected before exit, and still counted
    p = torch.nn.Parameter(torch.ones(4))
    opt = d2z_optim.AdamW([p], total_steps=10, backend="torch")
    for _ in range(n):
        p.grad = torch.ones(4)
        opt.step()
    return opt
train({first})
keep = train({second})  # alive at exit
"""


# (3, 4): both short, one collected before exit and one alive at it: one warning counting both
@pytest.mark.parametrize("first,second,said", [(3, 4, "3 of"), (10, 10, None)])
def test_a_run_that_ends_short_of_its_table_says_so_at_exit(first, second, said):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", RUN.format(first=first, second=second)], capture_output=True, text=True, check=True
    )
    lines = [ln for ln in out.stderr.splitlines() if "ended after" in ln]
    if said is None:
        assert not lines, out.stderr
    else:
        assert len(lines) == 1, out.stderr  # once, with both figures
        assert f"ended after {said} its schedule's total_steps=10 steps" in lines[0]
        assert ("1 more optimizers" in lines[0]) == (first < 10 and second < 10)


def test_check_run_end_warns_once_per_optimizer():
    params = make_params()
    opt = AdamW(params, total_steps=4)
    _step(opt, params)
    with pytest.warns(UserWarning, match=r"ended after 1 of its schedule's total_steps=4 steps: the last LR"):
        assert opt.check_run_end()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.check_run_end()  # said already
        assert not AdamW(params).check_run_end()  # no schedule: nothing to end
        done = AdamW(params, total_steps=1, warmup=0, schedule="constant")
        _step(done, params)
        assert not done.check_run_end()
