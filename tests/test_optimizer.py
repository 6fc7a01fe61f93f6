"""d2z_optim.AdamW against torch.optim.AdamW (for-loop, foreach, fused) and a float64 reference.

Tolerances. The torch backend does torch's own operations in torch's order with
the same float64 scalars, so it must be *bitwise* equal to torch's for-loop and
foreach paths. Fused kernels (ours with fma, torch's fused CPU kernel) round in
another order: each step differs by a few ulp, so after 60 steps we allow
rtol 1e-5 / atol 1e-6 on parameters of order 1 (measured: 2.4e-7 max abs).
"""

import math
import warnings

import pytest
import torch

from d2z_optim import AdamW, schedules
from d2z_optim.backends import cpp_backend

from .conftest import BACKENDS, SHAPES, Fp64AdamW, clone_params, grads_for, make_params, roundtrip, run

STEPS = 60
TORCH_PATHS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
OPTIONS = [
    dict(),
    dict(amsgrad=True),
    dict(maximize=True),
    dict(weight_decay=0.0),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3, amsgrad=True, maximize=True),
]


def assert_same(ours, ref, exact):
    for a, b in zip(ours, ref):
        if exact:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def skip_some(k, i):
    """Some parameters have no gradient on some steps (their per-parameter step lags)."""
    return (i == 1 and k % 3 == 0) or (i == 4 and k < 5)


@pytest.mark.parametrize("path", list(TORCH_PATHS))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_torch_without_schedule(backend, path, opts):
    p0 = make_params()
    ours, ref = clone_params(p0), clone_params(p0)
    run(lambda p: AdamW(p, backend=backend, **opts), ours, STEPS, skip=skip_some)
    run(lambda p: torch.optim.AdamW(p, **opts, **TORCH_PATHS[path]), ref, STEPS, skip=skip_some)
    assert_same(ours, ref, exact=(backend == "torch" and path != "fused"))


