"""The device step holder (d2z_optim._C.DeviceStepHolder) on CPU tensors: the CUDA kind replays the
CUDA grid on the host from the metadata it keeps, so its host logic (keys, checks on a change,
buffers, capture bookkeeping) runs here exactly as on a GPU, bit for bit against the op's replay.
"""

from __future__ import annotations

import pytest
import torch

from d2z_optim import _C, AdamW
from d2z_optim.backends import contract, cpp_backend
from d2z_optim.backends.contract import DeviceWork, GroupWork, StepStatus, flatten

from .test_csrc_op import Case, assert_same_state


def _work(case: Case) -> DeviceWork:
    """The case's tensors as a DeviceWork (its hparams rows as groups), gradients on .grad."""
    groups = []
    for gi in range(len(case.groups)):
        ids = [k for k in range(len(case.params)) if case.group_index[k] == gi]
        row = case.hp[gi].tolist()
        g = GroupWork(row[0], row[1], row[2], row[3], row[4], bool(row[5]), bool(row[6]), rounding=row[7])
        g.params = [case.params[k] for k in ids]
        g.grads = [case.grads[k] for k in ids]
        g.exp_avgs = [case.exp_avgs[k] for k in ids]
        g.exp_avg_sqs = [case.exp_avg_sqs[k] for k in ids]
        g.max_exp_avg_sqs = [case.max_sqs[k] for k in ids] if row[5] else []
        g.steps = [case.steps[k] for k in ids]
        groups.append(g)
    for p, g in zip(case.params, case.grads):
        p.grad = g
    w = DeviceWork(case.lr_table, case.wd_table, case.step_count, case.independent_wd, groups)
    w.grad_scale, w.found_inf = case.grad_scale, case.found_inf
    return w


def _grouped(case: Case) -> Case:
    """The case with its tensors in group order (as flatten() orders them): holder and op compare."""
    order = sorted(range(len(case.params)), key=lambda k: case.group_index[k])
    c = case.clone()
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"):
        setattr(c, name, [getattr(c, name)[k] for k in order])
    if c.max_sqs:
        c.max_sqs = [c.max_sqs[k] for k in order]
    c.group_index = [case.group_index[k] for k in order]
    return c


def _holder(case: Case, **kw):
    return cpp_backend.CudaStepHolder(_work(case), **kw)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float16), (torch.float64, torch.float32)])
def test_the_cuda_holder_replays_bitwise_like_the_op(dtypes):
    case = _grouped(
        Case([1023, 5, 65537, 0, 64], dtypes=dtypes, groups=("plain", "amsgrad", "maximize"), offsets=(0, 1))
    )
    ref = case.clone()
    h = _holder(case)
    for _ in range(3):
        assert h.step(_work(case)) is StepStatus.APPLIED
        ref.run("replay")
    assert_same_state(case, ref, exact=True)


def test_the_holder_uploads_only_when_an_address_changes():
    case = _grouped(Case([100, 7], groups=("plain",)))
    h = _holder(case)
    w = _work(case)
    h.step(w)
    v = h._holder.version
    h.step(_work(case))  # same tensors: the metadata stays
    assert h._holder.version == v
    ref = case.clone()
    case.grads[1] = case.grads[1].clone()  # a new gradient tensor (zero_grad(set_to_none=True)): new address
    ref.grads[1] = case.grads[1].clone()
    assert h.step(_work(case)) is StepStatus.APPLIED and h._holder.version == v + 1
    ref.run("replay")
    case_after = case.clone()
    ref_after = ref
    assert_same_state(case_after, ref_after)
    case.params[0].data = case.params[0].detach().clone()  # a `.data =` swap: seen, new metadata
    h.step(_work(case))
    assert h._holder.version == v + 2


@pytest.mark.parametrize("state", ["exp_avgs", "exp_avg_sqs", "max_sqs", "steps"])
def test_a_state_swapped_in_place_is_seen_by_the_next_step(state):
    """A steady step reads the states' headers only (their seals, not their data pointers): a
    `.data =` swap of a state is still seen, new metadata built, and the swapped-in tensor stepped,
    bit for bit as the op steps it; swapped again (a new storage at the freed one's address, at
    times), still seen: the holder keeps the storages it sealed alive."""
    case = _grouped(Case([100, 7, 9], dtypes=(torch.float32,), groups=("amsgrad",)))
    h = _holder(case)
    h.step(_work(case))
    ref = case.clone()
    for swap in range(3):
        v = h._holder.version
        for c in (case, ref):
            t = getattr(c, state)[1]
            t.data = t.detach().clone() + (0.0 if state == "steps" else 1e-3 * (swap + 1))
        assert h.step(_work(case)) is StepStatus.APPLIED and h._holder.version == v + 1
        ref.run("replay")
        assert_same_state(case, ref, exact=True)


def test_the_holder_declines_and_refuses_without_writing():
    case = _grouped(Case([100, 7, 9], dtypes=(torch.float32,), groups=("plain", "amsgrad")))
    h = _holder(case)
    h.step(_work(case))
    w = _work(case)
    before = case.state()
    case.params[1].grad = None
    assert h.step(w) is StepStatus.DECLINED  # a parameter without its gradient
    case.params[1].grad = case.grads[1]
    case.exp_avg_sqs[2].data = torch.zeros(9, dtype=torch.float64)  # a state of another dtype: the op's refusal
    assert h.step(w) is StepStatus.DECLINED
    with pytest.raises(_C.StepRefused, match=r"exp_avg_sqs\[2\] has dtype Double"):
        h._holder.step(w.step_count, w.lr_table, w.wd_table, flatten(w).hparams, False, None, None, False)
    case.exp_avg_sqs[2].data = before[3 * 3 + 2].clone()  # back (state(): params, grads, exp_avgs, exp_avg_sqs)
    for x, y in zip(case.state(), before):
        assert x.dtype != y.dtype or torch.equal(x, y)


