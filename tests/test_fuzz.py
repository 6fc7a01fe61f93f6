"""Property tests (hypothesis): backends agree with the torch backend; invalid settings raise and write nothing."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d2z_optim import AdamW, schedules

from .conftest import BACKENDS

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(
    st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple) | st.sampled_from([(0,), (1,), (1023,), (65,)]),
    min_size=1,
    max_size=6,
)
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
names = st.sampled_from([n for n in schedules.names() if n not in ("custom", "rational")])
hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-5, 1e-1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
        "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": st.floats(0.0, 0.5),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
        "weight_decay_mode": st.sampled_from(["coupled", "independent"]),
    }
)


def make(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads(params, k):
    g = torch.Generator().manual_seed(1000 + k)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


FUSED = [b for b in BACKENDS if b != "torch"]


@pytest.mark.skipif(not FUSED, reason="no fused backend is built into this install")
@pytest.mark.parametrize("backend", FUSED)
@SETTINGS
@given(shapes=shapes, dtype=dtypes, name=names, hp=hyper, steps=st.integers(1, 6), seed=st.integers(0, 99))
def test_every_backend_agrees_with_the_torch_backend(backend, shapes, dtype, name, hp, steps, seed):
    p0 = make(shapes, dtype, seed)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in p0]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in p0]
    total = 10
    oa = AdamW(ours, schedule=name, total_steps=total, backend=backend, **hp)
    ob = AdamW(ref, schedule=name, total_steps=total, backend="torch", **hp)
    for k in range(steps):
        for a, b, g in zip(ours, ref, grads(p0, k)):
            a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    # fp32: a few ulp per step (fma vs separate roundings); bf16/fp16: one ulp of the storage dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert int(oa.step_count) == int(ob.step_count) == steps


bad_hyper = st.sampled_from(
    [
        {"lr": -1e-3},
        {"eps": -1.0},
        {"betas": (1.5, 0.9)},
        {"betas": (0.9, 1.0)},
        {"weight_decay": -0.1},
        {"weight_decay_mode": "decoupled"},
        {"backend": "gpu"},
        {"differentiable": True},
        {"schedule": "linear-d2z"},  # no total_steps
        {"total_steps": 0},
        {"total_steps": 10, "warmup": 11},
        {"schedule": [1.0, float("nan")]},
        {"schedule": [-1.0]},
        {"schedule": "cosine", "total_steps": 5, "warmup": -2},
    ]
)


@SETTINGS
@given(bad=bad_hyper, shapes=shapes, seed=st.integers(0, 99))
def test_invalid_settings_raise_and_never_touch_parameters(bad, shapes, seed):
    params = make(shapes, torch.float32, seed)
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        AdamW(params, **bad)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@SETTINGS
@given(shapes=shapes, seed=st.integers(0, 99), which=st.integers(0, 5), k=st.integers(0, 3))
def test_an_invalid_step_changes_nothing(shapes, seed, which, k):
    """A sparse gradient anywhere, after any number of good steps: an error, nothing written."""
    params = make(shapes, torch.float32, seed)
    opt = AdamW(params, total_steps=10, amsgrad=True)
    for j in range(k):
        for p, g in zip(params, grads(params, j)):
            p.grad = g
        opt.step()
    for p, g in zip(params, grads(params, k)):
        p.grad = g
    bad = params[which % len(params)]
    bad.grad = bad.grad.to_sparse()
    before = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    for p, b in zip(params, before[0]):
        assert torch.equal(p, b)
    sd = opt.state_dict()
    assert sd["state"].keys() == before[1]["state"].keys()
    for i, s in before[1]["state"].items():
        for key, v in s.items():
            assert torch.equal(sd["state"][i][key], v)
    assert int(opt.step_count) == k
