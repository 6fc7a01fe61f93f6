"""The C++ op d2z::adamw_step_ (CPU kernel) and its CUDA grid replayed on the CPU.

Both are checked against the float64 reference (d2z_optim.reference) and against the torch backend
(d2z_optim.backends.torch_backend), on odd sizes, misaligned views, thousands of tensors, empty
tensors, several groups, amsgrad/maximize, both weight-decay modes, AMP, three dtypes, and bad
input (an error naming the argument, nothing written).
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from d2z_optim import _C  # registers torch.ops.d2z
from d2z_optim.backends import torch_backend
from d2z_optim.backends.contract import DeviceWork, GroupWork, StepStatus
from d2z_optim.reference import Fp64AdamW


def plan_step(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, step_count, lr_table, wd_table, hp, *rest):
    """The op's step through d2z_optim._C.CpuStepHolder: the lists handed over once, the gradients
    read from the parameters' .grad."""
    for p, g in zip(params, grads):
        p.grad = g
    plan = _C.CpuStepHolder(params, exp_avgs, exp_avg_sqs, max_sqs, steps, rest[0])
    assert plan.step(step_count, lr_table, wd_table, hp, *rest[1:], False) == StepStatus.APPLIED


OPS = {
    "cpu": torch.ops.d2z.adamw_step_.default,
    "replay": torch.ops.d2z.adamw_step_grid_replay_.default,
    "plan": plan_step,
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Tolerances after a few steps, relative to the stored values. fp32: the kernel rounds each
# intermediate to fp32 (~6e-8 relative) where the reference keeps float64, a few roundings deep.
# bf16/fp16: the kernel and the reference may round to opposite sides of one storage ulp
# (2^-8 / 2^-11 relative); atol covers values near zero (v ~ 1e-3 * g^2, fp16 subnormals).
TOL = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-15},  # float64 math, a few roundings from the reference
    torch.float32: {"rtol": 2e-5, "atol": 1e-7},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-6},
}

HP = {  # lr, beta1, beta2, eps, weight_decay, amsgrad, maximize
    "plain": (1e-2, 0.9, 0.999, 1e-8, 0.1, 0, 0),
    "amsgrad": (3e-3, 0.8, 0.99, 1e-6, 0.0, 1, 0),
    "maximize": (5e-3, 0.95, 0.98, 1e-8, 0.5, 0, 1),
    "both": (2e-2, 0.5, 0.9, 1e-4, 0.01, 1, 1),
}


@pytest.fixture(autouse=True)
def _isa_restored():
    before = {"avx512": 2, "avx2": 1, "baseline": 0}[torch.ops.d2z._cpu_isa(-1)]
    yield
    torch.ops.d2z._cpu_isa(before)


def _tensor(n, dtype, offset, gen, scale=1.0, positive=False):
    """A contiguous 1-D tensor of n elements starting `offset` elements into its storage."""
    base = torch.randn(n + offset + 3, generator=gen, dtype=torch.float64) * scale
    if positive:
        base = base.abs()
    return base.to(dtype)[offset : offset + n]


