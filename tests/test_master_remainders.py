"""``master_weights="remainders"``: bf16 parameters whose int16 remainder completes an fp32 master.

What holds (exactly, no tolerance):

* the split and the join are inverses on every fp32 bit pattern but NaNs (a NaN stays a NaN), and
  the bf16 half is the nearest bf16, ties away from zero (``Tensor.to`` rounds ties to even: they
  differ on exact ties only);
* on every backend (torch, cpu, the CUDA grid replayed on the host, and the Triton kernel in the
  interpreter child: tests/test_triton_interpret.py runs this file), a run with bf16 parameters and
  remainders ends with the same fp32 master values, bit for bit, as the same run with fp32
  parameters on that backend: the update is computed from the joined fp32 value and nothing is
  lost in between (amsgrad, bf16 moments, weight decay, several groups);
* refusals leave everything as it was; checkpoints keep the remainders exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from d2z_optim import AdamW
from d2z_optim.backends import remainders
from d2z_optim.backends.contract import DeviceWork, GroupWork, flatten

BF16, F32 = torch.bfloat16, torch.float32
SHAPES = [(33, 37), (4099,), (5,), (1,)]  # small: the interpreter child runs them too


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == F32 else t.view(torch.int16)


def test_split_join_round_trip_every_bit_pattern_class():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0, -(2**31), 0x7F800000, -8388608, 0x7F7FFFFF, 0x00000001, 0x3F808000, 0x7FC00000])
    u = torch.cat([u, special.to(torch.int32)])
    x = u.view(F32)
    p, r = remainders.split(x)
    back = remainders.join(p, r)
    finite = ~torch.isnan(x)
    assert torch.equal(_bits(back[finite]), _bits(x[finite]))
    assert torch.isnan(back[~finite]).all() and torch.isnan(p[~finite].float()).all()
    nearest = x.to(BF16)
    differ = (_bits(nearest) != _bits(p)) & finite
    assert ((u & 0xFFFF) == 0x8000)[differ].all()  # ties only (away from zero here, to even there)
    m = finite & torch.isfinite(x) & torch.isfinite(nearest.float())
    dist = lambda b: (b.double() - x.double()).abs()[m]  # exact in float64
    assert torch.equal(dist(p), dist(nearest))  # the nearest bf16 (on a tie: the other nearest one)


def _run(backend, rem: bool, steps=8, amsgrad=False, moments=None, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g).to(BF16) for s in SHAPES]
    params = [torch.nn.Parameter(x if rem else x.float()) for x in init]
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}]
    opt = AdamW(
        groups, lr=1e-2, weight_decay=0.1, backend=backend, amsgrad=amsgrad, total_steps=16,
        master_weights="remainders" if rem else None, exp_avg_dtype=moments, exp_avg_sq_dtype=moments, **kw,
    )  # fmt: skip
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(BF16).to(p.dtype)  # the same values either way
        opt.step()
    return params, opt


def _masters(params, opt):
    return [remainders.join(p.detach(), opt.state[p]["param_remainder"]) if p.dtype == BF16 else p for p in params]


@pytest.mark.parametrize("amsgrad,moments", [(False, None), (True, None), (False, BF16)], ids=["fp32m", "ams", "bf16m"])
def test_bf16_with_remainders_steps_as_fp32_parameters_bit_for_bit(backend, amsgrad, moments):
    a, oa = _run(backend, True, amsgrad=amsgrad, moments=moments)
    b, ob = _run(backend, False, amsgrad=amsgrad, moments=moments)
    assert oa.backend_name == ob.backend_name == backend
    for x, y in zip(_masters(a, oa), b):
        assert torch.equal(_bits(x.detach()), _bits(y.detach()))
    for x, y in zip(a, b):
        assert torch.equal(_bits(x.detach()), _bits(remainders.split(y.detach())[0]))  # the bf16 half
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[x][key], ob.state[y][key])


# (moments' dtype, beta1, rounding): the CPU kernel's one-pass loops (fp32 or bf16 moments, the
# lerp's low branch: 1 - beta1 < 0.5), stochastic rounding of bf16 moments, and its tiles (fp16
# moments, 1 - beta1 >= 0.5)
REPLAY_CASES = [(F32, 0.9, 0.0), (BF16, 0.9, 0.0), (BF16, 0.9, 6.0), (F32, 0.3, 0.0), (torch.float16, 0.9, 0.0),
                (BF16, 0.3, 6.0)]  # fmt: skip


@pytest.mark.parametrize("moments,beta1,rounding", REPLAY_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_the_cuda_grid_replayed_steps_remainders_as_fp32_parameters(moments, beta1, rounding):
    ops = torch.ops.d2z
    if not hasattr(ops, "adamw_step_grid_replay_"):
        pytest.skip("no extension")  # test_backends.py fails loudly when it is missing

    def work(rem: bool, amsgrad: bool):
        g = torch.Generator().manual_seed(3)
        gw = GroupWork(lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
        gw.rounding = rounding
        for n in (1, 37, 4099, 16390, 70001):
            p = torch.randn(n, generator=g).to(BF16)
            gw.params.append(p if rem else p.float())
            gw.grads.append(torch.randn(n, generator=g).to(BF16).to(gw.params[-1].dtype))
            gw.exp_avgs.append(torch.zeros(n, dtype=moments))
            gw.exp_avg_sqs.append(torch.zeros(n, dtype=moments))
            if amsgrad:
                gw.max_exp_avg_sqs.append(torch.zeros(n, dtype=moments))
            gw.steps.append(torch.zeros(()))
            if rem:
                gw.remainders.append(torch.zeros(n, dtype=torch.int16))
        return DeviceWork(torch.ones(4), torch.ones(4), torch.zeros((), dtype=torch.int64), False, [gw])

    for amsgrad in (False, True):
        a, b = work(True, amsgrad), work(False, amsgrad)
        for w in (a, b):
            for _ in range(3):
                ops.adamw_step_grid_replay_(*flatten(w).op_args(w, None, None))
        (ga,), (gb,) = a.groups, b.groups
        for p, r, q in zip(ga.params, ga.remainders, gb.params):
            assert torch.equal(_bits(remainders.join(p, r)), _bits(q))
        for x, y in zip(ga.exp_avg_sqs + ga.exp_avgs, gb.exp_avg_sqs + gb.exp_avgs):
            assert torch.equal(x, y)  # rounded alike, stochastically too (the same bits of the same streams)
        # and the CPU op (its FMA path is the device's operations in the device's order)
        c = work(True, amsgrad)
        for _ in range(3):
            ops.adamw_step_(*flatten(c).op_args(c, None, None))
        if torch.ops.d2z._cpu_isa() != "baseline":
            (gc,) = c.groups
            for x, y in zip(gc.remainders + gc.params + gc.exp_avgs + gc.exp_avg_sqs,
                            ga.remainders + ga.params + ga.exp_avgs + ga.exp_avg_sqs):  # fmt: skip
                assert torch.equal(_bits(x) if x.dtype == BF16 else x, _bits(y) if y.dtype == BF16 else y)


def test_states_bytes_and_properties():
    p = torch.nn.Parameter(torch.randn(100, 10).to(BF16))
    q = torch.nn.Parameter(torch.randn(7))  # fp32: its own master, no remainder
    opt = AdamW([p, q], master_weights="remainders", backend="torch")
    assert opt.master_weights == "remainders" and AdamW([q]).master_weights is None
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    st = opt.state[p]
    assert st["param_remainder"].dtype == torch.int16 and st["param_remainder"].shape == p.shape
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == F32  # the master's dtype
    assert "param_remainder" not in opt.state[q]
    lean = AdamW([p], master_weights="remainders", exp_avg_dtype=BF16, exp_avg_sq_dtype="bfloat16")
    p.grad = torch.ones_like(p)
    lean.step()
    st = lean.state[p]
    per_param = sum(st[k].element_size() for k in ("exp_avg", "exp_avg_sq", "param_remainder")) + p.element_size()
    assert per_param == 8  # bf16 weight + remainder + two bf16 moments: fp32 master values in 8 bytes


def test_bad_arguments_are_refused_naming_them():
    p = torch.nn.Parameter(torch.randn(4).to(BF16))
    with pytest.raises(ValueError, match="master_weights must be None or 'remainders'"):
        AdamW([p], master_weights="fp32")
    with pytest.raises(ValueError, match="master_weights='remainders' keeps a remainder for bfloat16"):
        AdamW([torch.nn.Parameter(torch.randn(4))], master_weights="remainders")
    with pytest.raises(ValueError, match="master_weights='remainders' keeps a remainder for bfloat16"):
        AdamW([torch.nn.Parameter(torch.randn(4).half())], master_weights="remainders")
    # stochastic rounding with exact parameters and fp32 moments would round nothing
    with pytest.raises(ValueError, match="stochastic_rounding=True rounds nothing"):
        AdamW([p], master_weights="remainders", stochastic_rounding=True)
    AdamW([p], master_weights="remainders", stochastic_rounding=True, exp_avg_dtype=BF16)  # rounds the moments


def test_stochastic_rounding_leaves_the_parameter_exact(backend):
    a, oa = _run(backend, True, moments=BF16, stochastic_rounding=True, rounding_seed=5)
    b, _ = _run(backend, False, moments=BF16, stochastic_rounding=True, rounding_seed=5)
    for x, y in zip(_masters(a, oa), b):  # fp32 parameters are never rounded: the same masters
        assert torch.equal(_bits(x.detach()), _bits(y.detach()))


def test_a_checkpoint_keeps_the_remainders_and_converts(backend):
    full, of = _run(backend, True, steps=8)
    half, oh = _run(backend, True, steps=8)
    # a new optimizer loading the checkpoint holds the remainders exactly, in int16
    sd = oh.state_dict()
    assert sd["d2z"]["state_dtypes"]["master_weights"] == "remainders"
    assert all(s["param_remainder"].dtype == torch.int16 for k, s in sd["state"].items() if k in (0, 1))
    fresh = AdamW(
        [{"params": half[:2]}, {"params": half[2:], "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2, weight_decay=0.1,
        backend=backend, total_steps=16, master_weights="remainders",
    )  # fmt: skip
    fresh.load_state_dict(sd)
    for p, q in zip(half, full):
        assert torch.equal(fresh.state[p]["param_remainder"], of.state[q]["param_remainder"])
        assert fresh.state[p]["exp_avg"].dtype == F32
    # an optimizer without remainders drops them, saying so; nothing else changes
    plain = AdamW([{"params": half[:2]}, {"params": half[2:]}], backend=backend, total_steps=16)
    with pytest.warns(UserWarning, match="low 16 bits of their fp32 masters are dropped"):
        plain.load_state_dict(sd)
    assert all("param_remainder" not in plain.state[p] for p in half)
    # a checkpoint without remainders (torch's AdamW): the masters start at the bf16 values
    ps = [torch.nn.Parameter(torch.randn(3).to(BF16))]
    ref = torch.optim.AdamW(ps)
    ps[0].grad = torch.ones_like(ps[0])
    ref.step()
    ours = AdamW(ps, master_weights="remainders", backend=backend)
    ours.load_state_dict(ref.state_dict())
    # at load time, not at the first step: a zero remainder (the master is the saved bf16 value)
    assert torch.equal(ours.state[ps[0]]["param_remainder"], torch.zeros(3, dtype=torch.int16))
    before = ps[0].detach().clone()
    ps[0].grad = torch.zeros_like(ps[0])
    ours.step()
    assert ours.state[ps[0]]["param_remainder"].dtype == torch.int16
    assert ours.state[ps[0]]["exp_avg"].dtype == F32
    assert torch.isfinite(ps[0].float()).all() and before.shape == ps[0].shape


def test_a_bad_remainder_in_a_checkpoint_is_refused_with_nothing_changed(backend):
    params, opt = _run(backend, True, steps=2)
    sd = opt.state_dict()
    bad = {**sd, "state": {k: dict(v) for k, v in sd["state"].items()}}
    bad["state"][0]["param_remainder"] = bad["state"][0]["param_remainder"].float()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match=r"param_remainder.*must be a dense int16 tensor"):
        opt.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v)
    # a remainder of the wrong dtype put into the state by hand: the step refuses it before any write
    opt.state[params[0]]["param_remainder"] = torch.zeros(params[0].shape, dtype=torch.int32)
    for p in params:
        p.grad = torch.ones_like(p)
    snapshot = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="param_remainder"):
        opt.step()
    assert all(torch.equal(_bits(p.detach()), _bits(s)) for p, s in zip(params, snapshot))
    # one taken out by hand: refused, naming it, and the state is left as it was (no key added)
    del opt.state[params[0]]["param_remainder"]
    keys = {p: set(opt.state[p]) for p in params}
    with pytest.raises(ValueError, match=r"'param_remainder' of parameter 0 of group 0 is None, not a tensor"):
        opt.step()
    assert {p: set(opt.state[p]) for p in params} == keys
    assert all(torch.equal(_bits(p.detach()), _bits(s)) for p, s in zip(params, snapshot))


def test_a_compiled_step_with_remainders_is_the_eager_step(backend):
    """torch.compile keeps the step's op opaque: the same bits as the eager step, every step."""
    a, oa = _run(backend, True, steps=1)
    b, ob = _run(backend, True, steps=1)
    compiled = torch.compile(ob.step, backend="aot_eager")
    for i in range(3):
        for p, q in zip(a, b):
            p.grad = torch.full_like(p, 0.5 - i)
            q.grad = torch.full_like(q, 0.5 - i)
        oa.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled()
    for p, q in zip(a, b):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
        assert torch.equal(oa.state[p]["param_remainder"], ob.state[q]["param_remainder"])


