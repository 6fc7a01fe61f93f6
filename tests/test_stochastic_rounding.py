"""Stochastic rounding: ``AdamW(stochastic_rounding=True, rounding_seed=...)``.

What holds (and why these tolerances):

* the generator (``sr_key``/``sr_word``/``sr_second``: a 32-bit hash of seed, schedule position, tensor
  and element)
  and the two roundings (fp32 -> bf16, fp32 -> fp16, subnormals, overflow, NaN) of
  ``csrc/kernels/adamw_math.h`` give exactly the bits of ``d2z_optim/backends/stochastic.py``, on
  every float32 bit pattern drawn (2^21 of them) and the special values;
* a value rounds up with probability (bits dropped) / (their unit): the mean of many roundings of
  one value is that value within 6 binomial standard deviations; representable values stay;
* every fused path (CPU op, CPU holder, CUDA grid replayed, CUDA holder, and the Triton kernel under
  the interpreter) writes the same bits; the torch backend draws the same bits and rounds its own
  fp32 values, which differ from the kernels' by an fp32 rounding (it multiplies and adds where
  they fuse): so it agrees within one storage ulp of the narrowest dtype, exactly where its
  values agree;
* an optimizer run is bitwise reproducible run to run and across a resume; another seed gives
  other bits; float32 values are never touched (a no-op for them).
"""

from __future__ import annotations

import pytest
import torch

from d2z_optim import AdamW
from d2z_optim.backends import cpp_backend, stochastic
from d2z_optim.backends.contract import HpCol, StepStatus

from .conftest import make_params, roundtrip
from .test_csrc_op import TOL, assert_same_state
from .test_lean_states import _fma_isa, lean_case, mode_id
from .test_no_sync import HOST_READS, recorded_step
from .test_step_holders import _grouped, _work

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
MODES = [(BF16, BF16, BF16), (F16, F16, F16), (F32, BF16, BF16), (BF16, F32, F32), (F32, F16, F32), (F16, F32, F16)]
MODES += [(BF16, BF16, F32), (F32, F32, BF16)]


# ---------------------------------------------------------------- generator and rounding
def test_the_kernels_generator_draws_the_torch_backends_bits():
    for seed, position, tensor in ((0, 0, 0), (12345, 77, 3), (2**32 - 1, 2**31 + 5, 1000)):
        out = torch.empty(4099, 2, dtype=torch.int64)
        torch.ops.d2z._test_sr_words_(seed, position, tensor, out)
        k = stochastic.key(seed, torch.tensor(position), tensor)
        like = torch.empty(4099)
        w = stochastic.word(k, like)
        assert torch.equal(out[:, 0], w)
        assert torch.equal(out[:, 1], stochastic.second(w))
    # the words look random: each bit set about half the time, neighbours uncorrelated
    bits = (out[:, 0, None] >> torch.arange(32)) & 1
    assert ((bits.double().mean(0) - 0.5).abs() < 0.04).all()


