"""Drop-in fidelity (torch's AdamW is the reference) and all-or-nothing refusals.

``Snapshot`` records everything a call may change: every parameter, gradient and state tensor
(values, dtype, strides), every group (hyperparameters and parameter identities), the schedule
position, the skipped-step count and the tables. After every refused call it must be bit-identical.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import stat
import subprocess
import sys
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch

from d2z_optim import AdamW, backends, schedules

from .conftest import clone_params, grads_for, make_params, roundtrip


# ------------------------------------------------------------------ the snapshot
class Snapshot:
    def __init__(self, opt, params):
        self.params = params
        self.values = self._values(opt, params)

    @staticmethod
    def _tensor(t):
        return (t.detach().clone(), t.dtype, tuple(t.stride()), t.device) if isinstance(t, torch.Tensor) else t

    def _values(self, opt, params):
        state = {
            i: {k: self._tensor(v) for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state
        }
        groups = [
            {k: (tuple(id(p) for p in v) if k == "params" else self._tensor(v)) for k, v in g.items()}
            for g in opt.param_groups
        ]
        tables = opt._tables
        devices = {
            dev: tuple(self._tensor(t) for t in (ds.lr_table, ds.wd_table, ds.step_count, ds.skipped_steps))
            for dev, ds in tables.devices.items()
        }
        return dict(
            params=[self._tensor(p) for p in params],
            grads=[self._tensor(p.grad) for p in params],
            state=state,
            n_state=len(opt.state),
            groups=groups,
            devices=devices,
            host=(tables.host_steps, tables.lr_host.clone(), tables.wd_host.clone()),
        )

    def assert_unchanged(self, opt):
        now = self._values(opt, self.params)
        _assert_same(now, self.values)


def _assert_same(a, b, where="snapshot"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def trained(backend="torch", steps=3, **kw):
    p = make_params()
    opt = AdamW(p, backend=backend, **kw)
    for k in range(steps):
        for q, g in zip(p, grads_for(k, [tuple(x.shape) for x in p])):
            q.grad = g
        opt.step()
    return p, opt


def refused(opt, params, call, exc=(ValueError, RuntimeError, TypeError), match=None):
    """``call`` raises and changes nothing."""
    snap = Snapshot(opt, params)
    with pytest.raises(exc, match=match):
        call()
    snap.assert_unchanged(opt)


def test_the_snapshot_sees_every_change(backend):
    """The helper can fail: a step, a group's setting, a state tensor's layout, the position."""
    p, opt = trained(backend)
    changes = [
        lambda: opt.step(),
        lambda: opt.param_groups[0].__setitem__("lr", 0.5),
        lambda: opt.state[p[0]].__setitem__("exp_avg", opt.state[p[0]]["exp_avg"].t().contiguous().t()),
        lambda: opt.step_count.add_(1),
        lambda: opt.skipped_steps.add_(1),
    ]
    for change in changes:
        snap = Snapshot(opt, p)
        change()
        with pytest.raises(AssertionError):
            snap.assert_unchanged(opt)


# ------------------------------------------------------- 1. older checkpoints
@pytest.mark.parametrize("missing", ["maximize", "foreach", "capturable", "differentiable", "fused", "amsgrad"])
def test_an_older_checkpoint_without_a_flag_loads_and_steps(backend, missing):
    p, opt = trained(backend)
    sd = roundtrip(opt.state_dict())
    for g in sd["param_groups"]:
        del g[missing]
    del sd["d2z"]  # an older torch's AdamW checkpoint: no d2z entry either
    ours = AdamW(clone_params(p), backend=backend)
    ours.load_state_dict(sd)
    ref = torch.optim.AdamW(clone_params(p))
    ref.load_state_dict(copy.deepcopy(sd))
    assert ours.param_groups[0][missing] == ref.param_groups[0][missing]  # torch's default
    for q in ours.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    ours.step()
    assert int(ours.step_count) == 4


# ------------------------------------------------------- 2. tensor lr of any shape
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_tensor_lr_of_any_one_element_shape(backend, shape):
    p0 = make_params()
    ours, ref = clone_params(p0), clone_params(p0)
    lr = torch.full(shape, 1e-2)
    a = AdamW(ours, lr=lr.clone(), capturable=True, backend=backend, total_steps=5)
    b = AdamW(ref, lr=1e-2, backend=backend, total_steps=5)
    for k in range(5):
        for x, y, g in zip(ours, ref, grads_for(k, [tuple(q.shape) for q in p0])):
            x.grad, y.grad = g, g.clone()
        a.step()
        b.step()
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert a.current_lr()[0].shape == ()


# ------------------------------------------- 3. parameters that change device or dtype
def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(device)


def _train(model, opt, steps=4):
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(8, 6, generator=g, dtype=next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("built", ["on meta", "after to_empty"])
def test_built_on_meta_then_to_empty_steps_like_torch(backend, swap, built):
    """torchtitan / accelerate: parameters made on meta, then to_empty(device=...). With
    swap_module_params_on_conversion the optimizer built on meta keeps the same parameter objects,
    now on the CPU, and steps them; without it to_empty makes new parameters, so an optimizer built
    on meta updates none of them (torch's too) and one built after to_empty steps them."""
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        models, opts = [], []
        for ours in (True, False):
            with torch.device("meta"):
                m = _model("meta")

            def make(ps, ours=ours):
                if ours:
                    return AdamW(ps, lr=1e-2, total_steps=10, backend=backend)
                opt = torch.optim.AdamW(ps, lr=1e-2)
                table = schedules.get("linear-d2z", 10).table()
                lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: float(table[min(i, 9)]))
                step = opt.step
                opt.step = lambda: (step(), lam.step())
                return opt

            opt = make(m.parameters()) if built == "on meta" else None
            m.to_empty(device="cpu")
            torch.manual_seed(1)
            for q in m.parameters():
                torch.nn.init.normal_(q)
            opt = opt if opt is not None else make(m.parameters())
            models.append(m)
            opts.append(opt)
        start = [q.detach().clone() for q in models[0].parameters()]
        for m, o in zip(models, opts):
            _train(m, o)
        stepped = swap or built == "after to_empty"
        assert opts[0].step_count.device.type == "cpu"  # where the position lives either way
        if stepped:
            assert int(opts[0].step_count) == 4 and opts[0].backend_name == backend
        for a, b, s0 in zip(models[0].parameters(), models[1].parameters(), start):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert stepped != torch.equal(a, s0)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_model_double_before_stepping_steps_like_torch(backend):
    a, b = _model(), _model()
    oa = AdamW(a.parameters(), lr=1e-2, backend=backend)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2)
    a.double()
    b.double()
    _train(a, oa)
    _train(b, ob)
    assert oa.state[next(a.parameters())]["exp_avg"].dtype == torch.float64
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_a_state_made_before_its_parameter_changed_dtype_is_refused_naming_it(backend):
    m = _model()
    opt = AdamW(m.parameters(), backend=backend)
    _train(m, opt, 2)
    m.double()
    for q in m.parameters():
        q.grad = torch.ones_like(q)
    params = list(m.parameters())
    refused(opt, params, opt.step, ValueError, match=r"state 'exp_avg' of parameter 0 of group 0 is .*float32")