def test_torch_backend_for_loop_path_matches(backend):
    p0 = make_params()
    ours, ref = clone_params(p0), clone_params(p0)
    run(lambda p: AdamW(p, foreach=False, backend=backend, amsgrad=True), ours, STEPS, skip=skip_some)
    run(lambda p: torch.optim.AdamW(p, foreach=False, amsgrad=True), ref, STEPS, skip=skip_some)
    assert_same(ours, ref, exact=(backend == "torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.5, 0.9])
def test_first_moment_is_torchs_lerp_bit_for_bit(backend, beta1, dtype):
    """m = lerp(m, g, 1 - beta1) as ATen rounds it: for weights >= 0.5 (beta1 <= 0.5) ATen uses
    g - (g - m) * beta1, so beta1 = 0 gives m = g exactly; m + w * (g - m) would lose the low bits
    of small gradients next to a large m (found by test_fuzz: 5e-6 error on a 0.27 parameter)."""
    p0 = make_params(dtype=dtype)
    ours, ref = clone_params(p0), clone_params(p0)
    opts = dict(betas=(beta1, 0.999), weight_decay=0.1)
    a = run(lambda p: AdamW(p, backend=backend, **opts), ours, 5)
    b = run(lambda p: torch.optim.AdamW(p, foreach=True, **opts), ref, 5)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(a.state[x]["exp_avg"], b.state[y]["exp_avg"], rtol=0, atol=0)
    if beta1 == 0.0:
        for x in ours:
            torch.testing.assert_close(a.state[x]["exp_avg"], x.grad, rtol=0, atol=0)


def groups_of(params, lrs=(1e-3, 3e-2, 1e-2), wds=(0.0, 0.1, 0.05)):
    return [
        {"params": params[0:2], "lr": lrs[0], "weight_decay": wds[0]},
        {"params": params[2:4], "lr": lrs[1], "weight_decay": wds[1], "amsgrad": True},
        {"params": params[4:], "lr": lrs[2], "weight_decay": wds[2], "betas": (0.95, 0.98)},
    ]


@pytest.mark.parametrize("path", ["forloop", "foreach"])
def test_several_groups_with_their_own_hyperparameters(backend, path):
    p0 = make_params()
    ours, ref = clone_params(p0), clone_params(p0)
    run(lambda p: AdamW(groups_of(p), backend=backend), ours, STEPS, skip=skip_some)
    run(lambda p: torch.optim.AdamW(groups_of(p), **TORCH_PATHS[path]), ref, STEPS, skip=skip_some)
    assert_same(ours, ref, exact=(backend == "torch"))


@pytest.mark.parametrize("path", ["forloop", "foreach"])
def test_complex_parameters_like_torch(path):
    g = torch.Generator().manual_seed(3)
    p0 = [
        torch.nn.Parameter(torch.randn(7, 3, dtype=torch.complex64, generator=g)),
        torch.nn.Parameter(torch.randn(4)),
    ]
    ours, ref = clone_params(p0), clone_params(p0)
    for opt, ps in (
        (AdamW(ours, amsgrad=True, maximize=True, backend="torch"), ours),
        (torch.optim.AdamW(ref, amsgrad=True, maximize=True, **TORCH_PATHS[path]), ref),
    ):
        gg = torch.Generator().manual_seed(4)
        for _ in range(STEPS):
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gg)
            opt.step()
    assert_same(ours, ref, exact=True)


def test_float64_parameters_match_the_fp64_reference(backend):
    """float64 on every backend (torch's fused AdamW takes it too: math in float64)."""
    s = schedules.get("cosine-10x", STEPS, warmup=6)
    p0 = make_params(dtype=torch.float64)
    ours = clone_params(p0)
    ref = Fp64AdamW(p0, lr=1e-2, weight_decay=0.1, amsgrad=True, mult=s.multiplier)
    run(lambda p: AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, schedule=s, backend=backend), ours, STEPS)
    for k in range(STEPS):
        ref.step(grads_for(k, SHAPES, torch.float64))
    # the only difference: the table is float32, so multipliers differ by <= 2^-24 relative
    for a, b in zip(ours, ref.p):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------- schedules
SCHED_CASES = {n: {} for n in schedules.names() if n != "custom"}
SCHED_CASES["rational"] = {"peak_lr": 1e-2, "weight_decay": 0.1}
SCHED_CASES["step"] = {"milestones": [20, 40], "gamma": 0.3}
SCHED_CASES["cyclic"] = {"period": 16, "low": 0.2}


@pytest.mark.parametrize("name", list(SCHED_CASES))
def test_every_schedule_matches_torch_with_lambdalr(backend, name):
    s = schedules.get(name, STEPS, warmup=0.1, **SCHED_CASES[name])
    table = s.table()
    p0 = make_params()
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=(name == "wsd"))
    ours, exact_ref, f64_ref = clone_params(p0), clone_params(p0), clone_params(p0)
    opt = run(lambda p: AdamW(p, schedule=s, backend=backend, **kw), ours, STEPS, skip=skip_some)
    # LambdaLR fed the float32 table: the same LR as ours, bit for bit
    run(
        lambda p: torch.optim.AdamW(p, foreach=False, **kw),
        exact_ref,
        STEPS,
        skip=skip_some,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda i: float(table[min(i, STEPS - 1)])),
    )
    assert_same(ours, exact_ref, exact=(backend == "torch"))
    # LambdaLR fed the float64 multipliers: LRs differ by the float32 rounding of the table
    run(
        lambda p: torch.optim.AdamW(p, foreach=True, **kw),
        f64_ref,
        STEPS,
        skip=skip_some,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, s.multiplier),
    )
    assert_same(ours, f64_ref, exact=False)
    assert int(opt.step_count) == STEPS


