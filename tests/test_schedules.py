"""Schedules: exact table values at the boundaries, shapes, and argument errors."""

import math

import pytest
import torch

from d2z_optim import schedules
from d2z_optim.schedules import Schedule

T, W = 1000, 100  # the paper's 10% warmup

NAMED = [n for n in schedules.names() if n != "custom"]
NEEDS = {"rational": {"peak_lr": 1e-2, "weight_decay": 0.1}}


def make(name, total=T, warmup=0.1, **kw):
    return schedules.get(name, total, warmup=warmup, **{**NEEDS.get(name, {}), **kw})


def test_names_cover_the_paper():
    want = {"constant", "linear-d2z", "linear-10x", "cosine-d2z", "cosine-10x", "linear", "cosine"}
    want |= {"invsqrt", "step", "wsd", "cyclic", "rational", "custom"}
    assert set(schedules.names()) == want


@pytest.mark.parametrize("name", NAMED)
def test_warmup_boundaries_and_table(name):
    s = make(name)
    assert isinstance(s, Schedule) and len(s) == T and s.warmup_steps == W
    assert s.multiplier(0) == 1 / W  # no update wasted at LR 0
    assert s.multiplier(W - 2) == (W - 1) / W
    assert s.multiplier(W - 1) == 1.0  # the last warmup step is the peak
    tab = s.table()
    assert tab.dtype == torch.float32 and tab.shape == (T,) and tab.device.type == "cpu"
    ref = torch.tensor([s.multiplier(i) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(tab, ref.float(), rtol=0, atol=0)  # one rounding, float64 -> float32
    assert bool((tab >= 0).all()) and bool(torch.isfinite(tab).all())
    assert s.multiplier(T + 5) == s.multiplier(T - 1)  # past the end: the last multiplier


@pytest.mark.parametrize("name,d", [("linear-d2z", 0.0), ("linear-10x", 0.1), ("cosine-d2z", 0.0), ("cosine-10x", 0.1)])
def test_decay_endpoints_are_exact(name, d):
    s = make(name)
    assert s.multiplier(T - 1) == d  # the last update uses exactly decay_to
    p = 1 / (T - W)  # first step after warmup: progress 1/(T-W)
    want = 1 - (1 - d) * p if name.startswith("linear") else d + (1 - d) * (1 + math.cos(math.pi * p)) / 2
    assert s.multiplier(W) == pytest.approx(want, rel=1e-15)
    i = 700
    p = (i - W + 1) / (T - W)
    want = 1 - (1 - d) * p if name.startswith("linear") else d + (1 - d) * (1 + math.cos(math.pi * p)) / 2
    assert s.multiplier(i) == pytest.approx(want, rel=1e-15)


def test_linear_and_cosine_take_decay_to():
    assert make("linear", decay_to=0.25).multiplier(T - 1) == 0.25
    assert make("cosine", decay_to=0.5).multiplier(T - 1) == 0.5
    assert make("linear").multiplier(T - 1) == 0.0  # default: to zero


def test_constant_and_no_warmup():
    s = make("constant", warmup=0)
    assert s.warmup_steps == 0 and bool((s.table() == 1).all())
    s = make("linear-d2z", warmup=0)
    assert s.multiplier(0) == 1 - 1 / T and s.multiplier(T - 1) == 0.0


def test_warmup_as_int_steps():
    s = make("linear-d2z", warmup=7)
    assert s.warmup_steps == 7 and s.multiplier(6) == 1.0 and s.multiplier(0) == 1 / 7


def test_invsqrt():
    s = make("invsqrt")
    assert s.multiplier(W) == pytest.approx(math.sqrt(W / (W + 1)), rel=1e-15)
    assert s.multiplier(4 * W - 1) == pytest.approx(0.5, rel=1e-15)


def test_step_defaults_follow_the_paper_and_milestones():
    s = make("step")  # after 90% of training, 0.1% of the peak (paper, Figure 18)
    assert s.multiplier(899) == 1.0 and s.multiplier(900) == pytest.approx(1e-3)
    s = make("step", milestones=[300, 0.6], gamma=0.5)
    assert s.params["milestones"] == (300, 600)
    assert [s.multiplier(i) for i in (299, 300, 599, 600, 999)] == [1.0, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
def test_wsd(shape):
    s = make("wsd", cooldown=0.2, shape=shape)
    assert s.multiplier(W) == 1.0 and s.multiplier(799) == 1.0  # stable until the cooldown
    assert s.multiplier(999) == 0.0  # ends at decay_to
    assert 0.0 < s.multiplier(800) < 1.0
    if shape == "linear":
        assert s.multiplier(899) == pytest.approx(0.5)
    assert make("wsd", decay_to=0.1, shape=shape).multiplier(999) == pytest.approx(0.1, abs=1e-15)


def test_cyclic():
    s = make("cyclic", period=200, low=0.2)
    assert s.multiplier(W - 1) == 1.0
    assert s.multiplier(W - 1 + 100) == pytest.approx(0.2)  # half a period later: the low point
    assert s.multiplier(W - 1 + 200) == pytest.approx(1.0)  # back at the peak
    assert min(s.multipliers()[W:]) >= 0.2 - 1e-12


def dual(alpha):
    """c_{t,i} for i = 1..t at the last step: alpha_i * prod_{j>i} (1 - alpha_j)."""
    tail = torch.flip(torch.cumprod(torch.flip(1 - alpha, [0]), 0), [0])
    return alpha * torch.cat([tail[1:], torch.ones(1, dtype=alpha.dtype)])


def test_rational_gives_uniform_dual_coefficients_after_warmup():
    lr, wd = 1.6e-2, 0.1
    s = make("rational", peak_lr=lr, weight_decay=wd)
    alpha = s.multipliers() * lr * wd
    c = dual(alpha)[W - 1 :]  # from the last warmup update on (Eq. 6: ratio 1)
    assert torch.allclose(c, c[0].expand_as(c), rtol=1e-12, atol=0)
    # Eq. 7 iterated from the peak
    eta = lr
    for i in range(W, W + 50):
        eta = eta / (1 + eta * wd)
        assert s.multiplier(i) * lr == pytest.approx(eta, rel=1e-13)


def test_custom_tables():
    s = schedules.get("custom", None, values=[1.0, 0.5, 0.0])
    assert len(s) == 3 and s.multiplier(1) == 0.5 and s.warmup_steps == 0
    s = schedules.get("custom", 4, values=lambda i: 1.0 / (i + 1))
    assert s.table().tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    s = schedules.from_values(torch.tensor([2.0, 1.0]))
    assert s.multiplier(5) == 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: schedules.get("linear-d3z", 10), "unknown schedule 'linear-d3z'; valid names: constant"),
        (lambda: schedules.get("linear-d2z", None), "total_steps is required"),
        (lambda: schedules.get("linear-d2z", 0), "total_steps must be a positive int"),
        (lambda: schedules.get("linear-d2z", -3), "total_steps must be a positive int"),
        (lambda: schedules.get("linear-d2z", 10.0), "total_steps must be a positive int"),
        (lambda: schedules.get("linear-d2z", True), "total_steps must be a positive int"),
        (lambda: schedules.get("linear-d2z", 10, warmup=10), "warmup must be shorter than total_steps"),
        (lambda: schedules.get("linear-d2z", 10, warmup=1.0), "warmup must be shorter than total_steps"),
        (lambda: schedules.get("linear-d2z", 10, warmup=-1), "warmup must be >= 0"),
        (lambda: schedules.get("linear-d2z", 10, warmup=1.5), r"warmup as a float .* \[0, 1\]"),
        (lambda: schedules.get("linear", 10, decay_to=1.5), r"decay_to must be in \[0, 1\]"),
        (lambda: schedules.get("cosine", 10, decay_to=-0.1), r"decay_to must be in \[0, 1\]"),
        (lambda: schedules.get("linear-d2z", 10, decay_to=0.1), "decay_to is fixed"),
        (lambda: schedules.get("wsd", 10, shape="exp"), r"shape must be one of \['linear', '1-sqrt'"),
        (lambda: schedules.get("wsd", 10, cooldown=0.95), "cooldown must be between"),
        (lambda: schedules.get("step", 10, milestones=[5, 2]), "milestones must be increasing"),
        (lambda: schedules.get("step", 10, milestones=[12]), "milestones must be <= total_steps"),
        (lambda: schedules.get("step", 10, gamma=0), "gamma must be a positive finite float"),
        (lambda: schedules.get("cyclic", 10, period=1), "period must be at least 2 steps"),
        (lambda: schedules.get("rational", 10), "needs peak_lr and weight_decay"),
        (lambda: schedules.get("rational", 10, peak_lr=-1, weight_decay=0.1), "peak_lr must be"),
        (lambda: schedules.get("linear", 10, bogus=1), "schedule 'linear'.*bogus"),
        (lambda: schedules.get("custom", None, values=[1.0, -0.5]), "entry 1 is -0.5"),
        (lambda: schedules.get("custom", None, values=[1.0, float("nan")]), "entry 1 is nan"),
        (lambda: schedules.get("custom", None, values=[1.0, float("inf")]), "entry 1 is inf"),
        (lambda: schedules.get("custom", None, values=[]), "non-empty 1-D"),
        (lambda: schedules.get("custom", None, values=[[1.0]]), "non-empty 1-D"),
        (lambda: schedules.get("custom", 5, values=[1.0, 2.0]), "does not match the custom table's length"),
        (lambda: schedules.get("custom", 5), "exactly one parameter, values="),
        (lambda: make("linear-d2z").multiplier(-1), "non-negative int"),
    ],
)
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