def test_the_schedule_position_carries_over_to_a_device_met_later():
    """Tables for a device met for the first time start at the current position."""
    from d2z_optim.device_schedule import ScheduleTables

    t = ScheduleTables(schedules.get("linear-d2z", 10), None, 10)
    cpu, other = torch.device("cpu"), torch.device("cpu", 0)  # two keys, one memory: enough to see the copy
    t.use([cpu])
    t.primary.step_count.fill_(7)
    t.primary.skipped_steps.fill_(2)
    early = t.primary  # a reference taken before: its tables stay (a CUDA graph may read them)
    t.use([other])
    assert t.primary_device == other and int(t.primary.step_count) == 7 and int(t.primary.skipped_steps) == 2
    assert t.active == [other] and t.devices[cpu] is early
    t.primary.step_count.fill_(9)
    t.use([cpu, other])  # met again: starts at the current position, and counts the skipped steps
    assert int(t.devices[cpu].step_count) == 9 and int(t.primary.skipped_steps) == 2


# ---------------------------------------------------- 4. fused=True like torch's fused
def test_fused_true_takes_float64_like_torch():
    p0 = make_params(dtype=torch.float64)
    ours, ref = clone_params(p0), clone_params(p0)
    a = AdamW(ours, fused=True, amsgrad=True)
    b = torch.optim.AdamW(ref, fused=True, amsgrad=True)
    assert a.backend_name == "cpu"
    for k in range(6):
        for x, y, g in zip(ours, ref, grads_for(k, [tuple(q.shape) for q in p0], torch.float64)):
            x.grad, y.grad = g, g.clone()
        a.step()
        b.step()
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_fused_true_on_meta_raises_torchs_error_at_the_first_step():
    for cls in (torch.optim.AdamW, AdamW):
        m = _model("meta")
        opt = cls(m.parameters(), fused=True)  # constructs, as torch's does
        for q in m.parameters():
            q.grad = torch.ones_like(q)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point") as e:
            opt.step()
        if cls is torch.optim.AdamW:
            theirs = str(e.value)
    assert str(e.value) == theirs