@pytest.mark.parametrize("mode", ["coupled", "independent"])
def test_wd_schedule_and_decay_modes_match_the_fp64_reference(backend, mode):
    s = schedules.get("linear-d2z", STEPS, warmup=5)
    wd_s = schedules.get("cosine", STEPS, warmup=0, decay_to=0.3)
    kw = dict(lr=2e-2, weight_decay=0.2)
    p0 = make_params()
    ours = clone_params(p0)
    run(
        lambda p: AdamW(p, schedule=s, wd_schedule=wd_s, weight_decay_mode=mode, backend=backend, **kw),
        ours,
        STEPS,
    )
    ref = Fp64AdamW(
        p0,
        mult=lambda i: float(s.table()[i]),
        wd_mult=lambda i: float(wd_s.table()[i]),
        independent=(mode == "independent"),
        **kw,
    )
    for k in range(STEPS):
        ref.step(grads_for(k, SHAPES))
    for a, b in zip(ours, ref.p):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_independent_decay_does_not_scale_with_peak_lr():
    """independent: p -= wd * table[t] * p, whatever the peak LR (zero grads isolate the decay)."""
    for lr in (1e-3, 1.0):
        p = torch.nn.Parameter(torch.full((4,), 2.0))
        opt = AdamW([p], lr=lr, weight_decay=0.1, schedule=[0.5, 0.25], weight_decay_mode="independent")
        p.grad = torch.zeros(4)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 * (1 - 0.1 * 0.5)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_no_worse_than_torch(backend, dtype):
    """bf16/fp16: error vs fp64 <= 2x torch's error at the same precision + atol (flash-attention's form)."""
    p0 = make_params(dtype=dtype)
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours, theirs = clone_params(p0), clone_params(p0)
    run(lambda p: AdamW(p, schedule="linear-d2z", total_steps=STEPS, backend=backend, **kw), ours, STEPS)
    s = schedules.get("linear-d2z", STEPS)
    # torch's fused kernel also does fp32 math (its for-loop path overflows to inf in fp16)
    run(
        lambda p: torch.optim.AdamW(p, fused=True, **kw),
        theirs,
        STEPS,
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, s.multiplier),
    )
    ref = Fp64AdamW(p0, mult=s.multiplier, **kw)
    for k in range(STEPS):
        ref.step(grads_for(k, SHAPES, dtype))
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-3  # about one ulp at |p| ~ 1-2
    for a, b, r in zip(ours, theirs, ref.p):
        if r.numel():
            err_ours = (a.double() - r).abs().max().item()
            err_torch = (b.double() - r).abs().max().item()
            assert math.isfinite(err_torch)
            assert err_ours <= 2 * err_torch + atol, (err_ours, err_torch)


# ------------------------------------------------------- device-side schedule
def test_default_with_total_steps_is_the_papers_recipe():
    p = make_params()
    opt = AdamW(p, total_steps=200)
    assert opt.schedule.name == "linear-d2z" and opt.schedule.warmup_steps == 20
    torch.testing.assert_close(opt.lr_table, schedules.get("linear-d2z", 200).table(), rtol=0, atol=0)
    assert AdamW(p).schedule is None and AdamW(p).lr_table.tolist() == [1.0]


def test_step_count_and_current_lr_on_device():
    p = make_params()
    opt = AdamW([{"params": p[:2], "lr": 1e-2}, {"params": p[2:], "lr": 1e-3}], total_steps=10, warmup=2)
    assert opt.step_count.dtype == torch.int64 and opt.step_count.dim() == 0
    assert opt.lr_table.dtype == torch.float32 and opt.wd_table.tolist() == [1.0] * 10
    lrs = opt.current_lr()
    assert all(isinstance(x, torch.Tensor) and x.device == p[0].device for x in lrs)
    assert [x.item() for x in lrs] == pytest.approx([0.5e-2, 0.5e-3])  # first step: warmup 1/2
    run(lambda q: opt, p, 3)
    assert int(opt.step_count) == 3
    m = float(opt.lr_table[3])
    assert [x.item() for x in opt.current_lr()] == pytest.approx([1e-2 * m, 1e-3 * m], rel=1e-12)


