"""Reliability: AMP and non-finite steps decided on the device, torch.compile, CUDA graphs,
checkpoint errors, long runs."""

import copy
import warnings

import pytest
import torch

from d2z_optim import AdamW, schedules

from .conftest import clone_params, make_params, roundtrip
from .test_no_sync import HOST_READS, Recorder


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batch(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(before, opt, params):
    ps, sd = before
    for a, b in zip(params, ps):
        assert torch.equal(a, b)
    now = opt.state_dict()
    for k, st in sd["state"].items():
        for key, v in st.items():
            assert torch.equal(now["state"][k][key], v), key
    assert torch.equal(now["d2z"]["step_count"], sd["d2z"]["step_count"])


# ------------------------------------------------------------------- AMP
def amp_train(make_opt, steps=12, overflow_at=(4,), scheduler=None):
    model = tiny_model()
    opt = make_opt(model.parameters())
    sched = scheduler(opt) if scheduler else None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(steps):
        x, y = batch(k)
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        if k in overflow_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if sched is not None and k not in overflow_at:  # torch: only a step that ran may move the schedule
            sched.step()
    return model, opt, scaler


def test_grad_scaler_drives_d2z_like_torch_fused(backend):
    s = schedules.get("linear-d2z", 12, warmup=2)
    ours, opt, scaler = amp_train(lambda p: AdamW(p, lr=1e-2, schedule=s, backend=backend))
    theirs, _, _ = amp_train(
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda i: float(s.table()[i])),
    )
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(opt.step_count) == 11 and int(opt.skipped_steps) == 1  # the schedule did not drift
    assert scaler.get_scale() == 2.0**9  # the overflow halved the scale


