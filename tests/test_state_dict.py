"""Checkpoints: torch's layout both ways, the schedule position, bitwise resume."""

import pytest
import torch

from d2z_optim import AdamW, schedules

from .conftest import clone_params, grads_for, make_params, roundtrip

K = 12  # steps before and after the checkpoint
SHAPES = [tuple(p.shape) for p in make_params()]


def train(opt, params, start, steps, skip=lambda k, i: False, sched=None):
    for k in range(start, start + steps):
        for i, (p, g) in enumerate(zip(params, grads_for(k, SHAPES))):
            p.grad = None if skip(k, i) else g
        opt.step()
        if sched:
            sched.step()


def skip_some(k, i):
    return i == 2 and k % 4 == 1


def test_state_has_torchs_keys_and_layout(backend):
    p = make_params()
    opt = AdamW(p, amsgrad=True, backend=backend)
    train(opt, p, 0, 3, skip_some)
    st = opt.state[p[0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and st["step"].device == p[0].device
    assert st["exp_avg"].shape == p[0].shape and st["exp_avg"].dtype == p[0].dtype
    ref = torch.optim.AdamW(clone_params(p), amsgrad=True)
    assert set(opt.state_dict()["param_groups"][0]) == set(ref.state_dict()["param_groups"][0])


@pytest.mark.parametrize("name", ["linear-d2z", "wsd", "constant"])
def test_bitwise_resume(backend, name):
    p0 = make_params()
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, schedule=name, total_steps=2 * K, backend=backend)
    straight = clone_params(p0)
    opt = AdamW(straight, **kw)
    train(opt, straight, 0, 2 * K, skip_some)

    resumed = clone_params(p0)
    first = AdamW(resumed, **kw)
    train(first, resumed, 0, K, skip_some)
    saved = roundtrip({"model": [p.detach().clone() for p in resumed], "opt": first.state_dict()})
    fresh = [torch.nn.Parameter(t) for t in saved["model"]]
    second = AdamW(fresh, **kw)
    second.load_state_dict(saved["opt"])
    assert int(second.step_count) == K
    train(second, fresh, K, K, skip_some)
    for a, b in zip(fresh, straight):
        assert torch.equal(a, b)
    assert int(second.step_count) == int(opt.step_count) == 2 * K


def test_ours_into_torch_and_back(backend):
    """A d2z state_dict loads into torch.optim.AdamW and training continues identically."""
    p0 = make_params()
    ours = clone_params(p0)
    opt = AdamW(ours, amsgrad=True, backend=backend)  # schedule=None: torch's behaviour
    train(opt, ours, 0, K, skip_some)
    sd = roundtrip(opt.state_dict())

    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref = torch.optim.AdamW(theirs, amsgrad=True, foreach=False)
    ref.load_state_dict(sd)  # our extra "d2z" entry is ignored by torch
    train(opt, ours, K, K, skip_some)
    train(ref, theirs, K, K, skip_some)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0 if backend == "torch" else 1e-5, atol=0 if backend == "torch" else 1e-6)


def test_torch_with_lambdalr_into_ours():
    """From torch + LambdaLR: the position comes from per-parameter steps, the peak from initial_lr."""
    s = schedules.get("cosine-10x", 2 * K, warmup=3)
    table = s.table()
    p0 = make_params()
    theirs = clone_params(p0)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    lam = torch.optim.lr_scheduler.LambdaLR(ref, lambda i: float(table[min(i, 2 * K - 1)]))
    train(ref, theirs, 0, K, sched=lam)
    sd = roundtrip(ref.state_dict())

    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = AdamW(ours, lr=123.0, weight_decay=0.1, schedule=s, backend="torch")
    opt.load_state_dict(sd)
    assert int(opt.step_count) == K
    assert opt.param_groups[0]["lr"] == 1e-2  # the peak (initial_lr), not the scheduled LR
    assert opt.state[ours[0]]["step"].device == ours[0].device
    train(ref, theirs, K, K, sched=lam)
    train(opt, ours, K, K)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_position_from_torch_state_when_some_params_lag():
    p = make_params()
    ref = torch.optim.AdamW(p)
    train(ref, p, 0, 7, skip=lambda k, i: i == 0 and k > 2)  # param 0 stops at step 3
    opt = AdamW(clone_params(p), total_steps=20)
    opt.load_state_dict(roundtrip(ref.state_dict()))
    assert int(opt.step_count) == 7  # the largest per-parameter step


def test_schedule_position_is_saved_with_the_schedule():
    p = make_params()
    opt = AdamW(p, total_steps=30, warmup=3)
    train(opt, p, 0, 5)
    sd = opt.state_dict()["d2z"]
    assert int(sd["step_count"]) == 5 and sd["total_steps"] == 30
    # the description says enough to see another schedule, warmup or decay mode on load
    assert sd["schedule"] == {"name": "linear-d2z", "warmup_steps": 3, "decay_to": 0.0}
    assert sd["wd_schedule"] is None and sd["weight_decay_mode"] == "coupled"
    assert int(sd["skipped_steps"]) == 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_like_the_original(backend, how):
    """copy.deepcopy / pickle of model and optimizer together (as torch's own optimizers allow)."""
    import copy
    import pickle

    p = make_params()
    opt = AdamW(p, lr=1e-2, amsgrad=True, total_steps=2 * K, backend=backend)
    train(opt, p, 0, K, skip_some)
    p2, opt2 = copy.deepcopy((p, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((p, opt)))
    assert opt2.state[p2[0]]["exp_avg"] is not opt.state[p[0]]["exp_avg"]
    train(opt, p, K, K, skip_some)
    train(opt2, p2, K, K, skip_some)
    for a, b in zip(p, p2):
        assert torch.equal(a, b)
    assert int(opt2.step_count) == int(opt.step_count) == 2 * K