# ----------------------------------------------------------------- 5. initial_lr
def test_without_a_schedule_initial_lr_loads_exactly_as_torchs():
    p0 = make_params()
    src = torch.optim.AdamW(clone_params(p0), lr=1e-2)
    lam = torch.optim.lr_scheduler.LambdaLR(src, lambda i: 1.0 / (i + 1))
    for k in range(3):
        for q, g in zip(src.param_groups[0]["params"], grads_for(k, [tuple(x.shape) for x in p0])):
            q.grad = g
        src.step()
        lam.step()
    sd = roundtrip(src.state_dict())
    ours, ref = AdamW(clone_params(p0), lr=1e-2), torch.optim.AdamW(clone_params(p0), lr=1e-2)
    ours.load_state_dict(sd)
    ref.load_state_dict(copy.deepcopy(sd))
    for k in ("lr", "initial_lr"):
        assert ours.param_groups[0][k] == ref.param_groups[0][k]
    # a scheduler resumed at an epoch after the load (accelerate's round trip) works as with torch
    for o in (ours, ref):
        sched = torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 / (i + 1), last_epoch=3)
        for q in o.param_groups[0]["params"]:
            q.grad = torch.ones_like(q)
        o.step()
        sched.step()
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


def test_with_a_schedule_a_torch_checkpoints_initial_lr_is_the_peak():
    p0 = make_params()
    src = torch.optim.AdamW(clone_params(p0), lr=3e-3)
    torch.optim.lr_scheduler.LambdaLR(src, lambda i: 0.5)
    ours = AdamW(clone_params(p0), lr=1.0, total_steps=10)
    ours.load_state_dict(roundtrip(src.state_dict()))
    assert ours.param_groups[0]["lr"] == 3e-3 and "initial_lr" not in ours.param_groups[0]


# ------------------------------------------------------------ 6. load is atomic
BAD_ENTRIES = {
    "step_count five": lambda e: e.update(step_count="five"),
    "step_count -3": lambda e: e.update(step_count=torch.tensor(-3)),
    "step_count nan": lambda e: e.update(step_count=torch.tensor(float("nan"))),
    "step_count 5.7": lambda e: e.update(step_count=5.7),
    "step_count two elements": lambda e: e.update(step_count=torch.tensor([1, 2])),
    "no step_count": lambda e: e.pop("step_count"),
    "skipped -1": lambda e: e.update(skipped_steps=-1),
    "schedule 3": lambda e: e.update(schedule=3),
    "mode l2": lambda e: e.update(weight_decay_mode="l2"),
    "not a dict": None,
}


@pytest.mark.parametrize("name", list(BAD_ENTRIES))
def test_a_malformed_d2z_entry_is_refused_before_anything_changes(backend, name):
    p, opt = trained(backend, total_steps=10)
    sd = roundtrip(opt.state_dict())
    if BAD_ENTRIES[name] is None:
        sd["d2z"] = [1, 2]
    else:
        BAD_ENTRIES[name](sd["d2z"])
    for q in p:  # different values to load: a half-done load would show
        q.grad = torch.ones_like(q)
    opt.step()
    refused(opt, p, lambda: opt.load_state_dict(sd), ValueError, match="d2z")


BAD_STATES = {
    "step five": (lambda st: st.update(step="five"), "'step'"),
    "step nan": (lambda st: st.update(step=torch.tensor(float("nan"))), "'step'"),
    "step -1": (lambda st: st.update(step=-1.0), "'step'"),
    "exp_avg None": (lambda st: st.update(exp_avg=None), "'exp_avg'"),
    "exp_avg_sq sparse": (lambda st: st.update(exp_avg_sq=st["exp_avg_sq"].to_sparse()), "'exp_avg_sq'"),
    "no step": (lambda st: st.pop("step"), "no 'step'"),
    "group lr -1": (None, "learning rate"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_a_bad_state_or_group_is_refused_before_anything_changes(backend, name):
    p, opt = trained(backend)
    sd = roundtrip(opt.state_dict())
    mutate, match = BAD_STATES[name]
    if mutate is None:
        sd["param_groups"][0]["lr"] = -1.0
    else:
        mutate(sd["state"][1])
    refused(opt, p, lambda: opt.load_state_dict(sd), ValueError, match=match)


# --------------------------------- 7. states laid out unlike their parameters: converted at load
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "gapped"])
def test_states_in_another_layout_are_converted_at_load(backend, layout):
    p, opt = trained(backend, amsgrad=True)
    sd = roundtrip(opt.state_dict())
    st = sd["state"][0]  # parameter 0 is 33 x 17
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        v = st[k]
        if layout == "transposed":
            st[k] = v.t().contiguous().t()
        elif layout == "channels_last":
            st[k] = v.view(33, 17, 1, 1).contiguous(memory_format=torch.channels_last).view(33, 17)
        else:
            st[k] = torch.zeros(33, 34)[:, ::2].copy_(v)
    a = AdamW(clone_params(p), backend=backend, amsgrad=True)
    a.load_state_dict(sd)
    b = AdamW(clone_params(p), backend=backend, amsgrad=True)
    b.load_state_dict(roundtrip(opt.state_dict()))
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        x = a.state[a.param_groups[0]["params"][0]][k]
        assert x.stride() == (17, 1), (k, x.stride())
    for o in (a, b):
        for q, g in zip(o.param_groups[0]["params"], grads_for(9, [tuple(x.shape) for x in p])):
            q.grad = g
        o.step()
    for x, y in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        assert torch.equal(x, y)