def test_the_remainder_follows_its_parameter_into_another_memory_layout(backend):
    """``p.data`` given another layout (model.to(memory_format=...)) between steps: the remainder
    is re-laid out with the moments (same values), and the masters are those of a run without."""

    def run(relayout: bool):
        g = torch.Generator().manual_seed(3)
        p = torch.nn.Parameter(torch.randn(8, 6, generator=g).to(BF16))
        opt = AdamW([p], lr=1e-2, backend=backend, total_steps=8, master_weights="remainders")
        for i in range(4):
            if relayout and i == 2:
                p.data = p.data.t().contiguous().t()  # column-major, the same values
            p.grad = torch.randn(p.shape, generator=g).to(BF16)
            p.grad = torch.empty_like(p).copy_(p.grad)  # in the parameter's layout
            opt.step()
        return p, opt

    (a, oa), (b, ob) = run(False), run(True)
    if backend != "torch":  # the fused kernels walk a parameter's tensors alike (torch's ops take any layout)
        assert ob.state[b]["param_remainder"].stride() == b.stride() != a.stride()
        assert ob.state[b]["exp_avg"].stride() == b.stride() and ob.state[b]["exp_avg"].dtype == F32
    assert torch.equal(_bits(_masters([a], oa)[0]), _bits(_masters([b], ob)[0]))