class Case:
    """Tensors of one call; `groups` names rows of HP, tensor k is in group k % len(groups)."""

    def __init__(
        self,
        sizes,
        dtypes=(torch.float32,),
        groups=("plain",),
        offsets=(0,),
        seed=0,
        table=None,
        independent_wd=False,
        step_count=0,
        grad_scale=None,
        found_inf=None,
        warm=True,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.groups = list(groups)
        self.hp = torch.tensor([[*HP[g], 0.0] for g in self.groups], dtype=torch.float64)
        self.group_index = [k % len(self.groups) for k in range(len(sizes))]
        any_ams = any(HP[g][5] for g in self.groups)
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_sqs, self.steps = [], [], [], [], [], []
        for k, n in enumerate(sizes):
            dt = dtypes[k % len(dtypes)]
            off = offsets[k % len(offsets)]
            self.params.append(_tensor(n, dt, off, gen))
            self.grads.append(_tensor(n, dt, off, gen, 0.5))
            # warm states, as after a few steps: exercise every term of the update
            self.exp_avgs.append(_tensor(n, dt, off, gen, 0.05 if warm else 0.0))
            self.exp_avg_sqs.append(_tensor(n, dt, off, gen, 0.01 if warm else 0.0, positive=True))
            ams = HP[self.groups[self.group_index[k]]][5]
            if any_ams:
                x = _tensor(n, dt, off, gen, 0.012 if warm else 0.0, positive=True) if ams else torch.empty(0, dtype=dt)
                self.max_sqs.append(x)
            self.steps.append(torch.tensor(float(3 * k % 7) if warm else 0.0))
        T = 7
        self.lr_table = table if table is not None else torch.linspace(1.0, 0.1, T)
        self.wd_table = torch.linspace(1.0, 0.5, self.lr_table.numel()).flip(0)
        self.step_count = torch.tensor(step_count, dtype=torch.int64)
        self.independent_wd = independent_wd
        self.grad_scale = None if grad_scale is None else torch.tensor(float(grad_scale))
        self.found_inf = None if found_inf is None else torch.tensor(float(found_inf))

    def args(self):
        return (
            self.params,
            self.grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            self.max_sqs,
            self.steps,
            self.step_count,
            self.lr_table,
            self.wd_table,
            self.hp,
            self.group_index,
            self.independent_wd,
            self.grad_scale,
            self.found_inf,
        )

    def clone(self):
        c = object.__new__(Case)
        c.__dict__.update(self.__dict__)
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_sqs", "steps"):
            setattr(c, name, [_clone_view(t) for t in getattr(self, name)])
        c.step_count = self.step_count.clone()
        return c

    def state(self):
        """Everything the op may write (and the grads, which it must not)."""
        out = []
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_sqs", "steps"):
            out += [t.detach().clone() for t in getattr(self, name)]
        return [*out, self.step_count.clone()]

    def run(self, op, n=1):
        for _ in range(n):
            OPS[op](*self.args())

    def run_torch_backend(self, n=1):
        for _ in range(n):
            groups = []
            for gi, gname in enumerate(self.groups):
                lr, b1, b2, eps, wd, ams, mx = HP[gname]
                ids = [k for k in range(len(self.params)) if self.group_index[k] == gi]
                groups.append(
                    GroupWork(
                        lr,
                        b1,
                        b2,
                        eps,
                        wd,
                        bool(ams),
                        bool(mx),
                        True,
                        [self.params[k] for k in ids],
                        [self.grads[k] for k in ids],
                        [self.exp_avgs[k] for k in ids],
                        [self.exp_avg_sqs[k] for k in ids],
                        [self.max_sqs[k] for k in ids] if ams else [],
                        [self.steps[k] for k in ids],
                        float(self.hp[gi, 7]),  # HpCol.ROUNDING
                    )
                )
            torch_backend.step(
                DeviceWork(
                    self.lr_table,
                    self.wd_table,
                    self.step_count,
                    self.independent_wd,
                    groups,
                    self.grad_scale,
                    self.found_inf,
                )
            )

    def run_reference(self, n=1, storage=None):
        """d2z_optim.reference.Fp64AdamW from this case's states, results rounded to the storage dtype
        (``storage``: Fp64AdamW's storage_dtypes; default each parameter's dtype for all its arrays)."""
        names = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize")
        groups = []
        for g in self.groups:
            h = dict(zip(names, HP[g]))
            groups.append(dict(lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], amsgrad=bool(h["amsgrad"]),
                               weight_decay=h["weight_decay"], maximize=bool(h["maximize"])))  # fmt: skip
        state = [
            dict(exp_avg=m, exp_avg_sq=v, max_exp_avg_sq=self.max_sqs[k] if self.max_sqs else None, step=st)
            for k, (m, v, st) in enumerate(zip(self.exp_avgs, self.exp_avg_sqs, self.steps))
        ]
        ref = Fp64AdamW(
            self.params,
            groups=groups,
            group_index=self.group_index,
            lr_table=self.lr_table,
            wd_table=self.wd_table,
            independent=self.independent_wd,
            state=state,
            step_count=int(self.step_count),
            storage_dtypes=storage or [p.dtype for p in self.params],
        )
        for _ in range(n):
            ref.step(self.grads, grad_scale=self.grad_scale, found_inf=self.found_inf)
        for k, p in enumerate(self.params):
            p.copy_(ref.p[k])
            self.exp_avgs[k].copy_(ref.m[k])
            self.exp_avg_sqs[k].copy_(ref.v[k])
            if self.max_sqs and self.max_sqs[k].numel():
                self.max_sqs[k].copy_(ref.vmax[k])
            self.steps[k].fill_(float(ref.steps[k]))
        self.step_count.fill_(ref.k)


