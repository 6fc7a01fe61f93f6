"""The Triton kernels of clip-by-global-norm: each update program's chunk reduced to one partial,
then one program that combines the partials and takes the step's decisions.

Kernels only (launched by ``d2z_optim/backends/triton_backend.py`` over the update's own
metadata and work items). The decisions are those of ``d2z_optim/grad_clip.py`` (``finalize``)
and ``csrc/kernels/clip_math.h``:

    norm = sqrt(sum of squares) (ord 2) or max |g| (ord inf; a NaN wins), times 1/grad_scale
    skip = found_inf != 0 or norm not finite or (spike: window full and norm > mean + sigma std)
    coef = min(1, (1 / (norm + 1e-6)) * max_norm) in float32, as torch computes clip_grad_norm_'s
           max_norm / (norm + 1e-6) (1 without clipping)
    grad_scale_out = (grad_scale or 1) / coef; every finite norm of a step AMP did not skip goes
    into the window, spikes included
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["FINALIZE_BLOCK", "clip_finalize_kernel", "norm_kernel"]

FINALIZE_BLOCK = 1024  # partials (and window norms) combined per iteration of the one program
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # the largest float32


@triton.jit
def norm_kernel(
    meta_ptr,  # int64 [N, META_COLS]: the update's metadata
    work_ptr,  # int64 [W, 2]: (tensor row, chunk start), one program per item (the update's items)
    partial_ptr,  # float64 [W]: this program's partial
    META_COLS: tl.constexpr,
    COL_G: tl.constexpr,
    COL_NUMEL: tl.constexpr,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 gradients
    INF: tl.constexpr,  # ord inf: the partial is a max
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(work_ptr + 2 * pid)
    start = tl.load(work_ptr + 2 * pid + 1)
    row = meta_ptr + tensor * META_COLS
    end = tl.minimum(start + CHUNK, tl.load(row + COL_NUMEL))
    g_ptr = tl.load(row + COL_G).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(g_ptr + offs, mask=offs < end, other=0.0).to(COMPUTE)
        if INF:
            a = tl.abs(x)
            nan = nan | (a != a).to(tl.int32)
            acc = tl.maximum(acc, a)
        else:
            acc += x * x
    if INF:
        total = tl.max(acc.to(tl.float64), axis=0)
        total = tl.where(tl.max(nan, axis=0) != 0, float("nan"), total)
    else:
        total = tl.sum(acc.to(tl.float64), axis=0)
    tl.store(partial_ptr + pid, total)


@triton.jit
def clip_finalize_kernel(
    partial_ptr,  # float64 [n_partials]
    n_partials,
    grad_scale_ptr,  # float32, read when HAS_GRAD_SCALE
    found_inf_ptr,  # float32, read when HAS_FOUND_INF
    ring_ptr,  # float32 [window]
    window,
    recorded_ptr,  # int64
    grad_norm_ptr,  # float32 out
    grad_scale_out_ptr,  # float32 out: what the update divides the gradients by
    found_out_ptr,  # float32 out: 1 skips the step
    max_norm,  # float32; CLIP only
    sigma,  # float32; SPIKE only
    INF: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CLIP: tl.constexpr,
    SPIKE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, n_partials, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
        if INF:
            nan = nan | (x != x).to(tl.int32)
            acc = tl.maximum(acc, x)
        else:
            acc += x
    if INF:
        total = tl.where(tl.max(nan, axis=0) != 0, float("nan"), tl.max(acc, axis=0))
        norm = total.to(tl.float32)
    else:
        norm = tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32)
    if HAS_GRAD_SCALE:
        norm = norm * (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32)
    finite = tl.abs(norm) <= FLT_MAX  # not a NaN or an Inf
    record = finite
    if HAS_FOUND_INF:
        record = record & (tl.load(found_inf_ptr) == 0.0)
    skip = ~record
    if SPIKE:
        rec = tl.load(recorded_ptr)
        s1 = tl.zeros([BLOCK], dtype=tl.float64)
        for off in range(0, window, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            s1 += tl.load(ring_ptr + offs, mask=offs < window, other=0.0).to(tl.float64)
        mean = tl.sum(s1, axis=0) / window
        s2 = tl.zeros([BLOCK], dtype=tl.float64)
        for off in range(0, window, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            d = tl.load(ring_ptr + offs, mask=offs < window, other=0.0).to(tl.float64) - mean
            s2 += tl.where(offs < window, d * d, 0.0)
        std = tl.sqrt(tl.sum(s2, axis=0) / (window - 1))
        spike = (rec >= window) & (norm.to(tl.float64) > mean + std * sigma)
        skip = skip | spike
        slot = rec % window
        tl.store(ring_ptr + slot, tl.where(record, norm, tl.load(ring_ptr + slot)))
        tl.store(recorded_ptr, rec + tl.where(record, 1, 0).to(tl.int64))
    coef = tl.full([], 1.0, tl.float32)
    if CLIP:
        coef = (1.0 / (norm + 1e-6)) * max_norm
        coef = tl.where(coef < 1.0, coef, 1.0)
    scale = tl.full([], 1.0, tl.float32)
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr)
    tl.store(grad_norm_ptr, norm)
    tl.store(found_out_ptr, tl.where(skip, 1.0, 0.0).to(tl.float32))
    tl.store(grad_scale_out_ptr, scale / coef)
