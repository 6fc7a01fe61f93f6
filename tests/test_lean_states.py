"""Moments stored in another dtype than their parameter's: ``exp_avg_dtype`` / ``exp_avg_sq_dtype``.

What holds (and why these tolerances):

* every fused path computes each element in fp32 registers and rounds each moment to nearest even
  into its storage dtype: the CPU op, its step holder, the CUDA grid (replayed on the host) and its
  step holder are bit for bit one another's (the CPU kernel with hardware FMA does the device's
  operations in the device's order), and the Triton kernel is too (its bf16 rounding is written
  from the bits, so the interpreter rounds as the GPU does);
* against the float64 reference that rounds each array to its own storage dtype every step, and
  against the torch backend (separate multiply and add where the kernels fuse them), each array
  stays within the tolerance of its own storage dtype (``test_csrc_op.TOL``: an fp32 rounding a
  few operations deep, or one storage ulp of bf16/fp16);
* an optimizer's moments have the dtype asked for, from the first step, through checkpoints and
  in either direction of a conversion (round to nearest even, as ``Tensor.to``).
"""

from __future__ import annotations

import pytest
import torch

from d2z_optim import AdamW
from d2z_optim.backends import cpp_backend
from d2z_optim.backends.contract import StepStatus

from .conftest import make_params, roundtrip
from .test_csrc_op import Case, _clone_view, assert_same_state
from .test_no_sync import HOST_READS, recorded_step
from .test_step_holders import _grouped, _work

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (parameter, exp_avg, exp_avg_sq) dtypes: the modes users ask for, and the mixed ones
MODES = [
    (F32, BF16, BF16),
    (F32, F16, F32),
    (F32, F32, BF16),
    (BF16, F32, F32),
    (BF16, BF16, F32),
    (F16, F32, F16),
]
mode_id = lambda m: "-".join(str(d).removeprefix("torch.") for d in m)


def lean_case(mode, sizes=(1, 5, 1023, 65537, 16389), offsets=(0, 1, 0, 3, 2)) -> Case:
    p_dt, m_dt, v_dt = mode
    case = Case(list(sizes), dtypes=(p_dt,), groups=("plain", "amsgrad", "maximize"), offsets=offsets)
    case.exp_avgs = [_clone_view(t, m_dt) for t in case.exp_avgs]
    case.exp_avg_sqs = [_clone_view(t, v_dt) for t in case.exp_avg_sqs]
    case.max_sqs = [_clone_view(t, v_dt) for t in case.max_sqs]
    return case


def _reference(case: Case, mode, steps: int) -> Case:
    """The float64 reference, each array rounded to its own storage dtype every step."""
    ref = case.clone()
    ref.run_reference(steps, storage=[mode] * len(case.params))
    return ref


def _fma_isa():
    if torch.ops.d2z._cpu_isa(-1) == "baseline":
        pytest.skip("this CPU has no AVX2/FMA: the baseline path uses mul+add, not bitwise the device's fma")


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
def test_every_fused_path_agrees_bit_for_bit_and_with_the_references(mode):
    _fma_isa()
    case = _grouped(lean_case(mode))
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
    for name, dt in (("exp_avgs", mode[1]), ("exp_avg_sqs", mode[2]), ("max_sqs", mode[2])):
        assert all(t.dtype == dt for t in getattr(out["cpu"], name) if t.numel())
    tb = case.clone()
    tb.run_torch_backend(3)
    assert_same_state(out["cpu"], tb)
    assert_same_state(out["cpu"], _reference(case, mode, 3))