def _clone_view(t, dtype=None):
    """A copy (in ``dtype``, default t's) that keeps t's storage offset (so alignment is kept too)."""
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=dtype or t.dtype)
    out = base.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


def _all_close(xs, ys) -> bool:
    """Whether torch.testing.assert_close(x.double(), y.double(), **TOL[x.dtype]) passes for every
    pair: its elementwise test (torch.isclose, a NaN never close) on all pairs of a dtype at once.
    One call per pair made the 3000-tensor test take 14 s, nearly all of it in assert_close."""
    flat = {}
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            return False
        a, b = flat.setdefault((x.dtype, y.dtype), ([], []))
        a.append(x.reshape(-1))
        b.append(y.reshape(-1))
    return all(
        bool(torch.isclose(torch.cat(a).double(), torch.cat(b).double(), **TOL[dt]).all())
        for (dt, _), (a, b) in flat.items()
    )


def assert_same_state(a: Case, b: Case, exact=False):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_sqs"):
        if not exact and _all_close(getattr(a, name), getattr(b, name)):
            continue  # else assert_close, tensor by tensor, names the first that differs
        for k, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            if exact:
                assert torch.equal(x, y), f"{name}[{k}] differs"
            else:
                torch.testing.assert_close(
                    x.double(), y.double(), **TOL[x.dtype], msg=lambda s, w=f"{name}[{k}]": f"{w}: {s}"
                )
        assert exact, f"{name}: not close, yet every assert_close passed"  # never: _all_close is its test
    for k, (x, y) in enumerate(zip(a.steps, b.steps)):
        assert float(x) == float(y), f"steps[{k}]"
    assert int(a.step_count) == int(b.step_count)


def check_all(case: Case, steps=3):
    """The op and the replay vs the reference and the torch backend; replay vs op."""
    ref, tb = case.clone(), case.clone()
    ref.run_reference(steps)
    tb.run_torch_backend(steps)
    results = {}
    for op in OPS:
        c = case.clone()
        c.run(op, steps)
        assert_same_state(c, ref)
        assert_same_state(c, tb)
        results[op] = c
    assert_same_state(results["plan"], results["cpu"], exact=True)  # one kernel, two ways in
    return results


