"""step() never reads a device value on the host and never copies between devices.

Every aten op dispatched during step() is recorded by a TorchDispatchMode. Host
reads show up as ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``,
tensor indexing by a tensor) or as ops that return Python values (``equal``,
``is_nonzero``); cross-device copies as ``_to_copy``/``copy_`` whose tensors sit
on different devices.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d2z_optim import AdamW, schedules

from .conftest import make_params, run

HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "is_same_size", "tolist"}


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.cross_device = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        self.ops.append(name)
        devices = {a.device for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_", "to"):
            devices |= {o.device for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)}
            if len(devices) > 1:
                self.cross_device.append((name, devices))
        return out


def recorded_step(opt):
    with Recorder() as rec:
        opt.step()
    return rec


def test_the_recorder_sees_host_reads():
    """The check can fail: .item(), int() and tensor indexing are all caught."""
    t, i = torch.ones(3), torch.tensor(1)
    for read in (lambda: t.sum().item(), lambda: int(i), lambda: t[i], lambda: bool(t.any())):
        with Recorder() as rec:
            read()
        assert "_local_scalar_dense" in rec.ops or "is_nonzero" in rec.ops


NAMES = [n for n in schedules.names() if n != "custom"]
OPTIONS = [
    dict(),
    dict(amsgrad=True, maximize=True),
    dict(weight_decay_mode="independent", wd_schedule="linear-d2z"),
    dict(foreach=False),
    dict(lr=torch.tensor(1e-2), capturable=True),
    dict(max_grad_norm=1.0),
    dict(max_grad_norm=0.5, norm_type=float("inf"), spike_skip=True, spike_window=2, skip_nonfinite=True),
]


@pytest.mark.filterwarnings("ignore:d2z_optim.AdamW. step.. called more than")
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("name", NAMES + ["custom", None])
def test_step_never_syncs(backend, name, opts):
    p = make_params()
    if name == "custom":
        sched = dict(schedule=[1.0, 0.5, 0.25, 0.0], wd_schedule=None if "wd_schedule" not in opts else [1.0] * 4)
        opts = {k: v for k, v in opts.items() if k != "wd_schedule"}
    elif name is None:
        sched = dict(total_steps=4) if "wd_schedule" in opts else {}
    else:
        sched = dict(schedule=name, total_steps=8, warmup=1)
    opt = AdamW([{"params": p[:2]}, {"params": p[2:], "lr": 3e-3}], backend=backend, **sched, **opts)
    run(lambda q: opt, p, 1)  # state creation
    for k in range(9):  # steady state, and past the end of the table
        for q in p:
            q.grad = torch.randn_like(q)
        if k == 2:
            p[1].grad = None
        rec = recorded_step(opt)
        assert not (set(rec.ops) & HOST_READS), sorted(set(rec.ops) & HOST_READS)
        assert not rec.cross_device, rec.cross_device
        assert rec.ops  # the step did run through the dispatcher
    opt.current_lr()
    with Recorder() as rec:
        lrs = opt.current_lr()
    assert not (set(rec.ops) & HOST_READS) and all(isinstance(x, torch.Tensor) for x in lrs)