def _patterns(n=2**21, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    scaled = torch.randn(n // 4, generator=g) * 10.0 ** torch.randint(-12, 6, (n // 4,), generator=g).float()
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.0, 65520.0, 1e-45, 6.1e-5, 5.96e-8,
         -5.96e-8, 2.98e-8, 3.4e38, -3.4e38, 1.0, -1.0]
    )  # fmt: skip
    return torch.cat([raw, scaled, special])


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_the_kernels_rounding_gives_the_torch_backends_bits(dtype):
    src = _patterns()
    g = torch.Generator().manual_seed(1)
    for r16 in (torch.randint(0, 2**16, src.shape, generator=g), torch.zeros_like(src, dtype=torch.int64),
                torch.full(src.shape, 2**16 - 1)):  # fmt: skip
        got = torch.empty(src.shape, dtype=dtype)
        torch.ops.d2z._test_round_sr_(src, r16, got)
        assert torch.equal(got.view(torch.int16), stochastic.round_stochastic(src, dtype, r16).view(torch.int16))
    # every result is one of the two neighbours of src in dtype (an independent reference: the
    # values next to round-to-nearest's), r16 = 0 the one toward zero, 2^16 - 1 (inexact) the other
    near = src.to(dtype)
    finite = src.isfinite() & near.isfinite() & (src.abs() < float(torch.finfo(dtype).max))
    x, near = src[finite].double(), near[finite]
    toward = torch.where(near.double().abs() <= x.abs(), near, torch.nextafter(near, torch.zeros_like(near)))
    outward = torch.where(x > 0, float("inf"), -float("inf")).to(dtype)
    away = torch.where(near.double().abs() >= x.abs(), near, torch.nextafter(near, outward))
    # (the probability has 16 bits: a value less than 2^-16 of its unit above `toward` never rounds up)
    frac = (x - toward.double()).abs() / (away.double() - toward.double()).abs().clamp(min=1e-300)
    for r, side, where in ((0, toward, frac > 0), (2**16 - 1, away, frac >= 2**-16)):
        got = stochastic.round_stochastic(src[finite], dtype, torch.full(x.shape, r))
        assert where.sum() > 1000 and torch.equal(got[where], side[where]), f"r16 = {r}: not the neighbour on its side"


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("value", [1.0 + 2**-10, -3.3e-3, 7e-8, 1e-9, 2.5e-5, 1234.567])
def test_a_value_rounds_up_with_the_probability_of_its_dropped_bits(dtype, value):
    n = 200_000
    x = torch.full((n,), value)
    r16 = stochastic.word(stochastic.key(3, torch.tensor(9), 1), x) & 0xFFFF
    y = stochastic.round_stochastic(x, dtype, r16).double()
    lo, hi = y.min().item(), y.max().item()
    exact = float(torch.tensor(value, dtype=torch.float32))
    if lo == hi:  # representable: it stays
        assert lo == exact == float(torch.tensor(exact).to(dtype))
        return
    p = (exact - lo) / (hi - lo)
    sd = (p * (1 - p) / n) ** 0.5 + 2**-16  # binomial, plus the 16-bit resolution of the probability
    assert abs((y == hi).double().mean().item() - p) < 6 * sd


# ---------------------------------------------------------------- every fused path
def _sr_case(mode, seed=1234):
    case = _grouped(lean_case(mode))
    case.hp[:, int(HpCol.ROUNDING)] = seed + 1
    return case


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_every_fused_path_writes_the_same_bits(mode):
    _fma_isa()
    case = _sr_case(mode)
    out = {}
    for op in ("cpu", "plan", "replay"):
        c = case.clone()
        c.run(op, 3)
        out[op] = c
    holder_case = case.clone()
    h = cpp_backend.CudaStepHolder(_work(holder_case))
    for _ in range(3):
        assert h.step(_work(holder_case)) is StepStatus.APPLIED
    for op in ("plan", "replay"):
        assert_same_state(out[op], out["cpu"], exact=True)
    assert_same_state(holder_case, out["cpu"], exact=True)
    # the torch backend: the same bits drawn, its own fp32 values (within one ulp of the narrowest dtype)
    tb = case.clone()
    tb.run_torch_backend(3)
    narrowest = max(mode[1:], key=lambda d: TOL[d]["rtol"]) if mode[0] == F32 else mode[0]
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_sqs"):
        for x, y in zip(getattr(out["cpu"], name), getattr(tb, name)):
            tol = TOL[narrowest] if x.dtype == F32 else TOL[x.dtype]
            torch.testing.assert_close(x.double(), y.double(), **tol)
            if stochastic.narrow(x.dtype) and x.numel() > 1000:  # other bits would differ in ~half the elements
                assert (x == y).double().mean() > 0.999, f"{name}: the torch backend's bits are not the kernels'"
    # not round to nearest even: a good share of the 16-bit values differ from it
    rne = _grouped(lean_case(mode))
    rne.run("cpu", 3)
    names = ("params", "exp_avgs", "exp_avg_sqs")
    narrow = [(a, b) for n in names for a, b in zip(getattr(rne, n), getattr(out["cpu"], n))
              if stochastic.narrow(a.dtype) and a.numel() > 1000]  # fmt: skip
    assert narrow and all((a != b).double().mean() > 0.05 for a, b in narrow)