SIZES_ODD = [1, 5, 1023, 65537]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_sizes(dtype):
    check_all(Case(SIZES_ODD, dtypes=(dtype,)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views(dtype):
    # storage offsets 1..3 elements: not 16-byte aligned; the replay takes the scalar path
    check_all(Case([5, 1023, 16389, 33], dtypes=(dtype,), offsets=(1, 0, 3, 2), groups=("plain", "amsgrad")))


def test_replay_bitwise_equals_cpu_fma_paths():
    """With hardware FMA, the CPU kernel does the device's operations in the device's order."""
    case = Case(SIZES_ODD + [0, 17], dtypes=DTYPES, groups=tuple(HP), offsets=(0, 1))
    best = torch.ops.d2z._cpu_isa(-1)
    if best == "baseline":
        pytest.skip("this CPU has no AVX2/FMA: the baseline path uses mul+add, not bitwise the device's fma")
    for isa in {"avx512": (1, 2), "avx2": (1,)}[best]:
        torch.ops.d2z._cpu_isa(isa)
        a, b = case.clone(), case.clone()
        a.run("cpu", 3)
        b.run("replay", 3)
        assert_same_state(a, b, exact=True)


@pytest.mark.parametrize("isa", [0, 1, 2])
def test_each_cpu_isa(isa):
    got = torch.ops.d2z._cpu_isa(isa)
    assert got in ("baseline", "avx2", "avx512")
    case = Case(SIZES_ODD, dtypes=DTYPES, groups=tuple(HP))
    ref = case.clone()
    ref.run_reference(3)
    case.run("cpu", 3)
    assert_same_state(case, ref)


def test_thousands_of_small_tensors_and_empty():
    rnd = random.Random(1)
    sizes = [rnd.choice([0, 1, 2, 3, 7, 8, 9, 63, 64, 65, 127, 300]) for _ in range(3000)]
    check_all(Case(sizes, dtypes=DTYPES, groups=tuple(HP), offsets=(0, 1, 0, 2)), steps=2)


def test_only_empty_tensors_and_no_tensors():
    for sizes in ([0, 0], []):
        case = Case(sizes, groups=("plain",))
        for op in OPS:
            c = case.clone()
            c.run(op, 2)
            assert int(c.step_count) == 2
            assert all(float(s) == float(s0) + 2 for s, s0 in zip(c.steps, case.steps))


@pytest.mark.parametrize("independent_wd", [False, True])
def test_groups_wd_modes_and_table(independent_wd):
    table = torch.tensor([1.0, 0.5, 0.25])
    # step_count 1 then 2 then past the end: the last entry is reused
    check_all(
        Case(
            [1023, 64, 5, 2049],
            dtypes=DTYPES,
            groups=tuple(HP),
            table=table,
            independent_wd=independent_wd,
            step_count=1,
        ),
        steps=4,
    )


def test_cold_start_from_zero_states():
    check_all(Case([1023, 7], dtypes=DTYPES, groups=("plain", "amsgrad"), warm=False), steps=3)


def test_mixed_dtypes_one_call():
    check_all(Case([100, 1023, 5, 64, 65], dtypes=DTYPES, groups=("plain", "both")))


@pytest.mark.parametrize("op", list(OPS))
def test_found_inf_is_a_noop(op):
    case = Case([1023, 5, 0], dtypes=DTYPES, groups=("plain", "amsgrad"), grad_scale=1024.0, found_inf=1.0)
    before = case.state()
    case.run(op, 2)
    for x, y in zip(case.state(), before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("op", list(OPS))
def test_found_inf_zero_and_grad_scale(op):
    case = Case([1023, 5, 65537], dtypes=DTYPES, groups=("plain", "maximize"), grad_scale=256.0, found_inf=0.0)
    for g in case.grads:
        g.mul_(256.0)  # scaled grads (fp16 stays finite), as autocast + GradScaler leave them
    grads = [g.clone() for g in case.grads]
    ref = case.clone()
    ref.run_reference(2)
    case.run(op, 2)
    assert_same_state(case, ref)
    for g, g0 in zip(case.grads, grads):
        assert torch.equal(g, g0), "grads must be read only (not unscaled in place)"


def test_step_counters_advance():
    case = Case([5, 1023], groups=("plain",), step_count=4)
    s0 = [float(s) for s in case.steps]
    case.run("cpu", 3)
    assert int(case.step_count) == 7
    assert [float(s) for s in case.steps] == [s + 3 for s in s0]


# ---- conversions ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_conversions_match_torch(dtype):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)  # all 65536 values
    got = torch.empty(every.numel())
    torch.ops.d2z._test_cast_(every, got)
    want = every.float()
    both_nan = got.isnan() & want.isnan()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.view(torch.int32)[~both_nan], want.view(torch.int32)[~both_nan])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=g) * torch.logspace(-45, 38, 1 << 20).clamp(max=3e38)
    x = torch.cat(
        [
            x,
            torch.tensor(
                [
                    float("nan"),
                    float("inf"),
                    -float("inf"),
                    65504.0,
                    65519.99,
                    65520.0,
                    -0.0,
                    0.0,
                    5.96e-8,
                    2.98e-8,
                    2.99e-8,
                    1e-45,
                    3.4e38,
                ]
            ),
        ]
    )
    # every float32 that is a tie between two dtype values: round to nearest even
    ties = every.float()[every.float().isfinite()].double() * (1 + 2.0 ** -(8 if dtype == torch.bfloat16 else 11))
    x = torch.cat([x, ties.float()])
    got = torch.empty(x.numel(), dtype=dtype)
    torch.ops.d2z._test_cast_(x, got)
    want = x.to(dtype)
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(got.view(torch.int16)[ok], want.view(torch.int16)[ok])


# ---- bad input: a clear error naming the argument, nothing written ----


def _bad_cases():
    def mod(fn):
        def build():
            c = Case([1023, 5], dtypes=(torch.float32, torch.bfloat16), groups=("plain", "amsgrad"))
            fn(c)
            return c

        return build

    def setattr_(name, value):
        return lambda c: setattr(c, name, value(c) if callable(value) else value)

    def set_item(name, k, value):
        return lambda c: getattr(c, name).__setitem__(k, value(c))

    return {
        "grads length": (mod(setattr_("grads", lambda c: c.grads[:1])), "grads"),
        "exp_avgs length": (mod(setattr_("exp_avgs", lambda c: c.exp_avgs[:1])), "exp_avgs"),
        "exp_avg_sqs length": (mod(setattr_("exp_avg_sqs", lambda c: c.exp_avg_sqs + c.exp_avg_sqs)), "exp_avg_sqs"),
        "max_exp_avg_sqs length": (mod(setattr_("max_sqs", lambda c: c.max_sqs[:1])), "max_exp_avg_sqs"),
        "steps length": (mod(setattr_("steps", lambda c: c.steps[:1])), "steps"),
        "group_index length": (mod(setattr_("group_index", [0])), "group_index"),
        "group_index range": (mod(setattr_("group_index", [0, 2])), "group_index[1]"),
        "group_index negative": (mod(setattr_("group_index", [-1, 0])), "group_index[0]"),
        "grad dtype": (mod(set_item("grads", 1, lambda c: c.grads[1].float())), "grads[1]"),
        "exp_avg dtype": (mod(set_item("exp_avgs", 0, lambda c: c.exp_avgs[0].double())), "exp_avgs[0]"),
        "param dtype int32": (mod(set_item("params", 0, lambda c: c.params[0].int())), "params[0]"),
        "grad shape": (mod(set_item("grads", 0, lambda c: c.grads[0][:10].clone())), "grads[0]"),
        "exp_avg_sq shape": (mod(set_item("exp_avg_sqs", 1, lambda c: c.exp_avg_sqs[1].view(5, 1))), "exp_avg_sqs[1]"),
        "max_sq shape": (
            mod(set_item("max_sqs", 1, lambda c: torch.zeros(4, dtype=torch.bfloat16))),
            "max_exp_avg_sqs[1]",
        ),
        "amsgrad placeholder": (
            mod(set_item("max_sqs", 1, lambda c: torch.empty(0, dtype=torch.bfloat16))),
            "max_exp_avg_sqs[1]",
        ),
        "sparse grad": (mod(set_item("grads", 0, lambda c: c.grads[0].to_sparse())), "grads[0]"),
        "non-contiguous grad": (mod(set_item("grads", 0, lambda c: torch.zeros(2046)[::2])), "grads[0]"),
        "non-contiguous param": (
            mod(set_item("params", 1, lambda c: torch.zeros(10, dtype=torch.bfloat16)[::2])),
            "params[1]",
        ),
        "non-contiguous exp_avg": (mod(set_item("exp_avgs", 0, lambda c: torch.zeros(2046)[1::2])), "exp_avgs[0]"),
        "step dtype": (mod(set_item("steps", 0, lambda c: torch.tensor(0.0, dtype=torch.float64))), "steps[0]"),
        "hparams shape": (mod(setattr_("hp", lambda c: c.hp[:, :7].contiguous())), "hparams"),
        "hparams dtype": (mod(setattr_("hp", lambda c: c.hp.float())), "hparams"),
        "tables differ": (mod(setattr_("wd_table", torch.ones(3))), "wd_table"),
        "empty tables": (
            mod(lambda c: (setattr(c, "lr_table", torch.ones(0)), setattr(c, "wd_table", torch.ones(0)))),
            "lr_table",
        ),
        "table dtype": (mod(setattr_("lr_table", lambda c: c.lr_table.double())), "lr_table"),
        "step_count dtype": (mod(setattr_("step_count", torch.tensor(0.0))), "step_count"),
        "grad_scale dtype": (mod(setattr_("grad_scale", torch.tensor(1.0, dtype=torch.float64))), "grad_scale"),
        "found_inf shape": (mod(setattr_("found_inf", torch.zeros(2))), "found_inf"),
    }


BAD = _bad_cases()


# the plan reads gradients from .grad, whose setter already refuses these, and takes its lists once
NOT_FOR_PLAN = {"grad dtype", "grad shape", "param dtype int32"}


@pytest.mark.parametrize(
    "op,name", [(op, n) for op in OPS for n in BAD if op != "plan" or not (n in NOT_FOR_PLAN or "length" in n)]
)
def test_bad_input_raises_and_writes_nothing(op, name):
    build, needle = BAD[name]
    case = build()
    before = case.state()
    with pytest.raises(RuntimeError, match=r"d2z::adamw_step_: .*" + needle.replace("[", r"\[").replace("]", r"\]")):
        case.run(op)
    for x, y in zip(case.state(), before):
        assert x.layout != torch.strided or torch.equal(x, y)


def test_mixed_devices_rejected():
    """A tensor on another device than step_count (meta here: the only other device on a CPU machine)."""
    case = Case([1023, 5])
    case.exp_avgs[1] = torch.empty(5, device="meta")
    before = case.state()[:2]
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] is on meta"):
        OPS["cpu"].redispatch(keyset, *case.args())
    for x, y in zip(case.state()[:2], before):
        assert torch.equal(x, y)