# ---------------------------------------------------------- 8. add_param_group is atomic
def test_add_param_group_refuses_before_appending(backend):
    p, opt = trained(backend)
    extra = [torch.nn.Parameter(torch.randn(4))]
    cases = [
        ({"params": extra, "lr": -1.0}, ValueError, "Invalid learning rate"),
        ({"params": extra, "betas": (1.5, 0.9)}, ValueError, "Invalid beta parameter at index 0"),
        ({"params": extra, "eps": -1.0}, ValueError, "Invalid epsilon"),
        ({"params": extra, "weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
        ({"params": extra, "amsgrad": "yes"}, TypeError, "amsgrad must be a bool"),
        ({"params": extra, "differentiable": True}, ValueError, "differentiable=True is not supported"),
        ({"params": [extra[0], extra[0]]}, ValueError, "lists the same parameter twice"),
        ({"params": [p[0]]}, ValueError, "more than one parameter group"),
    ]
    if backend != "torch":  # a named fused backend cannot take a complex parameter
        cases.append(({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]}, ValueError, "dtype"))
    for group, exc, match in cases:
        given = dict(group)
        refused(opt, p, lambda g=group: opt.add_param_group(g), exc, match=match)
        assert group == given  # the caller's dict is not half-filled either
    assert len(opt.param_groups) == 1


def test_group_settings_given_at_construction_are_checked_as_the_constructors():
    p = make_params()
    for bad, match in (({"lr": -1.0}, "Invalid learning rate"), ({"betas": (0.9, 1.0)}, "index 1")):
        with pytest.raises(ValueError, match=match):
            AdamW([{"params": p[:2]}, {"params": p[2:], **bad}])


def test_auto_gives_a_group_it_cannot_fuse_a_backend_that_can():
    p = make_params()
    opt = AdamW(p)
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt.add_param_group({"params": [z]})
    for q in [*p, z]:
        q.grad = torch.ones_like(q)
    opt.step()
    assert opt.backend_name == "torch" and int(opt.step_count) == 1


# --------------------------------------------------- 9. tables that stay finite in float32
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(schedule=[1.0, 1e39]), "finite in float32.*entry 1"),
        (dict(wd_schedule=[1e39]), "wd_schedule must hold multipliers that are finite in float32"),
        (dict(schedule=schedules.get("step", 10, milestones=[3], gamma=1e20)), None),
        (dict(total_steps=10**13), "total_steps=10000000000000 is too large"),
    ],
)
def test_tables_that_overflow_float32_or_cannot_be_allocated_are_refused(kw, match):
    if match is None:  # the schedule itself was fine (1e20 < float32 max)
        AdamW(make_params(), **kw)
        with pytest.raises(ValueError, match="gamma=1e\\+20 has multiplier 1e\\+40 at step 6"):
            schedules.get("step", 10, milestones=[3, 6], gamma=1e20)
        return
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kw)


def test_a_pickled_optimizer_carries_no_table_it_can_rebuild():
    p = make_params()
    big = AdamW(p, total_steps=1_000_000)
    small = AdamW(p, total_steps=10)
    assert len(pickle.dumps(big)) < len(pickle.dumps(small)) + 2000  # not 4 MB of float32 table
    again = pickle.loads(pickle.dumps(big))
    assert torch.equal(again.lr_table, big.lr_table)


