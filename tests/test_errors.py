"""Bad input: torch's errors for what torch has, clear ValueErrors for the rest, nothing written."""

import pytest
import torch

from d2z_optim import AdamW

from .conftest import make_params

TORCH_BAD = [
    dict(lr=-1e-3),
    dict(eps=-1.0),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, -0.1)),
    dict(weight_decay=-0.1),
    dict(betas=(0.9, torch.tensor(0.999))),
    dict(lr=torch.tensor([1e-3, 1e-3]), capturable=True),
    dict(lr=torch.tensor(1e-3), foreach=True),
    dict(fused=True, foreach=True),
]


@pytest.mark.parametrize("kw", TORCH_BAD, ids=lambda kw: ",".join(kw))
def test_torchs_errors_for_torchs_arguments(kw):
    p = make_params()
    with pytest.raises(Exception) as theirs:
        torch.optim.AdamW(p, **kw)
    with pytest.raises(type(theirs.value)) as ours:
        AdamW(p, **kw)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "params,match",
    [
        ([], "optimizer got an empty parameter list"),
        (torch.ones(3), "params argument given to the optimizer should be an iterable"),
    ],
)
def test_torchs_errors_for_params(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdamW(params)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(differentiable=True), "differentiable=True is not supported"),
        (dict(weight_decay_mode="l2"), r"weight_decay_mode must be one of \['coupled', 'independent'\]"),
        (dict(backend="tpu"), r"backend must be one of \['auto', 'torch', 'cpu', 'cuda', 'triton'\]"),
        (dict(schedule="linear-d3z", total_steps=10), "unknown schedule 'linear-d3z'; valid names: constant"),
        (dict(schedule="cosine-10x"), "total_steps is required with schedule='cosine-10x'"),
        (dict(total_steps=0), "total_steps must be a positive int"),
        (dict(total_steps=-5), "total_steps must be a positive int"),
        (dict(total_steps=2.5), "total_steps must be a positive int"),
        (dict(total_steps=10, warmup=10), "warmup must be shorter than total_steps"),
        (dict(schedule=[1.0, -1.0]), "schedule must hold non-negative finite multipliers; entry 1"),
        (dict(schedule=torch.tensor([1.0, float("nan")])), "entry 1 is nan"),
        (dict(schedule=[1.0] * 5, total_steps=6), "must agree on the number of steps"),
        (dict(schedule=[1.0] * 5, wd_schedule=[1.0] * 4), "must agree on the number of steps"),
        (dict(wd_schedule=[1.0, float("inf")]), "wd_schedule must hold non-negative finite"),
        (dict(wd_schedule="bogus", total_steps=5), "unknown wd_schedule 'bogus'"),
        (dict(schedule=3.0), "schedule must be a schedule name, a d2z_optim.schedules.Schedule"),
        (dict(schedule="custom", total_steps=5), "needs a table"),
    ],
)
def test_our_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kw)


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
def test_unavailable_backend_says_why_and_what_is_available(name):
    import d2z_optim

    why = d2z_optim.available_backends()[name]
    if why is None:
        pytest.skip(f"backend {name!r} is built in this install")
    with pytest.raises(ValueError, match=rf"backend '{name}' is not available: .*available backends: \['torch'"):
        AdamW(make_params(), backend=name)


def test_fused_true_without_fused_kernels_is_an_error_not_a_silent_fallback():
    import d2z_optim

    if any(d2z_optim.available_backends()[n] is None for n in ("cpu", "cuda", "triton")):
        assert AdamW(make_params(), fused=True).backend_name != "torch"
    else:
        with pytest.raises(ValueError, match="fused=True needs a fused kernel backend"):
            AdamW(make_params(), fused=True)
    with pytest.raises(ValueError, match="fused=True contradicts backend='torch'"):
        AdamW(make_params(), fused=True, backend="torch")
    assert AdamW(make_params(), fused=False).backend_name == "torch"


def test_sparse_grad_raises_torchs_error_class_and_writes_nothing(backend):
    p = make_params()
    opt = AdamW(p, backend=backend)
    for q in p:
        q.grad = torch.ones_like(q)
    opt.step()
    before = [q.detach().clone() for q in p]
    state_before = {i: {k: v.clone() for k, v in opt.state[q].items()} for i, q in enumerate(p)}
    p[2].grad = torch.ones(p[2].shape).to_sparse()
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    ref.param_groups[0]["params"][0].grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError) as theirs:
        ref.step()
    assert str(ours.value) == str(theirs.value)
    for q, b in zip(p, before):
        assert torch.equal(q, b)
    for i, q in enumerate(p):
        for k, v in opt.state[q].items():
            assert torch.equal(v, state_before[i][k]), k
    assert int(opt.step_count) == 1


def test_a_bad_grad_on_a_late_parameter_creates_no_state(backend):
    p = make_params()
    opt = AdamW(p, backend=backend)
    p[0].grad = torch.ones_like(p[0])
    p[3].grad = torch.ones(p[3].shape).to_sparse()
    with pytest.raises(RuntimeError):
        opt.step()
    assert len(opt.state) == 0 and int(opt.step_count) == 0