def test_past_the_end_reuses_the_last_multiplier_and_warns_once():
    p = make_params()
    opt = AdamW(p, schedule=[1.0, 0.5, 0.25])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run(lambda q: opt, p, 6)
    msgs = [str(x.message) for x in w if "total_steps=3" in str(x.message)]
    assert len(msgs) == 1, msgs
    assert int(opt.step_count) == 6 and opt.current_lr()[0].item() == pytest.approx(0.25e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(lambda q: AdamW(q), make_params(), 5)  # schedule=None never runs out: no warning


def test_schedule_forms_accepted():
    p = make_params()
    for form in ("cosine-10x", schedules.get("cosine-10x", 50), [1.0] * 50, torch.ones(50)):
        opt = AdamW(p, schedule=form, total_steps=50)
        assert opt.lr_table.shape == (50,)
    opt = AdamW(p, schedule="rational", lr=1e-2, weight_decay=0.1, total_steps=50)
    assert opt.schedule.params == {"peak_lr": 1e-2, "weight_decay": 0.1}


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p])

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0


def test_the_cached_step_layout_follows_every_change(backend):
    """The step's tensor lists are reused across steps; each change that alters them is seen:
    parameters gaining or losing gradients, a new group, loaded state, a state tensor or a
    parameter's whole state dict replaced by the user (e.g. states moved to another device), a
    parameter swapped in place in its group's list."""
    p0 = make_params()
    ours, ref = clone_params(p0), clone_params(p0)
    kw = dict(lr=1e-2, weight_decay=0.1)
    a = AdamW(ours[:3], backend=backend, **kw)
    b = AdamW(ref[:3], backend="torch", **kw)

    def steps(k0, n, skip=lambda k, i: False):
        for k in range(k0, k0 + n):
            for i, (x, y, g) in enumerate(zip(ours, ref, grads_for(k, [tuple(q.shape) for q in p0]))):
                x.grad = y.grad = None if skip(k, i) else g
            a.step()
            b.step()
        for x, y in zip(ours, ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            for k in a.state[x]:
                torch.testing.assert_close(a.state[x][k], b.state[y][k], rtol=1e-5, atol=1e-6)

    steps(0, 3)
    steps(3, 3, skip=lambda k, i: i == 1)  # a parameter without gradient: not updated, step lags
    a.add_param_group({"params": ours[3:]})
    b.add_param_group({"params": ref[3:]})
    steps(6, 3)
    a.load_state_dict(a.state_dict())
    b.load_state_dict(b.state_dict())
    steps(9, 2)
    for opt, ps in ((a, ours), (b, ref)):  # same state values, new tensors: the step must use them
        st = opt.state[ps[0]]
        st["exp_avg"] = st["exp_avg"].clone()
    steps(11, 2)
    for opt, ps in ((a, ours), (b, ref)):  # a whole state dict replaced
        opt.state[ps[2]] = {k: v.clone() for k, v in opt.state[ps[2]].items()}
    steps(13, 2)
    for opt, ps in ((a, ours), (b, ref)):  # a parameter swapped in place in its group's list
        fresh = torch.nn.Parameter(ps[1].detach().clone())
        opt.param_groups[0]["params"][1] = fresh
        ps[1] = fresh
    start = ours[1].detach().clone()
    steps(15, 2)
    assert not torch.equal(ours[1], start) and len(a.state[ours[1]]) > 0  # the new one is stepped


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_steady_state_cpu_steps_go_through_one_plan_bitwise_equal_to_the_op(skip_nonfinite, monkeypatch):
    """The cpu backend hands its lists to a C++ step holder once (d2z_optim._C.CpuStepHolder) and then
    steps with the schedule tensors only, reading gradients in C++: same kernel, same bits as
    handing the op every list each step. New gradient tensors each step keep the same plan.
    With skip_nonfinite the plan scans the gradients in C++ (the lists path: a norm per tensor);
    a NaN at step 3 is skipped by both."""
    p0 = make_params()
    ours, lists = clone_params(p0), clone_params(p0)
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, total_steps=8, skip_nonfinite=skip_nonfinite)
    a = AdamW(ours[:4], backend="cpu", **kw)
    a.add_param_group({"params": ours[4:], "lr": 3e-3, "amsgrad": False})
    b = AdamW(lists[:4], backend="cpu", **kw)
    b.add_param_group({"params": lists[4:], "lr": 3e-3, "amsgrad": False})
    layouts, plan_steps = set(), []
    real_step = cpp_backend.CpuStepHolder.step
    monkeypatch.setattr(
        cpp_backend.CpuStepHolder, "step", lambda plan, *a: plan_steps.append(plan) or real_step(plan, *a)
    )
    for k in range(6):
        gs = grads_for(k, [tuple(q.shape) for q in p0])
        if k == 3 and skip_nonfinite:
            gs[0][0, 1] = float("nan")
        for x, y, g in zip(ours, lists, gs):
            x.grad, y.grad = g, g.clone()
        a.step()
        b.step()
        b._cache.lists.holder = None  # b hands the op its lists every step
        layouts.add(id(a._cache.lists))
    assert a._cache.lists.holder is not None and len(layouts) == 1
    assert plan_steps == [a._cache.lists.holder] * 5  # a's steps after the first; never b's
    for x, y in zip(ours, lists):
        assert torch.equal(x, y)
        for key in a.state[x]:
            assert torch.equal(a.state[x][key], b.state[y][key]), key
    skipped = 1 if skip_nonfinite else 0
    assert int(a.step_count) == int(b.step_count) == 6 - skipped
    assert int(a.skipped_steps) == int(b.skipped_steps) == skipped