def test_the_op_refuses_moment_dtypes_it_does_not_store_and_writes_nothing():
    for bad, match in (
        (dict(exp_avgs=torch.float64), "exp_avgs\\[0\\] has dtype Double but params\\[0\\] has Float"),
        (dict(max_sqs=torch.float16), "max_exp_avg_sqs\\[1\\] has dtype Half but exp_avg_sqs\\[1\\] has BFloat16"),
    ):
        case = lean_case((F32, BF16, BF16), sizes=(4, 6), offsets=(0,))
        name, dt = next(iter(bad.items()))
        k = 0 if name == "exp_avgs" else 1
        getattr(case, name)[k] = getattr(case, name)[k].to(dt)
        before = case.state()
        for op in ("cpu", "replay"):
            with pytest.raises(RuntimeError, match=match):
                case.run(op)
            assert all(torch.equal(a, b) for a, b in zip(before, case.state()))
    # float64 parameters keep float64 moments
    case = Case([4], dtypes=(torch.float64,))
    case.exp_avgs = [case.exp_avgs[0].float()]
    with pytest.raises(RuntimeError, match="exp_avgs\\[0\\] has dtype Float but params\\[0\\] has Double"):
        case.run("cpu")


# ---------------------------------------------------------------- the optimizer
def _train(backend, mode, steps=6, amsgrad=False, seed=0, total=None, **kw):
    p_dt, m_dt, v_dt = mode
    params = make_params(dtype=p_dt, seed=seed)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, total_steps=total or steps, backend=backend,
                exp_avg_dtype=m_dt, exp_avg_sq_dtype=v_dt, **kw)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for q in params:
            q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64).to(p_dt)
        opt.step()
    return params, opt


@pytest.mark.parametrize("mode", [(F32, BF16, BF16), (BF16, F32, F32)], ids=mode_id)
def test_the_optimizer_stores_moments_as_asked_on_every_backend(backend, mode):
    params, opt = _train(backend, mode, amsgrad=True)
    ref_params, ref = _train("torch", mode, amsgrad=True)
    assert opt.exp_avg_dtype == mode[1] and opt.exp_avg_sq_dtype == mode[2]
    for q, r in zip(params, ref_params):
        st, rs = opt.state[q], ref.state[r]
        assert (st["exp_avg"].dtype, st["exp_avg_sq"].dtype, st["max_exp_avg_sq"].dtype) == (mode[1], mode[2], mode[2])
        if backend != "torch":  # the kernels fuse what the torch backend multiplies and adds
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                tol = dict(rtol=2e-5, atol=1e-7) if st[key].dtype == F32 else dict(rtol=1.6e-2, atol=1e-5)
                torch.testing.assert_close(st[key].double(), rs[key].double(), **tol)
            tol = dict(rtol=2e-5, atol=1e-6) if q.dtype == F32 else dict(rtol=1.6e-2, atol=1e-3)
            torch.testing.assert_close(q.double(), r.double(), **tol)
    if backend == "triton":  # the same bits as the CPU kernel (bf16 written from the bits, even interpreted)
        if torch.ops.d2z._cpu_isa(-1) != "baseline":
            cpu_params, cpu = _train("cpu", mode, amsgrad=True)
            for q, c in zip(params, cpu_params):
                assert torch.equal(q, c)
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    assert torch.equal(opt.state[q][key], cpu.state[c][key])


def test_names_are_accepted_and_float64_parameters_keep_their_dtype(backend):
    p32, p64 = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = AdamW([p32, p64], backend="torch", exp_avg_dtype="bfloat16", exp_avg_sq_dtype="float16")
    assert opt.exp_avg_dtype == BF16 and opt.exp_avg_sq_dtype == F16
    p32.grad, p64.grad = torch.ones(5), torch.ones(5, dtype=torch.float64)
    opt.step()
    assert opt.state[p32]["exp_avg"].dtype == BF16 and opt.state[p32]["exp_avg_sq"].dtype == F16
    assert opt.state[p64]["exp_avg"].dtype == torch.float64 and opt.state[p64]["exp_avg_sq"].dtype == torch.float64
    # a fused backend: fp32 parameters only here (float64 ones would go to the torch backend's part)
    q = torch.nn.Parameter(torch.randn(7))
    o = AdamW([q], backend=backend, exp_avg_dtype=BF16)
    q.grad = torch.ones(7)
    o.step()
    assert o.state[q]["exp_avg"].dtype == BF16 and o.state[q]["exp_avg_sq"].dtype == F32


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(exp_avg_dtype=torch.int8), "exp_avg_dtype"),
        (dict(exp_avg_dtype=torch.float64), "exp_avg_dtype"),
        (dict(exp_avg_sq_dtype="bf16"), "exp_avg_sq_dtype"),
        (dict(exp_avg_sq_dtype=2), "exp_avg_sq_dtype"),
        (dict(exp_avg_dtype=torch.float8_e4m3fn), "exp_avg_dtype"),
    ],
)
def test_unsupported_state_dtypes_are_refused_naming_the_argument(kw, arg):
    with pytest.raises(ValueError, match=f"^{arg} must be None"):
        AdamW(make_params(), **kw)


