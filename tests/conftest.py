"""Shared helpers: seeded parameters and gradients, a float64 AdamW reference, training loops."""

from __future__ import annotations

import io
import math

import pytest
import torch

import d2z_optim

# Every backend built into this install; a missing extension fails loudly in
# test_backends.py, never silently drops a backend from these lists.
BACKENDS = [n for n, why in d2z_optim.available_backends().items() if why is None and n != "triton"]

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


class Fp64AdamW:
    """An independent float64 AdamW with per-step LR multipliers: the numerical reference.

    Scalars are Python floats, tensors float64, the textbook update order of
    torch's AdamW (decoupled decay first, then Adam). ``mult(i)``/``wd_mult(i)``
    give the multipliers of the (i+1)-th step.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        maximize=False,
        mult=lambda i: 1.0,
        wd_mult=lambda i: 1.0,
        independent=False,
    ):
        self.p = [p.detach().to(torch.float64).clone() for p in params]  # real parameters only
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.vmax = [torch.zeros_like(v) for v in self.v]
        self.steps = [0] * len(self.p)
        self.k = 0
        self.h = dict(lr=lr, betas=betas, eps=eps, wd=weight_decay, amsgrad=amsgrad, maximize=maximize)
        self.mult, self.wd_mult, self.independent = mult, wd_mult, independent

    def step(self, grads):
        h = self.h
        b1, b2 = h["betas"]
        m_k, wm_k = self.mult(self.k), self.wd_mult(self.k)
        lr_t = h["lr"] * m_k
        decay = (m_k if self.independent else lr_t) * h["wd"] * wm_k
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.to(self.p[i].dtype)
            g = -g if h["maximize"] else g
            self.steps[i] += 1
            t = self.steps[i]
            p = self.p[i]
            p.mul_(1 - decay)
            self.m[i].mul_(b1).add_(g, alpha=1 - b1)
            self.v[i].mul_(b2).add_(g * g, alpha=1 - b2)
            vhat = self.v[i]
            if h["amsgrad"]:
                torch.maximum(self.vmax[i], self.v[i], out=self.vmax[i])
                vhat = self.vmax[i]
            denom = vhat.sqrt() / math.sqrt(1 - b2**t) + h["eps"]
            p.add_(self.m[i] / denom, alpha=-lr_t / (1 - b1**t))
        self.k += 1


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