def test_swap_tensors_on_parameters_works_with_a_stepped_optimizer(backend):
    """torch.utils.swap_tensors (Module.to / load_state_dict with swap_module_params_on_conversion)
    keeps a parameter's Python object and gives it another tensor: allowed after steps (the cpu
    backend's plan holds parameters weakly), and the next steps update the new tensor, like torch."""
    p0 = make_params()
    ours, ref = clone_params(p0), clone_params(p0)
    a = AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    b = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=True)
    shapes = [tuple(q.shape) for q in p0]
    for k in range(6):
        if k == 3:
            for x, y in zip(ours, ref):  # new tensors with the same values, swapped in
                fresh_x, fresh_y = torch.nn.Parameter(x.detach() * 1.5), torch.nn.Parameter(y.detach() * 1.5)
                x.grad = y.grad = None
                torch.utils.swap_tensors(x, fresh_x)
                torch.utils.swap_tensors(y, fresh_y)
        for x, y, g in zip(ours, ref, grads_for(k, shapes)):
            x.grad, y.grad = g, g.clone()
        a.step()
        b.step()
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_a_bad_gradient_after_good_steps_raises_and_writes_nothing(backend):
    p = make_params()
    opt = AdamW(p, backend=backend)
    for _ in range(2):
        for q in p:
            q.grad = torch.ones_like(q)
        opt.step()
    before = [q.detach().clone() for q in p] + [v.clone() for q in p for v in opt.state[q].values()]
    p[1].grad = torch.ones(p[1].shape).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    p[1].grad = torch.ones_like(p[1])
    p[1].data = torch.zeros(p[1].numel() + 2)  # torch checks grads on assignment, not after .data swaps
    with pytest.raises(RuntimeError, match="grad of a parameter must match it"):
        opt.step()
    p[1].data = before[1].clone()
    after = [q.detach().clone() for q in p] + [v.clone() for q in p for v in opt.state[q].values()]
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert int(opt.step_count) == 2