def test_the_step_never_syncs_with_lean_moments(backend):
    params, opt = _train(backend, (F32, BF16, BF16), steps=2, max_grad_norm=1.0)
    for q in params:
        q.grad = torch.randn_like(q)
    rec = recorded_step(opt)
    assert rec.ops and not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)


def test_a_compiled_step_with_lean_moments_compiles_once():
    import torch._dynamo

    torch._dynamo.reset()
    params = make_params(shapes=[(33, 17), (1023,)])
    opt = AdamW(params, lr=1e-2, total_steps=10, exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16)
    ref_params = [torch.nn.Parameter(q.detach().clone()) for q in params]
    ref = AdamW(ref_params, lr=1e-2, total_steps=10, exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16)
    counts = torch._dynamo.utils.counters
    counts.clear()
    step = torch.compile(opt.step, fullgraph=True)
    for k in range(6):
        for q, r in zip(params, ref_params):
            q.grad = torch.full_like(q, 0.1 * (k + 1))
            r.grad = q.grad.clone()
        step()
        ref.step()
        if k == 1:
            graphs = counts["stats"]["unique_graphs"]
    # state creation + steady state; none after (the LR changes each step)
    assert graphs <= 2 and counts["stats"]["unique_graphs"] == graphs, dict(counts["stats"])
    for q, r in zip(params, ref_params):
        assert torch.equal(q, r) and torch.equal(opt.state[q]["exp_avg"], ref.state[r]["exp_avg"])
        assert opt.state[q]["exp_avg"].dtype == BF16


# ---------------------------------------------------------------- checkpoints
def test_state_dict_saves_moments_in_their_dtype_and_resumes_bit_for_bit(backend):
    mode = (F32, BF16, F16)
    full_params, full = _train(backend, mode, steps=6)
    params, opt = _train(backend, mode, steps=3, total=6)
    sd = roundtrip(opt.state_dict())
    assert sd["d2z"]["state_dtypes"] == {"exp_avg": "bfloat16", "exp_avg_sq": "float16"}
    assert all(s["exp_avg"].dtype == BF16 and s["exp_avg_sq"].dtype == F16 for s in sd["state"].values())
    again = [torch.nn.Parameter(q.detach().clone()) for q in params]
    resumed = AdamW(again, lr=1e-2, weight_decay=0.1, total_steps=6, backend=backend, exp_avg_dtype=BF16,
                    exp_avg_sq_dtype=F16)  # fmt: skip
    resumed.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    for k in range(6):  # the same gradients as _train's, the first three already applied
        grads = [torch.randn(q.shape, generator=g, dtype=torch.float64).float() for q in again]
        if k >= 3:
            for q, gr in zip(again, grads):
                q.grad = gr
            resumed.step()
    for q, f in zip(again, full_params):
        assert torch.equal(q, f)
        assert torch.equal(resumed.state[q]["exp_avg"], full.state[f]["exp_avg"])