# ------------------------------------------------------------ 10. schedule mismatch on load
@pytest.mark.parametrize(
    "other,match",
    [
        (dict(schedule="cosine-10x", total_steps=20), "schedule is 'linear-d2z', this optimizer's is 'cosine-10x'"),
        (dict(total_steps=20, warmup=5), "warmup_steps=2, this optimizer's has 5"),
        (dict(total_steps=20, weight_decay_mode="independent"), "weight_decay_mode is 'coupled'"),
        (dict(total_steps=20, wd_schedule="linear-d2z"), "wd_schedule is None, this optimizer's is 'linear-d2z'"),
        (dict(total_steps=30), "has 20 steps, this optimizer's has 30"),
    ],
)
def test_loading_another_schedule_warns_naming_what_differs(other, match):
    p, opt = trained(total_steps=20)
    o = AdamW(clone_params(p), **other)
    with pytest.warns(UserWarning, match=match):
        o.load_state_dict(roundtrip(opt.state_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamW(clone_params(p), total_steps=20).load_state_dict(roundtrip(opt.state_dict()))  # same: quiet


# -------------------------------------------------- 11. two threads, 12. cycles, 13. duplicates
def test_steps_from_two_threads_are_serialised(backend):
    p = make_params(shapes=[(257,), (64, 3)])
    opt = AdamW(p, backend=backend, total_steps=1000)
    for q in p:
        q.grad = torch.ones_like(q)
    opt.step()
    n = 40

    def work():
        for _ in range(n):
            opt.step()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(opt.step_count) == 1 + 2 * n
    assert all(float(opt.state[q]["step"]) == 1 + 2 * n for q in p)


def test_a_reference_cycle_through_the_optimizer_is_collected(backend):
    """optimizer -> step holder -> parameter -> optimizer (an attribute of the parameter): the
    collector sees the holder's references to the parameters, so the cycle goes, as torch's does."""
    p = torch.nn.Parameter(torch.randn(64))
    opt = AdamW([p], backend=backend)
    p.owner = opt
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    if backend == "cpu":
        assert opt._cache.lists.holder is not None
    alive = weakref.ref(p), weakref.ref(opt), weakref.ref(opt.state[p]["exp_avg"])
    del p, opt
    gc.collect()
    assert [r() is None for r in alive] == [True, True, True]


def test_a_parameter_listed_twice_is_refused():
    q = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="lists the same parameter twice"):
        AdamW([q, torch.nn.Parameter(torch.ones(2)), q])


# ---------------------------------------------------------------- 14. skip_nonfinite
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.bfloat16])
def test_skip_nonfinite_is_exact_on_first_and_steady_steps(backend, dtype):
    """A finite gradient whose float32 norm overflows (1e20 x 100 elements) is applied, a NaN or an
    Inf anywhere is skipped: on the first step (the lists) and on steady ones (a holder)."""
    if dtype.is_complex and backend != "torch":
        backend = "torch"  # the fused kernels take real parameters
    big = 1e20 if dtype != torch.bfloat16 else 1e38
    p = [torch.nn.Parameter(torch.zeros(100, dtype=dtype)), torch.nn.Parameter(torch.zeros(7, dtype=dtype))]
    opt = AdamW(p, skip_nonfinite=True, backend=backend)
    for k in range(5):
        for q in p:
            q.grad = torch.full_like(q, big)
        if k in (1, 3):
            p[1].grad[k] = float("nan") if k == 1 else float("inf")
        opt.step()
    assert int(opt.step_count) == 3 and int(opt.skipped_steps) == 2


