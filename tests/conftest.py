"""Shared helpers: seeded parameters and gradients, a float64 AdamW reference, training loops."""

from __future__ import annotations

import gc
import io
import os
import sys

# OpenMP's idle threads sleep instead of spinning (read when torch loads libgomp, so before the import;
# a value already in the environment is kept; subprocesses inherit it). The thread count and every
# code path stay the same; a thread waiting for one the OS has descheduled no longer burns a core.
# On this 2-core VM, beside two CPU-bound processes standing in for the interpreter children (below):
# the HF Trainer tests took 73 s spinning, 38 s passive, with half the CPU time, left to the children.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

import d2z_optim
from d2z_optim import backends
from d2z_optim.reference import Fp64AdamW  # noqa: F401  (re-exported for the tests)

# Every backend of this install that runs on CPU tensors (the suite's device): "torch", and
# "cpu" from the extension (also in CUDA builds). A missing extension fails loudly in
# test_backends.py, never silently drops a backend from these lists.
BACKENDS = [
    n
    for n, why in d2z_optim.available_backends().items()
    if why is None and backends._load(n).device_type in (None, "cpu")
]
# D2Z_TEST_BACKENDS=triton (with TRITON_INTERPRET=1): the backend-parametrised tests on those only
# (tests/test_triton_interpret.py runs test_fidelity.py so, in a child process)
if os.environ.get("D2Z_TEST_BACKENDS"):
    BACKENDS = [n for n in os.environ["D2Z_TEST_BACKENDS"].split(",") if n in BACKENDS]

if os.environ.get("TRITON_INTERPRET") == "1":
    from .interpreter_fma import install

    install()  # an interpreter whose tl.fma rounds twice gets one that rounds once

SHAPES = [(33, 17), (1,), (1023,), (0,), (5, 1, 3)]


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def grad_exponents(dtype):
    """Gradient scales 10^e across tensors: 1e-3 .. 10, narrowed for fp16, whose
    states underflow below ~6e-8 (torch's fp16 AdamW itself turns them into NaN)."""
    return (-1, 0, 1) if dtype == torch.float16 else (-3, -2, -1, 0, 1)


def grads_for(step: int, shapes, dtype=torch.float32, seed=1000):
    """Fixed-seed gradients with a realistic scale spread across tensors."""
    g = torch.Generator().manual_seed(seed + step)
    exps = grad_exponents(dtype)
    out = []
    for j, s in enumerate(shapes):
        scale = 10.0 ** exps[j % len(exps)]
        out.append((torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype))
    return out


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def run(opt_factory, params, steps, *, skip=None, dtype=None, scheduler=None):
    """Train ``params`` for ``steps`` steps on fixed gradients; ``skip(step, i)`` leaves grad None."""
    shapes = [tuple(p.shape) for p in params]
    opt = opt_factory(params)
    sched = scheduler(opt) if scheduler else None
    for k in range(steps):
        for i, (p, g) in enumerate(zip(params, grads_for(k, shapes, dtype or params[0].dtype))):
            p.grad = None if (skip and skip(k, i)) else g.to(p.dtype)
        opt.step()
        if sched:
            sched.step()
    return opt


def roundtrip(state_dict):
    """Through torch.save/torch.load, as users do (a live state_dict shares buffers)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def framework(name: str):
    """Import a training framework for the integration tests. make test installs them
    (requirements-frameworks.txt) and sets D2Z_REQUIRE_FRAMEWORKS=1: there a missing one fails;
    elsewhere (the CUDA wheel's suite, a bare checkout) its tests are skipped, saying so."""
    if os.environ.get("D2Z_REQUIRE_FRAMEWORKS") == "1":
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -r requirements-frameworks.txt)")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: start only what will run
def pytest_collection_modifyitems(session, config, items):
    """Start the Triton interpreter's children (the suite's longest tests, one core each) as soon
    as they are known to be selected, so they run beside the rest of the suite."""
    children = {
        "test_interpreter": "interpreter",
        "test_the_optimizer_suite_on_the_triton_backend_under_the_interpreter": "suite",
    }
    chosen = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.endswith(".test_triton_interpret") and module.HAVE_TRITON:
            if getattr(item, "originalname", None) in children:
                chosen.add((module, children[item.originalname]))
    for module, name in sorted(chosen, key=lambda c: c[1]):
        module.start(name)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """What collection imported (torch, transformers, Lightning, Triton: ~450,000 objects) is kept
    for the whole session: frozen, no full collection walks it again (accelerate alone calls
    gc.collect() twice per Trainer run; the HF and Lightning tests spent 12.6 s in full collections,
    3.1 s frozen). Objects the tests make are collected as before."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    gc.unfreeze()  # collectable again at exit (else nanobind, in Triton's bindings, reports them as leaks)
    module = sys.modules.get(__package__ + ".test_triton_interpret") if __package__ else None
    if module is not None:
        module.stop_all()