def test_a_capture_keeps_its_buffers_and_a_later_change_never_overwrites_them(monkeypatch):
    """A mocked capture: the metadata a graph recorded is kept, unchanged, after an eager step met
    new addresses; the step cache keeps what a dropped holder's captures recorded."""
    case = _grouped(Case([300, 9], groups=("plain",)))
    h = _holder(case)
    h.step(_work(case))
    monkeypatch.setattr(contract, "capturing", lambda dev: True)
    h.step(_work(case))  # "captured": the graph reads this metadata at every replay
    recorded = h._holder.metadata
    frozen = recorded.clone()
    monkeypatch.setattr(contract, "capturing", lambda dev: False)
    case.grads[0] = case.grads[0].clone()  # an eager step with new gradients
    h.step(_work(case))
    assert h._holder.metadata.data_ptr() != recorded.data_ptr()  # a new buffer, not the recorded one
    assert torch.equal(recorded, frozen)
    assert any(t.data_ptr() == recorded.data_ptr() for t in h.captured())
    # a change met while capturing gets new buffers too, kept with the first
    monkeypatch.setattr(contract, "capturing", lambda dev: True)
    case.grads[1] = case.grads[1].clone()
    h.step(_work(case))
    kept = {t.data_ptr() for t in h.captured()}
    assert recorded.data_ptr() in kept and h._holder.metadata.data_ptr() in kept


def test_the_step_cache_keeps_the_captured_buffers_of_holders_it_drops(monkeypatch):
    from d2z_optim.step_cache import CachedLists, StepCache

    cache = StepCache(lambda p, a: {})
    lists = object.__new__(CachedLists)
    kept = [torch.zeros(3)]
    lists.holder = type("H", (), {"captured": lambda self: kept})()
    cache.lists = lists
    cache.lists = None
    assert cache.retained == kept


def test_many_optimizers_alive_keep_their_own_buffers():
    """Each holder owns its metadata (no process-wide cache to evict): 20 holders stepped in turn
    stay right, where an evicting cache of 8 would have reused memory under them."""
    cases = [_grouped(Case([50 + k, 3], groups=("plain",), seed=k)) for k in range(20)]
    refs = [c.clone() for c in cases]
    holders = [_holder(c) for c in cases]
    buffers = {h._holder.metadata.data_ptr() for h, c in zip(holders, cases) if h.step(_work(c)) or True}
    for _ in range(2):
        for h, c in zip(holders, cases):
            h.step(_work(c))
    for r in refs:
        r.run("replay", 3)
    for c, r in zip(cases, refs):
        assert_same_state(c, r, exact=True)
    assert len(buffers) == 20


def test_the_device_mode_needs_a_cuda_build():
    if cpp_backend.has_kernel("CUDA"):
        pytest.skip("a CUDA build: the device mode is available")
    with pytest.raises(RuntimeError, match="needs a CUDA build"):
        _holder(_grouped(Case([5])), mode="device")


def test_hparams_tables_a_capture_used_are_kept(monkeypatch):
    table = contract.HparamsTable()
    g = GroupWork(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, params=[torch.zeros(2)])
    work = DeviceWork(torch.ones(3), torch.ones(3), torch.zeros((), dtype=torch.int64), False, [g])
    monkeypatch.setattr(contract, "capturing", lambda dev: True)
    first = table.get(work)
    monkeypatch.setattr(contract, "capturing", lambda dev: False)
    g.lr = 2e-3  # a new value: a new table; the captured one is kept, unchanged
    second = table.get(work)
    assert second.data_ptr() != first.data_ptr() and table.retained[0] is first and first[0, 0] == 1e-3


def test_the_optimizer_steps_through_the_cuda_holder_logic_on_cpu_tensors(monkeypatch):
    """The optimizer's own path (step cache -> holder), with the CUDA kind's holder replaying the
    grid on CPU tensors in place of the CPU holder: the same results as the torch backend."""
    import dataclasses

    from d2z_optim import backends

    cpu = backends._load("cpu")
    monkeypatch.setitem(backends._LOADED, "cpu", dataclasses.replace(cpu, holder=cpp_backend.CudaStepHolder))
    torch.manual_seed(0)
    p0 = [torch.randn(33, 17), torch.randn(1023), torch.randn(5, 1, 3)]
    ours = [torch.nn.Parameter(p.clone()) for p in p0]
    ref = [torch.nn.Parameter(p.clone()) for p in p0]
    a = AdamW(ours, lr=1e-2, total_steps=8, amsgrad=True)
    b = AdamW(ref, lr=1e-2, total_steps=8, amsgrad=True, backend="torch")
    for k in range(6):
        g = torch.Generator().manual_seed(k)
        for x, y in zip(ours, ref):
            x.grad = torch.randn(x.shape, generator=g)
            y.grad = x.grad.clone()
        a.step()
        b.step()
    assert isinstance(a._cache.lists.holder, cpp_backend.CudaStepHolder)
    for x, y in zip(ours, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