def test_float32_tensors_of_a_stochastic_step_are_rounded_as_without_it():
    mode = (F32, F32, F32)
    case, rne = _sr_case(mode), _grouped(lean_case(mode))
    case.run("cpu", 2)
    rne.run("cpu", 2)
    assert_same_state(case, rne, exact=True)


# ---------------------------------------------------------------- the optimizer
def _train(backend, mode=(BF16, BF16, BF16), steps=4, seed=7, total=None, data_seed=0, **kw):
    p_dt, m_dt, v_dt = mode
    params = make_params(dtype=p_dt, seed=data_seed)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, total_steps=total or steps, backend=backend,
                exp_avg_dtype=m_dt, exp_avg_sq_dtype=v_dt, stochastic_rounding=True, rounding_seed=seed,
                **kw)  # fmt: skip
    g = torch.Generator().manual_seed(data_seed + 1)
    for _ in range(steps):
        for q in params:
            q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64).to(p_dt)
        opt.step()
    return params, opt


def _states(params, opt):
    return [t for q in params for t in (q, *(opt.state[q][k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")))]


@pytest.mark.parametrize("mode", [(BF16, BF16, BF16), (F32, BF16, F16)], ids=mode_id)
def test_every_backend_writes_the_cpu_kernels_bits(backend, mode):
    if backend != "torch":
        _fma_isa()
    params, opt = _train(backend, mode)
    assert opt.stochastic_rounding and opt.rounding_seed == 7
    cpu_params, cpu = _train("cpu", mode)
    for a, b in zip(_states(params, opt), _states(cpu_params, cpu)):
        if backend == "torch" and mode[0] == F32:  # its fp32 values differ by a rounding (see the docstring)
            torch.testing.assert_close(a.double(), b.double(), **TOL[BF16 if a.dtype == F32 else a.dtype])
        else:
            assert torch.equal(a, b)


def test_a_run_is_reproducible_and_its_seed_matters():
    a, oa = _train("cpu")
    b, ob = _train("cpu")
    c, _ = _train("cpu", seed=8)
    assert all(torch.equal(x, y) for x, y in zip(_states(a, oa), _states(b, ob)))
    assert not all(torch.equal(x, y) for x, y in zip(a, c) if x.numel() > 100)


def test_a_resumed_run_draws_the_same_bits(backend):
    full_params, full = _train(backend, steps=6)
    params, opt = _train(backend, steps=3, total=6)
    sd = roundtrip(opt.state_dict())
    assert sd["d2z"]["rounding"] == {"stochastic": True, "seed": 7}
    again = [torch.nn.Parameter(q.detach().clone()) for q in params]
    resumed = AdamW(again, lr=1e-2, weight_decay=0.1, amsgrad=True, total_steps=6, backend=backend,
                    exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16, stochastic_rounding=True, rounding_seed=7)  # fmt: skip
    resumed.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    for k in range(6):  # _train's gradients, the first three already applied
        grads = [torch.randn(q.shape, generator=g, dtype=torch.float64).to(BF16) for q in again]
        if k >= 3:
            for q, gr in zip(again, grads):
                q.grad = gr
            resumed.step()
    assert all(torch.equal(x, y) for x, y in zip(_states(again, resumed), _states(full_params, full)))


def test_loading_a_checkpoint_of_another_rounding_says_so_and_keeps_its_own():
    params, opt = _train("cpu", steps=2, total=4)
    sd = roundtrip(opt.state_dict())
    again = lambda: [torch.nn.Parameter(q.detach().clone()) for q in params]
    other = AdamW(again(), total_steps=4, stochastic_rounding=True, rounding_seed=8)
    with pytest.warns(UserWarning, match=r"saved with rounding \{'stochastic': True, 'seed': 7\}.*'seed': 8"):
        other.load_state_dict(sd)
    assert other.rounding_seed == 8
    plain = AdamW(again(), total_steps=4)
    with pytest.warns(UserWarning, match="this optimizer rounds to nearest even"):
        plain.load_state_dict(sd)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamW(again(), total_steps=4, stochastic_rounding=True, rounding_seed=7).load_state_dict(sd)


def test_a_skipped_step_leaves_every_value_as_it_was():
    params, opt = _train("cpu", steps=2, total=4)
    before = [t.clone() for t in _states(params, opt)]
    scaler_found_inf = torch.ones(())
    for q in params:
        q.grad = torch.randn_like(q)
    opt.grad_scale, opt.found_inf = None, scaler_found_inf
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(x, y) for x, y in zip(before, _states(params, opt)))


def test_float32_parameters_beside_bf16_ones_are_not_rounded():
    mixed = make_params(dtype=BF16) + make_params(shapes=[(33, 17), (1023,)], seed=3)
    plain = [torch.nn.Parameter(q.detach().clone()) for q in mixed]
    sr = AdamW(mixed, lr=1e-2, total_steps=4, stochastic_rounding=True)
    rne = AdamW(plain, lr=1e-2, total_steps=4)
    for _ in range(3):
        for q, r in zip(mixed, plain):
            q.grad = torch.randn_like(q)
            r.grad = q.grad.clone()
        sr.step()
        rne.step()
    for q, r in zip(mixed, plain):
        if q.dtype == F32:
            assert torch.equal(q, r)
        elif q.numel() > 100:
            assert not torch.equal(q, r)


def test_the_step_never_syncs_with_stochastic_rounding(backend):
    params, opt = _train(backend, steps=2, total=4, max_grad_norm=1.0)
    for q in params:
        q.grad = torch.randn_like(q)
    rec = recorded_step(opt)
    assert rec.ops and not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)


def test_a_compiled_stochastic_step_compiles_once():
    import torch._dynamo

    torch._dynamo.reset()
    params = make_params(shapes=[(33, 17), (1023,)], dtype=BF16)
    opt = AdamW(params, lr=1e-2, total_steps=10, stochastic_rounding=True)
    ref_params = [torch.nn.Parameter(q.detach().clone()) for q in params]
    ref = AdamW(ref_params, lr=1e-2, total_steps=10, stochastic_rounding=True)
    counts = torch._dynamo.utils.counters
    counts.clear()
    step = torch.compile(opt.step, fullgraph=True)
    for k in range(5):
        for q, r in zip(params, ref_params):
            q.grad = torch.full_like(q, 0.1 * (k + 1))
            r.grad = q.grad.clone()
        step()
        ref.step()
        if k == 1:
            graphs = counts["stats"]["unique_graphs"]
    assert graphs <= 2 and counts["stats"]["unique_graphs"] == graphs, dict(counts["stats"])
    assert all(torch.equal(q, r) for q, r in zip(params, ref_params))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(stochastic_rounding=1), "^stochastic_rounding must be a bool"),
        (dict(stochastic_rounding=True, rounding_seed=-1), "^rounding_seed must be an int"),
        (dict(stochastic_rounding=True, rounding_seed=2**32), "^rounding_seed must be an int"),
        (dict(stochastic_rounding=True, rounding_seed=1.5), "^rounding_seed must be an int"),
        (dict(stochastic_rounding=True), "^stochastic_rounding=True rounds nothing here"),
    ],
)
def test_bad_rounding_arguments_are_refused_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW(make_params(), **kw)  # fp32 parameters, fp32 moments: nothing to round


def test_fp32_parameters_with_16_bit_moments_take_stochastic_rounding():
    opt = AdamW(make_params(), exp_avg_dtype=BF16, stochastic_rounding=True)
    assert opt.stochastic_rounding