def test_grad_scaler_step_has_no_host_sync(backend):
    model = tiny_model()
    opt = AdamW(model.parameters(), total_steps=10, backend=backend)
    scaler = torch.amp.GradScaler("cpu")
    for k in range(3):
        x, y = batch(k)
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        with Recorder() as rec:
            scaler.step(opt)
        assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
        scaler.update()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_skip_nonfinite_makes_the_step_a_no_op_without_sync(backend, bad):
    p = make_params()
    opt = AdamW(p, total_steps=20, skip_nonfinite=True, amsgrad=True, backend=backend)
    for q in p:
        q.grad = torch.ones_like(q)
    opt.step()
    before = snapshot(opt, p)
    p[2].grad[7] = bad
    with Recorder() as rec:
        opt.step()
    assert not (set(rec.ops) & HOST_READS)
    assert_unchanged(before, opt, p)
    assert int(opt.skipped_steps) == 1 and int(opt.step_count) == 1
    p[2].grad[7] = 1.0
    opt.step()  # a finite step runs again
    assert int(opt.step_count) == 2 and not torch.equal(p[0], before[0][0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_skip_nonfinite_takes_large_finite_half_gradients(backend, dtype):
    """A half-precision gradient whose norm would overflow in its own dtype (1000 x 10,000
    elements: norm 1e5 > 65504) is finite: the step runs (the check works in float32 or on the
    bits), on the first step (lists) and the next ones (the cpu backend's plan)."""
    p = [torch.nn.Parameter(torch.zeros(10_000, dtype=dtype))]
    opt = AdamW(p, lr=1e-3, skip_nonfinite=True, backend=backend)
    for _ in range(3):
        p[0].grad = torch.full((10_000,), 1000.0, dtype=dtype)
        opt.step()
    assert int(opt.step_count) == 3 and int(opt.skipped_steps) == 0
    assert torch.all(p[0] < 0)


def test_skip_nonfinite_off_by_default_and_finite_steps_are_unchanged(backend):
    p0 = make_params()
    a, b = clone_params(p0), clone_params(p0)
    oa, ob = AdamW(a, backend=backend), AdamW(b, backend=backend, skip_nonfinite=True)
    for _ in range(5):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert int(ob.skipped_steps) == 0


# ------------------------------------------------------------ torch.compile
def test_compiled_step_fullgraph_no_recompiles_while_lr_changes(backend):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    p0 = make_params(shapes=[(64, 8), (8,)])
    ours, ref = clone_params(p0), clone_params(p0)
    opt = AdamW(ours, lr=1e-2, total_steps=20, warmup=3, backend=backend)
    eager = AdamW(ref, lr=1e-2, total_steps=20, warmup=3, backend=backend)
    compiled = torch.compile(opt.step, fullgraph=True)
    for k in range(20):
        g = torch.Generator().manual_seed(k)
        for x, y in zip(ours, ref):
            x.grad = torch.randn(x.shape, generator=g)
            y.grad = x.grad.clone()
        compiled()
        eager.step()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # state creation + steady state
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert int(opt.step_count) == 20
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_compiled_whole_train_step_breaks_only_at_backward_and_never_recompiles(backend):
    """torch.compile of forward + backward + opt.step() + zeroing: dynamo itself cannot trace
    `loss.backward()` in torch 2.13 (one graph break there, torch's limitation; fullgraph=True is
    refused for that reason), the optimizer adds no break of its own, and nothing recompiles
    while the LR changes every step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        return m, AdamW(m.parameters(), lr=1e-2, total_steps=20, warmup=3, backend=backend)

    def train_step(m, opt, x, y):
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        torch._foreach_zero_([p.grad for p in m.parameters()])
        return loss

    torch._dynamo.reset()
    counters.clear()
    (m1, o1), (m2, o2) = model_and_opt(), model_and_opt()
    compiled = torch.compile(train_step)
    for k in range(20):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        compiled(m1, o1, x, y)
        train_step(m2, o2, x, y)
        if k == 2:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])  # no recompiles
    breaks = list(counters["graph_break"])
    assert breaks and all("backward" in b for b in breaks), breaks
    assert int(o1.step_count) == 20
    for x, y in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# CUDA graphs: tests/test_gpu.py (marked cuda; make gpu-check)


# ------------------------------------------------------------- checkpoints
def trained(n=3, **kw):
    p = make_params()
    opt = AdamW(p, amsgrad=True, total_steps=50, **kw)
    for _ in range(n):
        for q in p:
            q.grad = torch.randn_like(q)
        opt.step()
    return p, opt


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "2 parameter groups"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "has 4 parameters"),
        (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3, 3)), r"shape \(3, 3\), the parameter has \(33, 17\)"),
        # torch casts a floating state to its parameter's dtype (so does this load); an int one is refused
        (lambda sd: sd["state"][2].update(exp_avg_sq=sd["state"][2]["exp_avg_sq"].int()), "dtype torch.int32"),
        (lambda sd: sd.pop("state"), "no 'state' entry"),
    ],
)
def test_bad_checkpoints_raise_and_change_nothing(mutate, match):
    p, opt = trained()
    before = snapshot(opt, p)
    bad = roundtrip(opt.state_dict())
    mutate(bad)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_unchanged(before, opt, p)


def test_checkpoint_with_another_schedule_length_continues_at_its_position():
    p, opt = trained(n=7)
    sd = roundtrip(opt.state_dict())
    longer = AdamW(clone_params(p), amsgrad=True, total_steps=100)
    with pytest.warns(UserWarning, match="checkpoint's schedule has 50 steps, this optimizer's has 100"):
        longer.load_state_dict(sd)
    assert int(longer.step_count) == 7
    m = float(schedules.get("linear-d2z", 100).table()[7])
    assert longer.current_lr()[0].item() == pytest.approx(1e-3 * m, rel=1e-12)


# --------------------------------------------------------------- long runs
def test_ten_thousand_steps_end_exactly_at_the_last_multiplier():
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=1e-2, total_steps=10_000)
    p.grad = torch.ones(4)
    seen = []
    for k in range(10_000):
        if k in (0, 999, 1000, 9_998, 9_999):
            seen.append(opt.current_lr()[0].item())
        opt.step()
    table = schedules.get("linear-d2z", 10_000).table()
    assert seen == [1e-2 * float(table[i]) for i in (0, 999, 1000, 9_998, 9_999)]
    assert seen[1] == 1e-2 and seen[-1] == 0.0  # the peak ends warmup; the last update has LR exactly 0
    assert int(opt.step_count) == 10_000
    before = p.detach().clone()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.step()  # past the end: the last multiplier (0) again, with weight decay 0 too
        opt.step()
    assert torch.equal(p, before) and int(opt.step_count) == 10_002
    assert sum("more than total_steps=10000" in str(x.message) for x in w) == 1
