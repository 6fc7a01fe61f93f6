"""The Triton multi-tensor AdamW kernels and their tuning constants: one launch updates every
tensor of one dtype of one step.

Kernels only (the launcher, its metadata and the custom op are
``d2z_optim/backends/triton_backend.py``); nothing here imports ``d2z_optim``: the columns of the
metadata and hyperparameter tables come in as constexpr arguments. Semantics are those of
``d2z_optim/backends/torch_backend.py`` and the C++ op (``csrc/kernels/adamw_math.h``):

    per program (one chunk of one tensor), float64 like torch's Python scalars, rounded once:
        idx = min(step_count, T - 1); m = lr_table[idx]; wm = wd_table[idx]; lr_t = lr * m
        decay = (independent_wd ? m : lr_t) * (weight_decay * wm); t = steps[i] + 1 (float32)
        bc1 = 1 - beta1^t; bc2_sqrt = sqrt(1 - beta2^t); step_size = lr_t / bc1
    per element, float32 registers (parameters and states stored as fp32, bf16 or fp16;
    float64 registers for float64, as torch's fused kernels compute them):
        g = grad (negated if maximize, divided by grad_scale); p = p * (1 - decay)
        m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v)
        p = p - step_size * m / (sqrt(amsgrad ? vmax : v) / bc2_sqrt + eps)
    stored: 16-bit values rounded to nearest even, or stochastically (the hparams column ROUNDING:
    seed + 1) with the counter-based bits of adamw_math.h (sr_key, sr_word): the same bits as the
    C++ kernels and the torch backend.

Why float64 scalars: ``1 - beta2^t`` at t = 1 is 1e-3 for beta2 = 0.999; computed in
float32 it carries a relative error of ~3e-5 (the rounding of beta2 itself), which
would show in every update. In float64 the result rounds to the same float32 as
torch's Python math. They are computed once per program (a few hundred instructions
of fp64 exp2/log2, against a chunk of 8192 elements), so the cost does not show.

``counter_kernel`` runs after ``adamw_kernel`` (every program of which reads the steps and
the schedule counter, so they cannot be advanced inside it without a grid-wide barrier): it
advances the per-parameter steps and ``step_count``. With ``found_inf`` nonzero both kernels
write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "BLOCK",
    "CHUNK_BLOCKS",
    "COUNTER_BLOCK",
    "FP_FUSION",
    "NUM_WARPS",
    "adamw_kernel",
    "counter_kernel",
    "sub_block",
]

# num_warps 8 (256 threads) and BLOCK = 256 x 16 bytes / element size (fp32: 1024,
# bf16/fp16: 2048): every thread makes exactly one 128-bit access per array and
# iteration, whatever the dtype. Bytes in flight: an iteration issues the loads of
# p, g, m, v (4 x 4 KB = 16 KB; 20 KB with amsgrad) before any use. Little's law asks
# for bandwidth x latency per SM: H100 SXM ~3.35 TB/s x ~0.7 us / 132 SMs ~ 18 KB;
# A100 ~2.0 TB/s x ~0.6 us / 108 SMs ~ 11 KB. ptxas (Triton 3.9) gives the kernel 48-112
# registers on sm_80 (2-5 resident programs per SM, 32+ KB in flight) and 74-182 on sm_90
# (1-3 programs): fp32 128 registers with amsgrad -> 2 programs, 40 KB; bf16/fp16 with
# amsgrad 182 -> 1 program, 20 KB, just above the H100 need (ptxas seems to pipeline the
# loop; capping it with maxnreg=128 made it spill).
# With 4 warps and 8 fp32 per thread ptxas spilled on sm_80 (capped itself at 64
# registers); tests/test_triton_aot.py checks there are no spills.
# CHUNK = 8 x BLOCK elements per program: the preamble (three dependent loads: work item
# -> tensor row -> step, table and hparams; then the fp64 scalars) is paid once per 8
# iterations (fp32: 224 KB of traffic), while a tensor of 1K elements costs one program.
# Reasoned, not measured (no GPU was at hand): tune with a sweep on the target GPU.
NUM_WARPS = 8
VEC_BYTES = 16
# elements per iteration, per storage dtype (read at each launch: tests shrink them)
BLOCK = {
    d: NUM_WARPS * 32 * VEC_BYTES // d.itemsize for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
}
CHUNK_BLOCKS = 8  # CHUNK = CHUNK_BLOCKS * BLOCK[dtype]
# The kernels write every fma they mean (tl.fma): no contraction is left to the compiler,
# so GPU and interpreter round alike, whatever Triton's default (it changes in 3.10).
FP_FUSION = False
COUNTER_BLOCK = 1024  # tensors per program of counter_kernel


def sub_block(block: int) -> int:
    """The masked path's elements per sub-iteration: one per thread (``NUM_WARPS * 32``)."""
    return min(block, NUM_WARPS * 32)


