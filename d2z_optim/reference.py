"""A float64 AdamW with per-step LR multipliers: the numerical reference for every backend.

Independent of the backends' code: Python-float scalars, float64 tensors, the
textbook order of torch's AdamW (decoupled decay first, then Adam). Tests and
``benchmarks/bench_numerics.py`` measure each backend's error against it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Fp64AdamW"]


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