# ---- the step holder: d2z_optim._C.CpuStepHolder ----


def _plan(case):
    for p, g in zip(case.params, case.grads):
        p.grad = g
    return _C.CpuStepHolder(case.params, case.exp_avgs, case.exp_avg_sqs, case.max_sqs, case.steps, case.group_index)


def _plan_step(plan, case, skip_nonfinite=False):
    return plan.step(*case.args()[6:10], *case.args()[11:], skip_nonfinite)


def test_plan_reads_new_gradients_and_swapped_tensors_each_step():
    """A plan keeps its tensors, not their memory: a new .grad, a parameter or a state given new
    memory with `.data = ...` are read anew on the next step (bitwise the op's result)."""
    case = Case([1023, 5, 64], dtypes=DTYPES, groups=("plain", "amsgrad"))
    ref = case.clone()
    plan = _plan(case)
    assert _plan_step(plan, case) == StepStatus.APPLIED
    ref.run("cpu")
    gen = torch.Generator().manual_seed(5)
    for k, p in enumerate(case.params):
        ref.grads[k] = _tensor(p.numel(), p.dtype, 0, gen, 0.5)
        p.grad = ref.grads[k].clone()
    old_param, old_exp_avg = case.params[0].detach().clone(), case.exp_avgs[1].clone()
    case.params[0].data = case.params[0].detach().clone()
    case.exp_avgs[1].data = case.exp_avgs[1].clone()
    assert _plan_step(plan, case) == StepStatus.APPLIED
    ref.run("cpu")
    assert_same_state(case, ref, exact=True)
    assert not torch.equal(case.params[0], old_param) and not torch.equal(case.exp_avgs[1], old_exp_avg)