@triton.jit
def _update(p, g, m, v, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2):
    """The element update up to the denominator, float32; the fmas of the C++ op (adamw_math.h).

    Explicit tl.fma (one rounding) rather than a contraction the compiler may or may not
    make: the interpreter then computes what the GPU does, whatever the fp-fusion setting.
    """
    g = g * gmul
    p = tl.fma(neg_decay, p, p)  # p - decay * p
    # torch's lerp(m, g, w) (ATen, vectorised): fma(w, g - m, m) for |w| < 0.5, else
    # fma(w - 1, g - m, g), exact at w = 1 (beta1 = 0); lerp_w is w or w - 1
    m = tl.fma(lerp_w, g - m, tl.where(lerp_low, m, g))
    v = tl.fma(beta2, v, (omb2 * g) * g)
    return p, m, v


@triton.jit
def _sr_mix(x):
    """``sr_mix`` (adamw_math.h): the 32-bit hash of stochastic rounding's generator (uint32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _sr_word(key, offs):
    """``sr_word``: element ``offs``' random word of the tensor's ``key``."""
    return _sr_mix(key + offs.to(tl.uint32))


@triton.jit
def _round_f16_sr(x, r16):
    """float32 -> float16 bits rounded stochastically (``float_to_f16_sr``), as uint32."""
    u = x.to(tl.uint32, bitcast=True)
    sign = u & 0x80000000
    u = u ^ sign
    o_norm = (u + 0xC8000000 + (r16 >> 3)) >> 13
    e = u >> 23
    mant = (u & 0x7FFFFF) | tl.where(e != 0, 0x800000, 0).to(tl.uint32)
    s = 126 - tl.where(e != 0, e, 1).to(tl.uint32)
    q = mant >> tl.minimum(s, 31)
    hi = (mant >> tl.minimum(tl.maximum(s, 16) - 16, 31)) & 0xFFFF
    lo = (mant << (16 - tl.minimum(s, 16))) & 0xFFFF
    o_sub = q + ((tl.where(s >= 16, hi, lo) + r16) >> 16)
    o_big = tl.where(u > 0x7F800000, 0x7E00, 0x7C00).to(tl.uint32)
    o = tl.where(u >= 0x47800000, o_big, tl.where(u < 0x38800000, o_sub, o_norm))
    return o | (sign >> 16)


@triton.jit
def _stored(x, DTYPE: tl.constexpr, sr, r16):
    """``x`` (float32 registers) rounded into its storage dtype: to nearest even, or stochastically
    where ``sr`` with the random 16 bits ``r16`` (16-bit dtypes). bfloat16 from the bits (as
    ``float_to_bf16`` in adamw_math.h): what the GPU's conversion gives, and what the interpreter
    (which truncates) then gives too."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = tl.where(sr, u + r16, u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)  # a NaN: the quiet one
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        if sr:  # a branch, not a select: round-to-nearest launches skip the stochastic conversion
            out = _round_f16_sr(x, r16).to(tl.uint16).to(tl.float16, bitcast=True)
        else:
            out = x.to(tl.float16)
        return out
    else:
        return x.to(DTYPE)


