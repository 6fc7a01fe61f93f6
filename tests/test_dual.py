"""The dual coefficients (paper Sections 2.3, 3.1), the Rational schedule, and the d2z command line."""

import math
import re
import struct
import subprocess
import sys

import pytest
import torch

from d2z_optim import AdamW, dual, schedules
from d2z_optim.cli import main

T = 2000
LR, WD = 1.6e-2, 0.1


def naive(alpha, t):
    """c_{t,i} by the definition, in float64 products (O(t^2)): the reference."""
    c = []
    for i in range(1, t + 1):
        prod = 1.0
        for j in range(i + 1, t + 1):
            prod *= 1 - alpha[j - 1]
        c.append(alpha[i - 1] * prod)
    c0 = math.prod(1 - a for a in alpha[:t])
    return c0, torch.tensor(c, dtype=torch.float64)


@pytest.mark.parametrize("name", [n for n in schedules.names() if n not in ("custom", "rational")])
def test_coefficients_sum_to_one_and_match_the_definition(name):
    s = schedules.get(name, T)
    c0, c = dual.coefficients(s, LR, WD, rho=0.5)
    assert c.dtype == torch.float64 and c.shape == (T,)
    assert abs(c0 + float(c.sum()) - 1.0) <= 1e-12
    assert bool((c >= 0).all())
    t = 300
    c0_t, c_t = dual.coefficients(s, LR, WD, rho=0.5, step=t)
    r0, r = naive((s.multipliers() * 0.5 * LR * WD).tolist(), t)
    assert c0_t == pytest.approx(r0, rel=1e-12)
    torch.testing.assert_close(c_t, r, rtol=1e-11, atol=1e-300)


def test_constant_schedule_matches_the_closed_form():
    s = schedules.get("constant", T, warmup=0)
    _, c = dual.coefficients(s, LR, WD)
    a = LR * WD
    i = torch.arange(1, T + 1, dtype=torch.float64)
    torch.testing.assert_close(c, a * (1 - a) ** (T - i), rtol=1e-12, atol=0)


def test_rational_is_uniform_after_warmup():
    W = 200
    s = schedules.get("rational", T, warmup=W, peak_lr=LR, weight_decay=WD)
    _, c = dual.coefficients(s, LR, WD)
    tail = c[W - 1 :]
    assert float((tail.max() - tail.min()) / tail.mean()) < 1e-12
    _, c_mid = dual.coefficients(s, LR, WD, step=T // 2)  # uniform at every step, not only the last
    tail = c_mid[W - 1 :]
    assert float((tail.max() - tail.min()) / tail.mean()) < 1e-12


def test_heatmap_last_row_is_coefficients():
    s = schedules.get("cosine-10x", 300)
    ts, iss, C = dual.heatmap(s, LR, WD, size=1000)
    assert ts[-1] == 300 and C.shape == (300, 300)
    _, c = dual.coefficients(s, LR, WD)
    torch.testing.assert_close(C[-1], c, rtol=1e-12, atol=0)
    assert bool((C.triu(1) == 0).all())  # nothing from the future
    ts, iss, C = dual.heatmap(s, LR, WD, size=50)
    assert C.shape == (50, 50) and ts[-1] == 300
    torch.testing.assert_close(C[-1], c[iss - 1], rtol=1e-12, atol=0)


def test_independent_mode_and_wd_schedule():
    s = schedules.get("linear-d2z", T)
    _, c_ind = dual.coefficients(s, 123.0, WD, weight_decay_mode="independent")  # lr plays no role
    _, c_cpl = dual.coefficients(s, 1.0, WD)
    torch.testing.assert_close(c_ind, c_cpl, rtol=0, atol=0)
    half = [0.5] * T
    _, c_half = dual.coefficients(s, LR, WD, wd_schedule=half)
    _, c_ref = dual.coefficients(s, LR, WD / 2)
    torch.testing.assert_close(c_half, c_ref, rtol=1e-14, atol=0)


def test_summary_numbers():
    s = schedules.get("constant", T, warmup=0)
    d = dual.summary(s, LR, WD)
    a = LR * WD
    assert d.steps == T and d.initial_weight == pytest.approx((1 - a) ** T, rel=1e-12)
    assert d.timescale_peak == pytest.approx(1 / a) and d.timescale_end == pytest.approx(1 / a)
    _, c = dual.coefficients(s, LR, WD)
    assert d.last10_share == pytest.approx(float(c[-200:].sum()), rel=1e-12)
    w = c / c.sum()
    assert d.effective_updates == pytest.approx(1 / float((w * w).sum()), rel=1e-12)
    d2z = dual.summary(schedules.get("linear-d2z", T), LR, WD)
    assert math.isinf(d2z.timescale_end)  # the LR reaches zero
    W = 100
    r = dual.summary(schedules.get("rational", T, warmup=W, peak_lr=LR, weight_decay=WD), LR, WD)
    assert r.effective_updates > 0.9 * (T - W)  # (nearly) uniform over the updates after warmup


def test_optimizer_dual_summary_per_group():
    p = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    opt = AdamW([{"params": p[:1], "lr": LR}, {"params": p[1:], "lr": LR / 4}], weight_decay=WD, total_steps=T)
    a, b = opt.dual_summary(rho=0.5)
    assert a == dual.summary(schedules.get("linear-d2z", T), LR, WD, rho=0.5)
    assert b.initial_weight > a.initial_weight  # a lower LR leaves more of the initial weights


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr must be a non-negative finite number"),
        (dict(weight_decay=-0.1), "weight_decay must be a non-negative finite number"),
        (dict(rho=float("nan")), "rho must be a non-negative finite number"),
        (dict(lr=20.0), "no longer a convex combination"),
        (dict(step=0), r"step must be an int in \[1, 100\]"),
        (dict(step=101), r"step must be an int in \[1, 100\]"),
        (dict(weight_decay_mode="l2"), "weight_decay_mode must be one of"),
        (dict(wd_schedule=[1.0] * 5), "wd_schedule has 5 steps but schedule has 100"),
    ],
)
def test_errors(kw, match):
    args = {"lr": LR, "weight_decay": WD, **kw}
    with pytest.raises(ValueError, match=match):
        dual.coefficients(schedules.get("linear-d2z", 100), **args)
    with pytest.raises(ValueError, match="must be a Schedule or a table"):
        dual.coefficients("linear-d2z", LR, WD)