def test_plan_declines_without_writing_when_a_gradient_is_missing_or_a_size_changed():
    case = Case([1023, 5, 64])
    plan = _plan(case)
    before = case.state()
    case.params[1].grad = None
    assert _plan_step(plan, case) == StepStatus.DECLINED  # parameter 1: no gradient
    case.params[1].grad = case.grads[1]
    case.params[2].data = torch.zeros(65)
    case.params[2].grad = torch.zeros(65)
    assert _plan_step(plan, case) == StepStatus.DECLINED  # parameter 2: another size than when built
    case.params[2].data, case.params[2].grad = before[2].clone(), case.grads[2]
    for x, y in zip(case.state(), before):
        assert torch.equal(x, y)
    assert _plan_step(plan, case) == StepStatus.APPLIED


def test_plan_raises_the_ops_errors_and_writes_nothing():
    case = Case([1023, 5])
    plan = _plan(case)
    before = case.state()
    case.params[0].data = case.params[0].detach().to(torch.bfloat16)  # its gradient stays float32
    with pytest.raises(
        RuntimeError, match=r"d2z::adamw_step_: grads\[0\] has dtype Float but params\[0\] has BFloat16"
    ):
        _plan_step(plan, case)
    case.params[0].data = before[0].clone()
    case.exp_avg_sqs[1].data = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[1\] has dtype Double"):
        _plan_step(plan, case)
    for x, y in zip(case.state(), before):
        assert x.dtype != y.dtype or torch.equal(x, y)
    with pytest.raises(RuntimeError, match=r"d2z\.CpuStepHolder: exp_avgs has 1 entries but params has 2"):
        _C.CpuStepHolder(case.params, case.exp_avgs[:1], case.exp_avg_sqs, [], case.steps, [0, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_skip_nonfinite_finds_every_nan_and_inf_and_nothing_else(dtype):
    """skip_nonfinite: a NaN or an Inf anywhere in any gradient makes the step a no-op (returns
    -1, nothing written); the largest finite values, subnormals and -0.0 do not."""
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal
    case = Case([1023, 5, 70000], dtypes=(dtype,), groups=("plain", "amsgrad"))
    case.grads[2][-1] = big
    case.grads[2][0] = -big
    case.grads[1][1] = tiny
    case.grads[0][3] = -0.0
    plan = _plan(case)
    ref = case.clone()
    assert _plan_step(plan, case, skip_nonfinite=True) == StepStatus.APPLIED  # all finite: applied
    ref.run("cpu")
    assert_same_state(case, ref, exact=True)
    for k, i in ((0, 0), (1, 4), (2, 65536), (2, 69999)):  # first, last, across a chunk boundary
        for bad in (float("nan"), float("inf"), -float("inf")):
            g = case.grads[k]
            keep = g[i].clone()
            g[i] = bad
            before = case.state()
            assert _plan_step(plan, case, skip_nonfinite=True) == StepStatus.SKIPPED_NONFINITE, (k, i, bad)
            for x, y in zip(case.state(), before):
                assert torch.equal(x.nan_to_num(), y.nan_to_num())
            g[i] = keep
    assert _plan_step(plan, case, skip_nonfinite=False) == StepStatus.APPLIED


def test_plan_owns_its_parameters_python_objects_and_releases_them():
    """The plan keeps each parameter's Python object alive (it reads the tensor the object holds
    at each step) and lets go of it when the plan is dropped."""
    case = Case([5])
    plan = _plan(case)
    alive = weakref.ref(case.params[0])
    case.params[0].grad = case.grads[0]
    params, case.params = case.params, None
    del params
    gc.collect()
    assert alive() is not None
    assert plan.step(*case.args()[6:10], *case.args()[11:], False) == StepStatus.APPLIED
    del plan
    gc.collect()
    assert alive() is None


# ---- torch.library.opcheck: schema (mutations as declared), fake kernel, autograd, AOT dispatch ----
@pytest.mark.parametrize("op", ["cpu", "replay"])
@pytest.mark.parametrize("kind", ["plain", "amsgrad_amp"])
def test_opcheck(op, kind):
    if kind == "plain":
        case = Case([5, 1023, 0], dtypes=DTYPES, groups=("plain", "maximize"))
    else:
        case = Case([5, 64], dtypes=(torch.bfloat16,), groups=("amsgrad", "plain"), grad_scale=4.0, found_inf=0.0)
    result = torch.library.opcheck(OPS[op], case.args())
    assert set(result.values()) == {"SUCCESS"}, result