@triton.jit
def _join(p_bits, rem):
    """The fp32 master value of bf16 parameter bits and their int16 remainder (adamw_math.h's
    remainder_join; d2z_optim/backends/remainders.py)."""
    hi = p_bits.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo = rem.to(tl.int32)
    hi = (hi - (lo < 0).to(tl.int32)) & 0xFFFF
    return ((hi << 16) | (lo & 0xFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _split(x):
    """fp32 ``x`` as its bf16 parameter (nearest, ties away from zero) and int16 remainder
    (adamw_math.h's remainder_split): a NaN keeps its high bits, quieted, and a zero remainder."""
    u = x.to(tl.int32, bitcast=True)
    lo = u & 0xFFFF
    lo = tl.where(lo >= 0x8000, lo - 0x10000, lo)
    hi = (u >> 16) & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    hi = tl.where(nan, hi | 0x40, hi + (lo < 0).to(tl.int32))
    lo = tl.where(nan, 0, lo)
    return hi.to(tl.int16).to(tl.bfloat16, bitcast=True), lo.to(tl.int16)


@triton.jit
def _elements(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    x_ptr,
    r_ptr,
    offs,
    mask,
    ams,
    sr,
    key,
    gmul,
    neg_decay,
    lerp_w,
    lerp_low,
    beta2,
    omb2,
    bc2_sqrt,
    eps,
    neg_step_size,
    DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    REMAINDER: tl.constexpr,
):
    """The update of the elements ``offs`` (``mask``: which exist), loaded and stored once each.
    Moments stored in another dtype than the parameter's (M_DTYPE, V_DTYPE; vmax as v) are
    rounded into it; 16-bit values to nearest even, or stochastically (``sr``, with the tensor's
    ``key``: the word's low 16 bits for the parameter, its high 16 for exp_avg, sr_second's for v).
    REMAINDER: bf16 parameters with an int16 remainder (``r_ptr``): the update of their fp32 master,
    split back into both (never rounded stochastically)."""
    if REMAINDER:
        p = _join(tl.load(p_ptr + offs, mask=mask), tl.load(r_ptr + offs, mask=mask))
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    m = tl.load(m_ptr + offs, mask=mask).to(COMPUTE)
    v = tl.load(v_ptr + offs, mask=mask).to(COMPUTE)
    p, m, v = _update(p, g, m, v, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2)
    # the random bits, drawn only when this tensor rounds stochastically (a branch: the hash costs
    # round-to-nearest steps nothing) and only for the 16-bit arrays
    w0 = tl.zeros_like(offs).to(tl.uint32)
    w1 = tl.zeros_like(offs).to(tl.uint32)
    if (DTYPE == tl.bfloat16) | (DTYPE == tl.float16) | (M_DTYPE == tl.bfloat16) | (M_DTYPE == tl.float16):
        if sr:
            w0 = _sr_word(key, offs)
    if (V_DTYPE == tl.bfloat16) | (V_DTYPE == tl.float16):
        if sr:
            w1 = (_sr_word(key, offs) * 0x5851F42D) >> 16  # sr_second
    vhat = v
    if AMSGRAD:
        if ams:
            x = tl.load(x_ptr + offs, mask=mask).to(COMPUTE)
            x = tl.maximum(x, v, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
            tl.store(x_ptr + offs, _stored(x, V_DTYPE, sr, w1), mask=mask)
            vhat = x
    # IEEE sqrt and division (tl.sqrt and / may be approximate on the GPU in float32; in float64
    # they are the IEEE ones, and sqrt_rn/div_rn take float32 only)
    if COMPUTE == tl.float64:
        denom = tl.sqrt(vhat) / bc2_sqrt + eps
        p = tl.fma(neg_step_size, m / denom, p)
    else:
        denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
        p = tl.fma(neg_step_size, tl.div_rn(m, denom), p)  # p - step_size * m / denom
    if REMAINDER:
        p_hi, p_lo = _split(p)
        tl.store(p_ptr + offs, p_hi, mask=mask)
        tl.store(r_ptr + offs, p_lo, mask=mask)
    else:
        tl.store(p_ptr + offs, _stored(p, DTYPE, sr, w0 & 0xFFFF), mask=mask)
    tl.store(m_ptr + offs, _stored(m, M_DTYPE, sr, w0 >> 16), mask=mask)
    tl.store(v_ptr + offs, _stored(v, V_DTYPE, sr, w1), mask=mask)


@triton.jit
def _block(
    row,
    off,
    n,
    ams,
    sr,
    key,
    gmul,
    neg_decay,
    lerp_w,
    lerp_low,
    beta2,
    omb2,
    bc2_sqrt,
    eps,
    neg_step_size,
    COL_P: tl.constexpr,
    COL_G: tl.constexpr,
    COL_M: tl.constexpr,
    COL_V: tl.constexpr,
    COL_X: tl.constexpr,
    COL_R: tl.constexpr,
    DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    REMAINDER: tl.constexpr,
    FULL_ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
):
    """BLOCK elements from ``off``: unmasked 128-bit accesses (FULL_ALIGNED), or masked ones of one
    element per thread (tails, tensors not 16-byte aligned), SUB at a time."""
    pt = tl.pointer_type(DTYPE)
    # The addresses become pointers here, inside the branch that may promise alignment:
    # the tt.divisibility hint sits on these casts only, never on the masked path's.
    p_ptr = tl.load(row + COL_P).to(pt)
    g_ptr = tl.load(row + COL_G).to(pt)
    m_ptr = tl.load(row + COL_M).to(tl.pointer_type(M_DTYPE))
    v_ptr = tl.load(row + COL_V).to(tl.pointer_type(V_DTYPE))
    x_ptr = tl.load(row + COL_X).to(tl.pointer_type(V_DTYPE))
    r_ptr = tl.load(row + COL_R).to(tl.pointer_type(tl.int16))
    if FULL_ALIGNED:  # the launcher checked every address of this tensor is 16-byte aligned
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
        r_ptr = tl.multiple_of(r_ptr, 16)
        offs = off + tl.arange(0, BLOCK)
        _elements(
            p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, r_ptr, offs, None, ams, sr, key, gmul, neg_decay, lerp_w, lerp_low,
            beta2, omb2, bc2_sqrt, eps, neg_step_size, DTYPE, M_DTYPE, V_DTYPE, COMPUTE, AMSGRAD, REMAINDER,
        )  # fmt: skip
    else:
        # One element per thread and sub-block (SUB = the program's threads): the loads' and the
        # stores' layouts are then the same. BLOCK-wide, the loads kept 4 elements per thread while
        # the unaligned stores took 1, a shared-memory layout conversion with two bar.sync per
        # stored array and iteration (TTGIR/PTX, Triton 3.9, sm_80/sm_90).
        for j in tl.static_range(BLOCK // SUB):
            offs = off + j * SUB + tl.arange(0, SUB)
            _elements(
                p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, r_ptr, offs, offs < n, ams, sr, key, gmul, neg_decay, lerp_w,
                lerp_low, beta2, omb2, bc2_sqrt, eps, neg_step_size, DTYPE, M_DTYPE, V_DTYPE, COMPUTE, AMSGRAD,
                REMAINDER,
            )  # fmt: skip


@triton.jit
def adamw_kernel(
    meta_ptr,  # int64 [N, META_COLS]: one row per tensor
    work_ptr,  # int64 [W, 2]: (tensor row, chunk start); one program per item
    hp_ptr,  # float64 [G, HP_COLS]
    lr_table_ptr,  # float32 [T]
    wd_table_ptr,  # float32 [T]
    table_len,
    step_count_ptr,  # int64, read only here (advanced by counter_kernel)
    grad_scale_ptr,  # float32, read when HAS_GRAD_SCALE
    found_inf_ptr,  # float32, read when HAS_FOUND_INF: nonzero writes nothing
    # the metadata table's columns
    META_COLS: tl.constexpr,
    COL_P: tl.constexpr,
    COL_G: tl.constexpr,
    COL_M: tl.constexpr,
    COL_V: tl.constexpr,
    COL_X: tl.constexpr,
    COL_STEP: tl.constexpr,
    COL_NUMEL: tl.constexpr,
    COL_GROUP: tl.constexpr,
    COL_ALIGNED: tl.constexpr,
    COL_R: tl.constexpr,
    # the hyperparameter table's columns
    HP_COLS: tl.constexpr,
    HP_LR: tl.constexpr,
    HP_BETA1: tl.constexpr,
    HP_BETA2: tl.constexpr,
    HP_EPS: tl.constexpr,
    HP_WEIGHT_DECAY: tl.constexpr,
    HP_AMSGRAD: tl.constexpr,
    HP_MAXIMIZE: tl.constexpr,
    HP_ROUNDING: tl.constexpr,
    DTYPE: tl.constexpr,  # of the parameters and gradients
    M_DTYPE: tl.constexpr,  # of exp_avg: DTYPE, or (fp32/bf16/fp16) another of those (exp_avg_dtype)
    V_DTYPE: tl.constexpr,  # of exp_avg_sq and max_exp_avg_sq
    COMPUTE: tl.constexpr,  # float32, or float64 for float64 parameters
    INDEPENDENT_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    AMSGRAD: tl.constexpr,  # some tensor of this launch has a max_exp_avg_sq
    REMAINDER: tl.constexpr,  # the launch's (bf16) parameters have remainders (master_weights="remainders")
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,  # sub_block(BLOCK)
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(work_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(work_ptr + 2 * pid + 1), BLOCK)  # true: chunks start at k * CHUNK
    row = meta_ptr + tensor * META_COLS
    n = tl.load(row + COL_NUMEL)
    if HAS_FOUND_INF:  # a skipped step: no iteration runs, nothing is read or written
        n = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n)
    aligned = tl.load(row + COL_ALIGNED) != 0
    hp = hp_ptr + tl.load(row + COL_GROUP) * HP_COLS

    # ---- scalars of this tensor, float64 (see the module docstring), rounded once
    idx = tl.minimum(tl.maximum(tl.load(step_count_ptr), 0), table_len - 1)
    lr_mult = tl.load(lr_table_ptr + idx).to(tl.float64)
    wd_mult = tl.load(wd_table_ptr + idx).to(tl.float64)
    lr_t = lr_mult * tl.load(hp + HP_LR)
    beta1 = tl.load(hp + HP_BETA1)
    beta2 = tl.load(hp + HP_BETA2)
    if INDEPENDENT_WD:
        decay = lr_mult * (tl.load(hp + HP_WEIGHT_DECAY) * wd_mult)
    else:
        decay = lr_t * (tl.load(hp + HP_WEIGHT_DECAY) * wd_mult)
    ams = (tl.load(hp + HP_AMSGRAD) != 0.0) & (tl.load(row + COL_X) != 0)
    step_ptr = tl.load(row + COL_STEP).to(tl.pointer_type(tl.float32))
    t = (tl.load(step_ptr) + 1.0).to(tl.float64)  # torch: steps += 1 in float32, then float64
    # beta^t = exp2(t * log2(beta)): float64 to ~1e-13 relative, far below float32 rounding
    bc1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2))).to(COMPUTE)
    neg_step_size = (-lr_t / bc1).to(COMPUTE)
    gmul = tl.where(tl.load(hp + HP_MAXIMIZE) != 0.0, -1.0, 1.0).to(tl.float64)
    if HAS_GRAD_SCALE:  # torch_backend: g * fp32(1 / fp64(scale)); the sign flip is exact
        gmul = gmul * (1.0 / tl.load(grad_scale_ptr).to(tl.float64))
    gmul = gmul.to(COMPUTE)
    neg_decay = (-decay).to(COMPUTE)
    w1 = (1.0 - beta1).to(COMPUTE)  # the lerp weight, rounded as torch passes it
    lerp_low = w1 < 0.5
    lerp_w = tl.where(lerp_low, w1, w1 - 1.0)
    omb2 = (1.0 - beta2).to(COMPUTE)
    beta2 = beta2.to(COMPUTE)
    eps = tl.load(hp + HP_EPS).to(COMPUTE)
    # stochastic rounding (16-bit values): the row holds seed + 1; the key of (seed, position, tensor)
    rounding = tl.load(hp + HP_ROUNDING)
    sr = rounding != 0.0
    seed = tl.maximum(rounding - 1.0, 0.0).to(tl.int64).to(tl.uint32)
    position = tl.load(step_count_ptr).to(tl.uint32)
    key = _sr_mix(_sr_mix(_sr_mix(seed) ^ position) ^ tensor.to(tl.uint32))

    end = tl.minimum(start + CHUNK, n)
    iters = tl.cdiv(end - start, BLOCK)  # <= 0 when found_inf (n = 0): no iteration
    for i in range(0, iters):
        off = start + i * BLOCK
        if aligned & (off + BLOCK <= n):
            _block(
                row, off, n, ams, sr, key, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2, bc2_sqrt, eps,
                neg_step_size, COL_P, COL_G, COL_M, COL_V, COL_X, COL_R, DTYPE, M_DTYPE, V_DTYPE, COMPUTE, AMSGRAD,
                REMAINDER, True, BLOCK, SUB,
            )  # fmt: skip
        else:
            _block(
                row, off, n, ams, sr, key, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2, bc2_sqrt, eps,
                neg_step_size, COL_P, COL_G, COL_M, COL_V, COL_X, COL_R, DTYPE, M_DTYPE, V_DTYPE, COMPUTE, AMSGRAD,
                REMAINDER, False, BLOCK, SUB,
            )  # fmt: skip


@triton.jit
def counter_kernel(
    meta_ptr,
    n_tensors,
    step_count_ptr,
    found_inf_ptr,
    META_COLS: tl.constexpr,
    COL_STEP: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """After adamw_kernel (same stream): steps[i] += 1 and step_count += 1, unless found_inf."""
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inc = 1
    if HAS_FOUND_INF:
        inc = (tl.load(found_inf_ptr) == 0.0).to(tl.int64)
    mask = i < n_tensors * inc  # no tensor when the step is skipped
    step_ptr = tl.load(meta_ptr + i * META_COLS + COL_STEP, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(step_ptr, tl.load(step_ptr, mask=mask) + 1.0, mask=mask)
    if pid == 0:
        tl.store(step_count_ptr, tl.load(step_count_ptr) + inc)