# ------------------------------------------------------------- command line
def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("preset", ["fig2", "fig26", "fig27"])
def test_plot_presets_make_images_of_the_requested_size(tmp_path, preset, capsys):
    pytest.importorskip("matplotlib", reason="plotting is the optional extra d2z_optim[plot]")
    out = tmp_path / f"{preset}.png"
    assert main(["plot", "--preset", preset, "-o", str(out), "--width", "800", "--height", "300"]) == 0
    assert out.stat().st_size > 10_000 and png_size(out) == (800, 300)


def test_plot_svg_and_named_schedules(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is the optional extra d2z_optim[plot]")
    out = tmp_path / "mine.svg"
    assert main(["plot", "linear-d2z", "wsd", "--steps", "500", "--lr", "3e-3", "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and out.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_install(tmp_path):
    code = "import sys; sys.modules['matplotlib'] = None; from d2z_optim.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "plot", "--preset", "fig2", "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "pip install 'd2z_optim[plot]'" in r.stderr


def test_table_is_csv_of_the_multipliers(capsys):
    assert main(["table", "wsd", "--steps", "50", "--warmup", "5", "--param", "shape=1-sqrt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step,multiplier" and len(lines) == 51
    s = schedules.get("wsd", 50, warmup=5, shape="1-sqrt")
    assert [float(x.split(",")[1]) for x in lines[1:]] == s.multipliers().tolist()


def test_describe_and_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "d2z_optim", "describe", "--preset", "fig26"], capture_output=True, text=True, check=True
    )
    assert "| Rational |" in r.stdout and "| Linear-D2Z |" in r.stdout


@pytest.mark.parametrize(
    "argv,match",
    [
        (["table", "bogus", "--steps", "5"], "unknown schedule 'bogus'"),
        (["describe", "linear-d2z"], "--steps is required"),
        (["describe", "linear-d2z", "--steps", "10", "--lr", "20"], "no longer a convex combination"),
        (["table", "linear", "--steps", "5", "--param", "decay_to=2"], r"decay_to must be in \[0, 1\]"),
    ],
)
def test_cli_errors(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(match, err)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["table", "linear-d2z", "--steps", "0"], "must be a positive int"),
        (["describe", "linear-d2z", "--steps", "5", "--wd", "-1"], "non-negative"),
    ],
)
def test_cli_rejects_bad_numbers(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