def test_channels_last_params_and_strided_grads_like_torch(backend):
    """Layouts torch's AdamW takes: a channels_last parameter (its grads and states channels_last
    too), and gradients laid out unlike their parameter (transposed, expanded). The fused kernels
    walk a parameter's block of memory; a gradient in another layout is copied into the
    parameter's first (never written)."""
    g = torch.Generator().manual_seed(7)
    p0 = [
        torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        torch.randn(4, 6, generator=g),
        torch.randn(5, 3, generator=g),
    ]
    ours = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in p0]
    ref = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in p0]
    a = AdamW(ours, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=backend)
    b = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True)
    for _ in range(5):
        gs = [
            torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
            torch.randn(6, 4, generator=g).t(),  # transposed: not the parameter's layout
            torch.randn(1, 3, generator=g).expand(5, 3),  # expanded: overlapping
        ]
        for x, y, gr in zip(ours, ref, gs):
            x.grad, y.grad = gr, gr.clone(memory_format=torch.preserve_format)
        before = [gr.clone(memory_format=torch.preserve_format) for gr in gs]
        a.step()
        b.step()
        for gr, bb in zip(gs, before):
            assert torch.equal(gr, bb)  # gradients are read, never written
    assert a.state[ours[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        for key in a.state[x]:
            torch.testing.assert_close(a.state[x][key], b.state[y][key], rtol=1e-5, atol=1e-6)


def test_a_parameter_with_gaps_goes_to_the_torch_backend_or_is_refused():
    """A parameter that is a strided view with gaps cannot be walked as one block by the fused
    kernels: "auto" gives its device the torch backend; naming a fused backend is an error."""
    gapped = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    assert not gapped.is_contiguous()
    assert AdamW([gapped]).backend_name == "torch"
    fused = [n for n in BACKENDS if n != "torch"]
    for name in fused:
        with pytest.raises(ValueError, match="fill one block of memory"):
            AdamW([gapped], backend=name)


def test_a_gradient_that_changes_layout_mid_run_is_still_taken(backend):
    """Steady-state steps leave the gradient checks to the fused op; when a gradient arrives in
    another layout than before (here: transposed from step 3 on), the op refuses without writing,
    the gradient is copied into its parameter's layout and the step retried."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(4, 6, generator=g)
    ours, ref = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    a = AdamW([ours], lr=1e-2, backend=backend)
    b = torch.optim.AdamW([ref], lr=1e-2, foreach=True)
    for k in range(6):
        gr = torch.randn(6, 4, generator=g).t() if k >= 3 else torch.randn(4, 6, generator=g)
        ours.grad, ref.grad = gr, gr.clone()
        a.step()
        b.step()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert int(a.step_count) == 6


def test_steady_steps_see_an_unchanged_state_in_one_comparison(backend):
    """opt.state, each parameter's state and each group's params count their changes
    (d2z_optim.tracked): the cached lists see "unchanged" without walking every parameter. A
    plain dict put in the state is seen as well (then by identity, as before)."""
    p = make_params()
    opt = AdamW(p, backend=backend)
    run(lambda q: opt, p, 2)
    lists = opt._cache.lists
    assert lists.counted and type(opt.state).__name__ == "OptimizerState"
    before = lists.changes
    run(lambda q: opt, p, 2)
    assert opt._cache.lists is lists and lists.changes == before  # nothing counted, nothing rebuilt
    opt.state[p[0]] = dict(opt.state[p[0]])  # a plain dict: counted as a change, then checked by identity
    run(lambda q: opt, p, 1)
    assert opt._cache.lists is not lists and not opt._cache.lists.counted
    opt.load_state_dict(roundtrip(opt.state_dict()))  # loading makes every state counted again
    run(lambda q: opt, p, 1)
    assert opt._cache.lists.counted and type(opt.state[p[0]]).__name__ == "ParamState"
    assert all(type(v) is dict for v in opt.state_dict()["state"].values())  # saved as plain dicts