def test_the_nonfinite_scan_copies_no_gradient():
    """Every tensor the scan makes is a scalar (no float32 copy of a bf16 gradient), on both paths."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from d2z_optim.backends import cpp_backend

    class Sizes(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Sizes.biggest = max(Sizes.biggest, t.numel())
            return out

    grads = [torch.randn(100_000).to(torch.bfloat16), torch.randn(10, 10).to(torch.bfloat16)]
    saved = set(cpp_backend._SCAN_DEVICES)
    for scan in (saved, set()):  # the extension's scan, then torch's norms
        cpp_backend._SCAN_DEVICES.clear()
        cpp_backend._SCAN_DEVICES.update(scan)
        Sizes.biggest = 0
        with Sizes():
            found = backends.flag_nonfinite(grads, torch.zeros(()))
        assert float(found) == 0.0 and Sizes.biggest <= len(grads), Sizes.biggest
    cpp_backend._SCAN_DEVICES.update(saved)


# ---------------------------------------------------------------- 15. skipped_steps
def test_skipped_steps_are_saved_and_restored(backend):
    p, opt = trained(backend, skip_nonfinite=True, total_steps=10)
    p[0].grad[0, 0] = float("nan")
    opt.step()
    assert int(opt.skipped_steps) == 1
    o = AdamW(clone_params(p), skip_nonfinite=True, total_steps=10, backend=backend)
    o.load_state_dict(roundtrip(opt.state_dict()))
    assert int(o.skipped_steps) == 1 and int(o.step_count) == 3


# ------------------------------------------------------------ 16. groups still empty
def test_an_optimizer_whose_groups_are_empty():
    opt = AdamW([{"params": []}], total_steps=5)
    assert "Backend: auto" in repr(opt)
    first = 1e-3 * float(schedules.get("linear-d2z", 5).table()[0])
    assert int(opt.step_count) == 0 and opt.current_lr()[0].item() == pytest.approx(first)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == [] and int(sd["d2z"]["step_count"]) == 0
    opt.step()  # nothing to update; the schedule moves, as a host scheduler's would
    assert int(opt.step_count) == 1 and opt.backend_name == "auto"
    q = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [q]})
    q.grad = torch.ones(3)
    opt.step()
    assert int(opt.step_count) == 2 and float(opt.state[q]["step"]) == 1.0


# ------------------------------------------------------- 17. numpy and type checks
def test_numpy_integers_and_arrays_are_taken():
    p = make_params()
    opt = AdamW(p, total_steps=np.int64(20), warmup=np.int32(4))
    assert opt.total_steps == 20 and opt.schedule.warmup_steps == 4
    table = np.linspace(1.0, 0.0, 8)
    opt = AdamW(p, schedule=table)
    torch.testing.assert_close(opt.lr_table, torch.tensor(table, dtype=torch.float32))
    s = schedules.get("step", np.int64(10), milestones=[np.int64(5)], gamma=0.5)
    assert s.params["milestones"] == (5,)


@pytest.mark.parametrize("name", ["amsgrad", "maximize", "capturable", "differentiable", "foreach", "fused"])
def test_flags_are_type_checked_at_construction(name):
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        AdamW(make_params(), **{name: "yes"})
    AdamW(make_params(), **{name: np.bool_(False)})


# -------------------------------------------------- 18. warmup and all-zero schedules
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(warmup=10), "warmup=10 needs total_steps"),
        (dict(schedule=[1.0, 0.5], warmup=1), "warmup=1 has no effect with schedule given as a table"),
        (dict(schedule=schedules.get("constant", 5), warmup=2), "given as a Schedule"),
        (dict(total_steps=1), "every multiplier 0"),
        (dict(schedule=[0.0, 0.0]), "every multiplier 0"),
    ],
)
def test_warmup_that_would_be_ignored_and_all_zero_schedules_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kw)


# ------------------------------------------------------------------------ 19. the CLI
@pytest.mark.parametrize(
    "argv,match",
    [
        (["plot", "linear-d2z", "--steps", "50", "-o", "/nonexistent/dir/x.png"], "does not exist"),
        (["plot", "linear-d2z", "--steps", "50", "-o", ""], "is empty"),
        (["plot", "linear-d2z", "--steps", "50", "-o", "{tmp}"], "is a directory"),
        (["plot", "linear-d2z", "--steps", "50", "-o", "{tmp}/x.nope"], "extension must name an image format"),
        (["plot", "linear-d2z", "--steps", "50", "--dpi", "100000", "-o", "{tmp}/x.png"], "--dpi"),
        (["plot", "linear-d2z", "--steps", "50", "--width", "100000000", "-o", "{tmp}/x.png"], "--width"),
        (["table", "linear-d2z", "--steps", "1000000000000"], "--steps: must be at most"),
        (["describe", "linear-d2z", "--steps", "50", "--lr", "1e308", "--wd", "10"], "not finite"),
        (["plot", "linear-d2z", "--steps", "50", "--lr", "100", "-o", "{tmp}/x.png"], ">= 1"),
        (["table", "linear-d2z", "--steps", "50", "--warmup", "nan"], "--warmup"),
        (["table", "--steps", "x"], "--steps: must be a positive int"),
        (["describe", "wsd", "--steps", "50", "--param", "cooldown=7.5"], "cooldown"),
    ],
)
def test_the_cli_says_what_is_wrong_in_one_line_and_writes_nothing(tmp_path, capsys, argv, match):
    """In process (cli.main, what ``python -m d2z_optim`` calls: a process per case cost ~8 s of
    interpreter and import start-up each); the entry point itself is the test below."""
    from d2z_optim import cli

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and match in lines[0], err
    assert out == "" and list(tmp_path.iterdir()) == []


def test_python_m_d2z_optim_says_what_is_wrong_in_one_line(tmp_path):
    argv = ["plot", "linear-d2z", "--steps", "50", "-o", str(tmp_path / "x.nope")]
    r = subprocess.run([sys.executable, "-m", "d2z_optim", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "extension must name an image format" in lines[0]
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


# ------------------------------------------------ torch's own AdamW configurations and errors
def _torch_optim_info():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_optimizers import optim_db

    return next(oi for oi in optim_db if oi.optim_cls is torch.optim.AdamW)


def test_torchs_own_adamw_configurations_step_like_torch(backend):
    """Every configuration in torch's OptimizerInfo for AdamW (its test suite's inputs), CPU."""
    info = _torch_optim_info()
    for inp in info.optim_inputs_func(device="cpu", dtype=torch.float32):
        kw = dict(inp.kwargs)
        if kw.get("differentiable"):
            continue  # refused by design (README: Limits)
        if kw.get("fused") and backend == "torch":
            continue
        if isinstance(kw.get("lr"), torch.Tensor) and kw.get("foreach") and not kw.get("capturable"):
            continue  # torch refuses it too (a construction error input)
        kw.pop("decoupled_weight_decay", None)
        torch.manual_seed(0)
        p0 = [torch.randn(5, 3), torch.randn(4)]
        ours, ref = clone_params(p0), clone_params(p0)
        ours_kw = dict(kw) if kw.get("fused") or kw.get("foreach") is False else dict(kw, backend=backend)
        a, b = AdamW(ours, **ours_kw), torch.optim.AdamW(ref, **kw)
        for k in range(4):
            for x, y, g in zip(ours, ref, grads_for(k, [(5, 3), (4,)])):
                x.grad, y.grad = g, g.clone()
            a.step()
            b.step()
        for x, y in zip(ours, ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, d=inp.desc: f"{d}: {m}")


def test_torchs_own_adamw_error_inputs_raise_torchs_errors():
    info = _torch_optim_info()
    for err in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        oi = err.optimizer_error_input
        params, kw = oi.params, dict(oi.kwargs)
        if err.error_on.name != "CONSTRUCTION_ERROR":
            continue
        if err.error_type is UserWarning:  # a parameter listed twice: torch warns, we refuse (by design)
            assert "duplicate" in oi.desc
            with pytest.raises(ValueError, match="lists the same parameter twice"):
                AdamW(params, **kw)
            continue
        with pytest.raises(err.error_type) as theirs:
            torch.optim.AdamW(params, **kw)
        with pytest.raises(err.error_type) as ours:
            AdamW(params, **kw)
        assert str(ours.value) == str(theirs.value), oi.desc


# ------------------------------------------------------------- found by review (regressions)
def test_flags_set_after_construction_take_effect(backend):
    p = [torch.nn.Parameter(torch.ones(4))]
    opt = AdamW(p, backend=backend, lr=0.5, weight_decay=0.5)
    opt.skip_nonfinite = True
    p[0].grad = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    opt.step()
    assert int(opt.skipped_steps) == 1 and torch.equal(p[0], torch.ones(4))
    opt.weight_decay_mode = "independent"  # decay by wd * m = 0.5, not lr * wd = 0.25
    p[0].grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(p[0].detach(), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="weight_decay_mode must be one of"):
        opt.weight_decay_mode = "l2"
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        opt.skip_nonfinite = "yes"


def test_numpy_bool_flags_mean_what_python_bools_mean():
    assert AdamW(make_params(), fused=np.False_).backend_name == "torch"
    with pytest.raises(ValueError, match="contradicts"):
        AdamW(make_params(), fused=np.False_, backend="cpu")


def test_a_refused_step_after_a_resize_changes_nothing(backend):
    p = [torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(3))]
    opt = AdamW(p, backend=backend)
    for q in p:
        q.grad = torch.ones_like(q)
    opt.step()
    p[0].data = torch.ones(7)
    p[0].grad = torch.ones(7)
    refused(opt, p, opt.step, ValueError, match="state 'exp_avg' of parameter 0 of group 0")


def test_floating_states_of_another_dtype_are_cast_at_load_as_torch_does(backend):
    m = _model()
    opt = AdamW(m.parameters(), backend=backend)
    _train(m, opt, 2)
    sd = roundtrip(opt.state_dict())  # float32 states
    m64 = _model().double()
    ours, ref = AdamW(m64.parameters(), backend=backend), torch.optim.AdamW(_model().double().parameters())
    ours.load_state_dict(sd)
    ref.load_state_dict(copy.deepcopy(sd))
    assert ours.state[next(m64.parameters())]["exp_avg"].dtype == torch.float64
    _train(m64, ours, 2)


def test_a_parameter_that_takes_another_memory_layout_keeps_training(backend):
    torch.manual_seed(0)
    ms = [torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)]
    ms[1].load_state_dict(ms[0].state_dict())
    opts = [AdamW(ms[0].parameters(), backend=backend), torch.optim.AdamW(ms[1].parameters())]
    x = torch.randn(2, 3, 8, 8)
    for k in range(4):
        if k == 2:
            for m in ms:
                m.to(memory_format=torch.channels_last)
        for m, o in zip(ms, opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(ms[0].parameters(), ms[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_pre_hooks_run_before_the_checks_and_post_hooks_after_the_position():
    p, opt = trained(total_steps=10)
    sd = roundtrip(opt.state_dict())
    for st in sd["state"].values():
        del st["step"]  # broken; the hook below repairs it
    o = AdamW(clone_params(p), total_steps=10)
    o.register_load_state_dict_pre_hook(
        lambda opt, sd: {**sd, "state": {k: {**v, "step": torch.tensor(3.0)} for k, v in sd["state"].items()}}
    )
    seen = []
    o.register_load_state_dict_post_hook(lambda opt: seen.append(int(opt.step_count)))
    o.load_state_dict(sd)
    assert seen == [3]


@pytest.mark.parametrize("flow", ["double", "meta"])
def test_a_compiled_step_meets_parameters_that_moved_since_construction(flow):
    import torch._dynamo

    torch._dynamo.reset()
    torch.__future__.set_swap_module_params_on_conversion(flow == "meta")
    try:
        m = _model("meta" if flow == "meta" else "cpu")
        opt = AdamW(m.parameters(), lr=1e-2, total_steps=10)
        if flow == "meta":
            m.to_empty(device="cpu")
            for q in m.parameters():
                torch.nn.init.normal_(q)
        else:
            m.double()
        step = torch.compile(opt.step, fullgraph=True)
        for _ in range(3):
            for q in m.parameters():
                q.grad = torch.ones_like(q)
            step()
        assert int(opt.step_count) == 3 and opt.backend_name == "cpu"
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_warmup_with_one_named_schedule_and_one_table():
    opt = AdamW(make_params(), total_steps=10, warmup=2, wd_schedule=[1.0] * 10)
    assert opt.schedule.warmup_steps == 2
    AdamW(make_params(), schedule=[1.0] * 10, wd_schedule="cosine", total_steps=10, warmup=2)


def test_schedules_of_every_origin_copy_and_pickle():
    built = [
        schedules.get("wsd", 20, cooldown=0.3),
        schedules.from_values([1.0, 0.5, 0.25], name="cosine"),
        schedules.Schedule("mine", 3, 0, lambda i: 1.0 / (i + 1.0)),
    ]
    for s in built:
        for again in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
            assert torch.equal(again.table(), s.table())


def test_parameters_sharing_memory_are_refused_by_the_fused_kernels(backend):
    base = torch.zeros(8)
    p = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]
    opt = AdamW(p, backend=backend)
    for q in p:
        q.grad = torch.ones_like(q)
    if backend == "torch":  # one after the other, as torch does
        opt.step()
        return
    refused(opt, p, opt.step, ValueError, match="parameter 0 of group 0 and parameter 1 of group 0 share memory")


def test_the_cli_writes_with_the_umask_and_through_a_symlink(tmp_path, capsys):
    """In process, as the refusals above (cli.main, what ``python -m d2z_optim`` calls; the umask is
    this process's, as a child's would be); the entry point itself is the test above it."""
    from d2z_optim import cli

    target = tmp_path / "real.png"
    target.write_bytes(b"")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    code = cli.main(["plot", "linear-d2z", "--steps", "20", "-o", str(link)])
    assert code == 0, capsys.readouterr().err
    assert link.is_symlink() and target.stat().st_size > 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


DTENSOR_SCRIPT = """
import os, torch, torch.distributed as dist
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh
from d2z_optim import AdamW
dist.init_process_group("gloo", init_method="file://" + os.environ["D2Z_INIT_FILE"], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
dt = lambda v: distribute_tensor(v, mesh, [Replicate()])
for how in ("swap_tensors", "to_empty"):
    for backend in ("torch", "cpu"):
        m = torch.nn.Linear(8, 1, bias=False)
        m.weight = torch.nn.Parameter(dt(torch.ones(1, 8)))
        opt = AdamW(m.parameters(), lr=0.1, weight_decay=0.0, backend=backend)
        m.weight.grad = dt(torch.ones(1, 8))
        opt.step()
        p = m.weight
        if how == "swap_tensors":
            torch.utils.swap_tensors(p, torch.nn.Parameter(dt(torch.full((1, 8), 5.0))))
        else:
            m.to_empty(device="cpu")
            torch.nn.init.constant_(m.weight, 5.0)
        p.grad = dt(torch.ones(1, 8))
        before = p.to_local().clone()
        opt.step()
        assert not torch.equal(before, p.to_local()), (how, backend)
dist.destroy_process_group()
print("OK")
"""


def test_dtensor_parameters_given_a_new_local_tensor_keep_training(tmp_path):
    """FSDP2's DTensors: swap_tensors and Module._apply give them a new local tensor; the step must
    update it (the local shards are taken anew each step), as torch's AdamW does."""
    env = dict(os.environ, D2Z_INIT_FILE=str(tmp_path / "pg"))
    r = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