def test_loading_converts_moments_both_ways_and_torch_loads_ours():
    params = make_params()
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    for q in params:
        q.grad = torch.randn_like(q)
    torch_opt.step()
    sd32 = roundtrip(torch_opt.state_dict())
    lean = AdamW([torch.nn.Parameter(q.detach().clone()) for q in params], lr=1e-2, exp_avg_dtype=BF16,
                 exp_avg_sq_dtype=BF16)  # fmt: skip
    lean.load_state_dict(sd32)
    for i, q in enumerate(lean.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert lean.state[q][key].dtype == BF16
            assert torch.equal(lean.state[q][key], sd32["state"][i][key].to(BF16))  # round to nearest even
    sd16 = roundtrip(lean.state_dict())
    plain = AdamW([torch.nn.Parameter(q.detach().clone()) for q in params], lr=1e-2)
    plain.load_state_dict(sd16)  # the reverse: exact
    back = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone()) for q in params], lr=1e-2)
    back.load_state_dict(sd16)  # torch's AdamW: casts to the parameter's dtype, exact from bf16
    for i, (q, r) in enumerate(zip(plain.param_groups[0]["params"], back.param_groups[0]["params"])):
        for key in ("exp_avg", "exp_avg_sq"):
            assert plain.state[q][key].dtype == F32 and back.state[r][key].dtype == F32
            assert torch.equal(plain.state[q][key], sd16["state"][i][key].float())
            assert torch.equal(back.state[r][key], sd16["state"][i][key].float())
        r.grad = torch.ones_like(r)
    back.step()


def test_fp32_moments_of_bf16_parameters_load_without_passing_through_bf16():
    """torch's load casts a state to its parameter's dtype: fp32 moments of bf16 parameters would
    lose 16 bits there; this load converts each moment into its own storage dtype instead."""
    p = torch.nn.Parameter(torch.randn(10).to(BF16))
    opt = AdamW([p], exp_avg_dtype=F32, exp_avg_sq_dtype=F32)
    third = torch.full((10,), 1.0 / 3.0)
    sd = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": third.clone(), "exp_avg_sq": third.clone()}},
          "param_groups": opt.state_dict()["param_groups"]}  # fmt: skip
    opt.load_state_dict(sd)
    assert opt.state[p]["exp_avg"].dtype == F32 and torch.equal(opt.state[p]["exp_avg"], third)
    p.grad = torch.ones(10, dtype=BF16)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].dtype == F32


def test_a_checkpoint_whose_moments_cannot_be_converted_is_refused_and_nothing_changes():
    params, opt = _train("torch", (F32, BF16, BF16), steps=2)
    sd = opt.state_dict()
    before = roundtrip(opt.state_dict())
    bad = roundtrip(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(params[0].shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"loaded state 'exp_avg' of parameter 0 has dtype torch\.int32, which cannot"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(after["state"][i][key], v)
    assert int(after["d2z"]["step_count"]) == int(before["d2z"]["step_count"])


def test_a_state_swapped_to_another_dtype_is_refused_before_any_write(backend):
    params, opt = _train(backend, (F32, BF16, BF16), steps=2)
    opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].float()
    for q in params:
        q.grad = torch.ones_like(q)
    before = [q.detach().clone() for q in params]
    with pytest.raises(ValueError, match=r"its states stored as torch.bfloat16"):
        opt.step()
    assert all(torch.equal(a, q) for a, q in zip(before, params))


@pytest.mark.parametrize("mode", [MODES[0], MODES[3]], ids=mode_id)
def test_lean_moments_keep_their_dtype_when_the_parameter_changes_layout(mode):
    """``p.data`` given another layout between steps (the moments are re-laid out to follow it)
    and a checkpoint whose moments are laid out otherwise than the parameter: the moments keep
    their storage dtype (they used to take the parameter's) and the values are a plain run's."""
    p_dt, m_dt, v_dt = mode

    def run(relayout: bool, load: bool):
        g = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter(torch.randn(8, 6, generator=g).to(p_dt))
        opt = AdamW([p], lr=1e-2, backend="cpu", total_steps=8, exp_avg_dtype=m_dt, exp_avg_sq_dtype=v_dt)
        for i in range(4):
            if relayout and i == 2:
                p.data = p.data.t().contiguous().t()  # column-major, the same values
            if load and i == 2:
                sd = opt.state_dict()
                sd["state"][0] = {k: v.t().contiguous().t() if v.dim() else v for k, v in sd["state"][0].items()}
                opt.load_state_dict(sd)
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g).to(p_dt))
            opt.step()
        return p, opt.state[p]

    a, sa = run(False, False)
    for relayout, load in ((True, False), (False, True)):
        b, sb = run(relayout, load)
        assert (sb["exp_avg"].dtype, sb["exp_avg_sq"].dtype) == (m_dt, v_dt)
        assert sb["exp_avg"].stride() == b.stride()
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