def _holder_work(seed: int, sizes, amsgrad: bool, fp32_tail: int = 0) -> DeviceWork:
    """One group of bf16 parameters (gradients held in .grad) with zero moments and random
    remainders, for the step holders; ``fp32_tail``: then an fp32 parameter of that size, whose
    remainder is a placeholder."""
    g = torch.Generator().manual_seed(seed)
    gw = GroupWork(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)

    def add(n, dtype, remainder):
        gw.params.append(torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)))
        gw.params[-1].grad = torch.randn(n, generator=g).to(dtype)
        gw.grads.append(gw.params[-1].grad)
        for lst in (gw.exp_avgs, gw.exp_avg_sqs) + ((gw.max_exp_avg_sqs,) if amsgrad else ()):
            lst.append(torch.zeros(n))
        gw.steps.append(torch.zeros(()))
        gw.remainders.append(remainder())

    for n in sizes:
        add(n, BF16, lambda n=n: torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int16))
    if fp32_tail:
        add(fp32_tail, F32, lambda: torch.zeros(0, dtype=torch.int16))
    return DeviceWork(torch.ones(4), torch.ones(4), torch.zeros((), dtype=torch.int64), False, [gw])


def test_the_cpu_step_holder_takes_remainders_bit_for_bit_and_checks_them():
    """The CPU step holder (d2z_optim._C.CpuStepHolder, the optimizer's steady path on the CPU)
    steps remainders as the op does, and refuses a bad one with nothing written."""
    from d2z_optim.backends import cpp_backend
    from d2z_optim.backends.contract import StepStatus

    if cpp_backend.load_extension() is not None:
        pytest.skip("no extension")  # test_backends.py fails loudly when it is missing

    def work():  # and an fp32 parameter: a placeholder remainder
        return _holder_work(4, (3, 1000, 70001), amsgrad=False, fp32_tail=7)

    a, b = work(), work()
    holder = cpp_backend.CpuStepHolder(b)
    for _ in range(3):
        torch.ops.d2z.adamw_step_(*flatten(a).op_args(a, None, None))
        assert holder.step(b) is StepStatus.APPLIED
    (ga,), (gb,) = a.groups, b.groups
    for x, y in zip(ga.params + ga.remainders + ga.exp_avgs, gb.params + gb.remainders + gb.exp_avgs):
        assert torch.equal(
            x.detach().view(torch.int16) if x.dtype == BF16 else x,
            y.detach().view(torch.int16) if y.dtype == BF16 else y,
        )
    # a remainder of another shape (resized in place): declined by the op's check, nothing written
    c = work()
    holder = cpp_backend.CpuStepHolder(c)
    (gc,) = c.groups
    gc.remainders[1].resize_(999)
    before = [t.detach().clone() for t in gc.params + gc.exp_avgs + gc.remainders[:1] + gc.remainders[2:]]
    assert holder.step(c) is StepStatus.DECLINED
    after = [t.detach() for t in gc.params + gc.exp_avgs + gc.remainders[:1] + gc.remainders[2:]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    # and the optimizer's steady CPU step runs through it
    _, opt = _run("cpu", True, steps=3)
    assert type(opt._cache.lists.holder).__name__ == "CpuStepHolder"


def test_the_step_with_remainders_never_syncs(backend):
    """No host read in a step (the no-sync recorder), with bf16 moments and clipping too."""
    from .test_no_sync import HOST_READS, recorded_step

    for kw in ({}, dict(moments=BF16, max_grad_norm=1.0)):
        params, opt = _run(backend, True, steps=2, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        rec = recorded_step(opt)
        assert rec.ops and not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)


def test_a_compiled_step_with_remainders_compiles_once():
    """torch.compile(fullgraph=True): the state's creation and the steady state, no recompile after
    (the LR changes every step), and the eager step's bits."""
    import torch._dynamo

    torch._dynamo.reset()
    a, oa = _run("cpu", True, steps=0)
    b, ob = _run("cpu", True, steps=0)
    counts = torch._dynamo.utils.counters
    counts.clear()
    step = torch.compile(ob.step, fullgraph=True)
    for k in range(6):
        for p, q in zip(a, b):
            p.grad = torch.full_like(p, 0.1 * (k + 1))
            q.grad = p.grad.clone()
        oa.step()
        step()
        if k == 1:
            graphs = counts["stats"]["unique_graphs"]
    assert graphs <= 2 and counts["stats"]["unique_graphs"] == graphs, dict(counts["stats"])
    for p, q in zip(a, b):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
        assert torch.equal(oa.state[p]["param_remainder"], ob.state[q]["param_remainder"])


def test_the_cuda_step_holder_takes_remainders_in_its_metadata():
    """The CUDA step holder (kind "cuda", its grid replayed on the host) steps remainders as the
    op's grid replay does, bit for bit; a remainder changed in place is seen (full checks, new
    metadata) or declined with nothing written. The Triton holder refuses remainders (its
    launches take them through the op)."""
    from d2z_optim import _C
    from d2z_optim.backends import cpp_backend
    from d2z_optim.backends.contract import StepStatus

    def work():
        return _holder_work(5, (5, 4099, 70001), amsgrad=True)

    def state(w):
        (gw,) = w.groups
        return [t.detach().view(torch.int16) if t.dtype == BF16 else t for t in gw.params + gw.remainders + gw.exp_avgs]

    a, b = work(), work()
    holder = cpp_backend.CudaStepHolder(b, mode="replay")
    for k in range(3):
        if k == 2:  # a new remainder tensor's data in place of the old one's: the metadata follows it
            for w in (a, b):
                fresh = w.groups[0].remainders[1].clone()
                w.groups[0].remainders[1].set_(fresh)
        ops = torch.ops.d2z
        ops.adamw_step_grid_replay_(*flatten(a).op_args(a, None, None))
        assert holder.step(b) is StepStatus.APPLIED
    assert all(torch.equal(x, y) for x, y in zip(state(a), state(b)))
    b.groups[0].remainders[2].resize_(70000)
    before = [t.clone() for t in state(b)]
    assert holder.step(b) is StepStatus.DECLINED
    assert all(torch.equal(x, y) for x, y in zip(before, state(b)))
    f = flatten(work())
    args = (f.params, f.exp_avgs, f.exp_avg_sqs, f.max_exp_avg_sqs, f.steps, f.group_index)
    with pytest.raises(RuntimeError, match="remainders need kind 'cuda'"):
        _C.DeviceStepHolder(*args, kind="triton", mode="replay", chunk=[1024] * 4, remainders=f.remainders)
