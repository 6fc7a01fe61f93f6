"""The pure-PyTorch backend: the reference semantics every fused kernel is tested against.

It runs anywhere PyTorch runs (any device, complex and float64 parameters) and
never reads a device value on the host: the schedule multiplier is gathered
from the device table with ``index_select`` and every per-step scalar (bias
corrections, step size, decay factor) is a float64 device tensor, rounded once
to the compute dtype, just as torch's for-loop AdamW rounds its Python floats.

Reduced-precision parameters (bf16, fp16) are updated in float32 copies and
rounded once on the way back, as the fused kernels do ("all math in fp32"); so are moments
stored in another dtype than their parameter's (``exp_avg_dtype``): each array is loaded into the
compute dtype and rounded to nearest even into its own storage dtype, or stochastically where the
group's ``rounding`` asks (every 16-bit value the step writes: :mod:`.stochastic`, the kernels' bits).
A bf16 parameter with a remainder (``master_weights="remainders"``) is joined with it into its fp32
master value, updated as an fp32 parameter would be, and split back into both (:mod:`.remainders`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import remainders, stochastic
from .contract import DeviceWork, GroupWork

name = "torch"


def step(work: DeviceWork) -> None:
    """Apply one AdamW step to every tensor of ``work`` and advance its counter.

    With ``work.found_inf`` (AMP, or ``skip_nonfinite``) a nonzero value makes the
    whole step a no-op, decided on the device: every coefficient of the update is
    multiplied by ``ok = (found_inf == 0)`` and non-finite gradients are zeroed.
    """
    idx = work.step_count.clamp(max=work.lr_table.numel() - 1).view(1)
    m = work.lr_table.index_select(0, idx).squeeze(0).to(torch.float64)
    wm = work.wd_table.index_select(0, idx).squeeze(0).to(torch.float64)
    amp = None
    if work.found_inf is not None or work.grad_scale is not None or work.clip_coef is not None:
        ok = torch.ones((), dtype=torch.float64, device=m.device)
        if work.found_inf is not None:
            ok = (work.found_inf.reshape(()) == 0).to(torch.float64)
        inv_scale = None if work.grad_scale is None else 1.0 / work.grad_scale.reshape(()).to(torch.float64)
        amp = (ok, inv_scale, work.clip_coef)
    first = 0  # each tensor's position among the step's tensors (the kernels' order: stochastic rounding)
    for g in work.groups:
        if g.params:
            _group_step(g, m, wm, independent_wd=work.independent_wd, amp=amp, sr=(work.step_count, first))
            first += len(g.params)
    work.step_count.add_(1 if amp is None else amp[0].to(torch.int64))


def _group_step(g: GroupWork, m: Tensor, wm: Tensor, *, independent_wd: bool, amp=None, sr=None) -> None:
    lr_t = m * g.lr  # effective LR of this step, float64 0-d
    # decoupled decay: coupled follows the LR (torch's AdamW), independent only its shape
    decay = (m if independent_wd else lr_t) * (g.weight_decay * wm)
    # per-parameter bias corrections from per-parameter steps (float64, like torch's Python math)
    ok = None if amp is None else amp[0]
    torch._foreach_add_(g.steps, 1.0 if ok is None else [ok.to(torch.float32)] * len(g.steps))  # no host read
    t = torch.stack(g.steps).to(torch.float64)
    if ok is not None:  # a skipped step leaves t as it was (maybe 0): keep the scalars finite
        t = t.clamp(min=1.0)
        decay = decay * ok
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(g.beta2, t))
    neg_step_size = -lr_t / (1.0 - torch.pow(g.beta1, t))

    if g.foreach:
        buckets = [c for b in _by_compute_dtype(range(len(g.params)), g) for c in _chunks(b, g)]
    else:
        buckets = [[i] for i in range(len(g.params))]  # the for-loop path: one tensor at a time
    for ids in buckets:
        cd = _compute_dtype(g.params[ids[0]])
        bc = bc2_sqrt.to(cd).unbind()
        ss = neg_step_size.to(cd).unbind()
        keys = None
        if g.rounding != 0 and sr is not None:  # stochastic rounding: seed = rounding - 1
            keys = [stochastic.key(int(g.rounding) - 1, sr[0], sr[1] + i) for i in ids]
        _update(g, ids, cd, (1.0 - decay).to(cd), [bc[i] for i in ids], [ss[i] for i in ids], amp, keys)


def _compute_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _compute_dtype(t: Tensor) -> torch.dtype:
    t = _compute_view(t)
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _by_compute_dtype(ids, g: GroupWork) -> list[list[int]]:
    out: dict[tuple, list[int]] = {}
    for i in ids:
        out.setdefault((g.params[i].dtype, g.params[i].is_complex()), []).append(i)
    return list(out.values())


# Elements per foreach call: the update's temporaries (the denominators, the updates, the upcast
# copies) are as large as the tensors of one call, so one call over a whole model would hold two
# model-sized fp32 temporaries at once (GPT-2 small: +1 GB). Elementwise math: the same bits.
CHUNK_ELEMENTS = 1 << 24


def _chunks(ids: list[int], g: GroupWork) -> list[list[int]]:
    """``ids`` in consecutive runs of at most :data:`CHUNK_ELEMENTS` elements (a larger tensor alone)."""
    out: list[list[int]] = [[]]
    size = 0
    for i in ids:
        n = g.params[i].numel()
        if out[-1] and size + n > CHUNK_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def _update(
    g: GroupWork,
    ids: list[int],
    cd: torch.dtype,
    keep: Tensor,
    bc2_sqrt: list[Tensor],
    neg_step_size: list[Tensor],
    amp: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
    keys: list[Tensor] | None = None,
) -> None:
    """The AdamW update of tensors ``ids`` (one storage dtype), computed in dtype ``cd``; ``keys``:
    each tensor's stochastic-rounding key (None: round to nearest even)."""
    states = [g.params, g.exp_avgs, g.exp_avg_sqs] + ([g.max_exp_avg_sqs] if g.amsgrad else [])
    stored = [[_compute_view(x[i]) for i in ids] for x in states]
    grad = [_compute_view(g.grads[i]).to(cd) for i in ids]
    # each array in the compute dtype: a copy where its storage dtype differs (a bf16 parameter,
    # a bf16 moment of an fp32 parameter), rounded back once at the end
    upcast = [any(x.dtype != cd for x in xs) for xs in stored]
    work = [[x.to(cd) for x in xs] if up else xs for xs, up in zip(stored, upcast)]
    # a parameter with a remainder: its fp32 master value, split back at the end
    rem = [g.remainders[i] if g.remainders and g.remainders[i].numel() else None for i in ids]
    if any(r is not None for r in rem):
        work[0] = [w if r is None else remainders.join(x, r) for w, x, r in zip(work[0], stored[0], rem)]
    p, m, v = work[:3]
    if g.maximize:
        grad = torch._foreach_neg(grad)
    w1, b2 = 1.0 - g.beta1, g.beta2
    if amp is not None:  # unscale, clip; on a skipped step zero the grads and freeze m and v
        ok, inv_scale, clip_coef = amp
        if inv_scale is not None:
            grad = torch._foreach_mul(grad, inv_scale.to(cd))
        if clip_coef is not None:  # clip_grad_norm_'s multiply, in the gradient's dtype as it scales .grad
            grad = [
                (x.to(gd) * clip_coef).to(cd) for x, gd in zip(grad, (_compute_view(g.grads[i]).dtype for i in ids))
            ]
        okb = ok.to(torch.bool)
        grad = [torch.where(okb, x, 0.0) for x in grad]
        w1 = [(w1 * ok).to(cd)] * len(ids)  # a list of 0-d tensors: read on the device
        b2 = torch.where(okb, b2, 1.0).to(cd)

    torch._foreach_mul_(p, keep)  # p *= 1 - decay (decoupled weight decay)
    torch._foreach_lerp_(m, grad, w1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grad, grad, 1.0 - g.beta2)
    if g.amsgrad:
        torch._foreach_maximum_(work[3], v)
    denom = torch._foreach_sqrt(work[3] if g.amsgrad else v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, g.eps)
    # p += (-step_size * m) / denom: the rounding order of torch's addcdiv, whose
    # scalar must be a host number; here it stays on the device
    upd = torch._foreach_mul(m, neg_step_size)
    torch._foreach_div_(upd, denom)
    if amp is not None:
        upd = [torch.where(okb, u, 0.0) for u in upd]
    torch._foreach_add_(p, upd)

    names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, dst, src, up in zip(names, stored, work, upcast):  # round once back to the storage dtype
        if not up:
            continue
        splits = rem if name == "param" else [None] * len(ids)
        if keys is None and all(r is None for r in splits):
            torch._foreach_copy_(dst, src)
            continue
        for j, (d, s) in enumerate(zip(dst, src)):
            if splits[j] is not None:  # the parameter's bits come from the split, exactly (never rounded)
                hi, lo = remainders.split(s)
                d.copy_(hi)
                splits[j].copy_(lo)
            elif keys is not None and stochastic.narrow(d.dtype) and s.dtype == torch.float32:
                r16 = stochastic.bits(stochastic.word(keys[j], stored[0][j]), name)  # by the parameter's offsets
                d.copy_(stochastic.round_stochastic(s, d.dtype, r16))
            else:
                d.copy_(s)
