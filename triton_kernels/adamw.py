"""The Triton multi-tensor AdamW kernel: one launch updates every tensor of one step.

Imported only when the Triton backend is used (importing ``d2z_optim`` never imports
Triton). Semantics are those of ``d2z_optim/backends/torch_backend.py`` and the C++ op
(``csrc/adamw_math.h``):

    per program (one chunk of one tensor), float64 like torch's Python scalars, rounded once:
        idx = min(step_count, T - 1); m = lr_table[idx]; wm = wd_table[idx]; lr_t = lr * m
        decay = (independent_wd ? m : lr_t) * (weight_decay * wm); t = steps[i] + 1 (float32)
        bc1 = 1 - beta1^t; bc2_sqrt = sqrt(1 - beta2^t); step_size = lr_t / bc1
    per element, float32 registers (parameters and states stored as fp32, bf16 or fp16):
        g = grad (negated if maximize, divided by grad_scale); p = p * (1 - decay)
        m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v)
        p = p - step_size * m / (sqrt(amsgrad ? vmax : v) / bc2_sqrt + eps)

Why float64 scalars: ``1 - beta2^t`` at t = 1 is 1e-3 for beta2 = 0.999; computed in
float32 it carries a relative error of ~3e-5 (the rounding of beta2 itself), which
would show in every update. In float64 the result rounds to the same float32 as
torch's Python math. They are computed once per program (a few hundred instructions
of fp64 exp2/log2, against a chunk of 8192 elements), so the cost does not show.

Device-side metadata (rebuilt only when an address, size, dtype or group changes):
    meta  int64 [N, META_COLS]: addresses of param, grad, exp_avg, exp_avg_sq,
          max_exp_avg_sq (0: none) and the float32 step, numel, group row, and
          whether every address of the tensor is 16-byte aligned;
    work  int64 [W, 2] per dtype: (tensor row, first element of the chunk).
Both live in one int64 buffer uploaded with one non-blocking copy from pinned memory.

Launches per call: one ``_adamw_kernel`` per parameter dtype present, then one tiny
``_counter_kernel`` that advances the per-parameter steps and ``step_count`` (every
program of the first kernel reads them, so they cannot be advanced inside it without a
grid-wide barrier). With ``found_inf`` nonzero both kernels write nothing. No host sync.

The launcher is the op ``d2z::adamw_step_triton`` (``torch.library.custom_op`` with a fake
kernel): ``torch.compile`` keeps it as one opaque call instead of breaking the graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from d2z_optim.backends._work import HP_COLUMNS, DeviceWork, fills_block, flatten, same_layout

__all__ = ["BLOCK", "CHUNK_BLOCKS", "DTYPES", "NUM_WARPS", "step"]

OP = "d2z::adamw_step_triton"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns of the meta table (constexpr: read inside the kernels)
NCOLS = 9
META_COLS = tl.constexpr(NCOLS)
_P, _G, _M, _V, _X, _STEP, _NUMEL, _GROUP, _ALIGNED = (tl.constexpr(c) for c in range(NCOLS))

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
BLOCK = {d: NUM_WARPS * 32 * VEC_BYTES // d.itemsize for d in (torch.float32, torch.bfloat16, torch.float16)}
CHUNK_BLOCKS = 8  # CHUNK = CHUNK_BLOCKS * BLOCK[dtype]
# The kernels write every fma they mean (tl.fma): no contraction is left to the compiler,
# so GPU and interpreter round alike, whatever Triton's default (it changes in 3.10).
FP_FUSION = False
COUNTER_BLOCK = 1024  # tensors per program of _counter_kernel


# ----------------------------------------------------------------------------- kernels
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
def _block(
    row,
    off,
    n,
    ams,
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
    AMSGRAD: tl.constexpr,
    FULL_ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """BLOCK elements from ``off``: unmasked 128-bit accesses (FULL_ALIGNED) or masked."""
    pt = tl.pointer_type(DTYPE)
    # The addresses become pointers here, inside the branch that may promise alignment:
    # the tt.divisibility hint sits on these casts only, never on the masked path's.
    p_ptr = tl.load(row + _P).to(pt)
    g_ptr = tl.load(row + _G).to(pt)
    m_ptr = tl.load(row + _M).to(pt)
    v_ptr = tl.load(row + _V).to(pt)
    if FULL_ALIGNED:  # the launcher checked every address of this tensor is 16-byte aligned
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    offs = off + tl.arange(0, BLOCK)
    if FULL_ALIGNED:
        mask = None
    else:
        mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p, m, v = _update(p, g, m, v, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2)
    vhat = v
    if AMSGRAD:
        if ams:
            x_ptr = tl.load(row + _X).to(pt)
            if FULL_ALIGNED:
                x_ptr = tl.multiple_of(x_ptr, 16)
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            x = tl.maximum(x, v, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
            tl.store(x_ptr + offs, x.to(DTYPE), mask=mask)
            vhat = x
    # IEEE sqrt and division (tl.sqrt and / may be approximate on the GPU)
    denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
    p = tl.fma(neg_step_size, tl.div_rn(m, denom), p)  # p - step_size * m / denom
    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _adamw_kernel(
    meta_ptr,  # int64 [N, META_COLS]
    work_ptr,  # int64 [W, 2]: (tensor row, chunk start); one program per item
    hp_ptr,  # float64 [G, 8], columns HP_COLUMNS
    lr_table_ptr,  # float32 [T]
    wd_table_ptr,  # float32 [T]
    table_len,
    step_count_ptr,  # int64, read only here (advanced by _counter_kernel)
    grad_scale_ptr,  # float32, read when HAS_GRAD_SCALE
    found_inf_ptr,  # float32, read when HAS_FOUND_INF: nonzero writes nothing
    DTYPE: tl.constexpr,
    INDEPENDENT_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    AMSGRAD: tl.constexpr,  # some tensor of this launch has a max_exp_avg_sq
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(work_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(work_ptr + 2 * pid + 1), BLOCK)  # true: chunks start at k * CHUNK
    row = meta_ptr + tensor * META_COLS
    n = tl.load(row + _NUMEL)
    if HAS_FOUND_INF:  # a skipped step: no iteration runs, nothing is read or written
        n = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n)
    aligned = tl.load(row + _ALIGNED) != 0
    hp = hp_ptr + tl.load(row + _GROUP) * 8

    # ---- scalars of this tensor, float64 (see the module docstring), rounded once
    idx = tl.minimum(tl.maximum(tl.load(step_count_ptr), 0), table_len - 1)
    lr_mult = tl.load(lr_table_ptr + idx).to(tl.float64)
    wd_mult = tl.load(wd_table_ptr + idx).to(tl.float64)
    lr_t = lr_mult * tl.load(hp + 0)
    beta1 = tl.load(hp + 1)
    beta2 = tl.load(hp + 2)
    if INDEPENDENT_WD:
        decay = lr_mult * (tl.load(hp + 4) * wd_mult)
    else:
        decay = lr_t * (tl.load(hp + 4) * wd_mult)
    ams = (tl.load(hp + 5) != 0.0) & (tl.load(row + _X) != 0)
    step_ptr = tl.load(row + _STEP).to(tl.pointer_type(tl.float32))
    t = (tl.load(step_ptr) + 1.0).to(tl.float64)  # torch: steps += 1 in float32, then float64
    # beta^t = exp2(t * log2(beta)): float64 to ~1e-13 relative, far below float32 rounding
    bc1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2))).to(tl.float32)
    neg_step_size = (-lr_t / bc1).to(tl.float32)
    gmul = tl.where(tl.load(hp + 6) != 0.0, -1.0, 1.0).to(tl.float64)
    if HAS_GRAD_SCALE:  # torch_backend: g * fp32(1 / fp64(scale)); the sign flip is exact
        gmul = gmul * (1.0 / tl.load(grad_scale_ptr).to(tl.float64))
    gmul = gmul.to(tl.float32)
    neg_decay = (-decay).to(tl.float32)
    w1 = (1.0 - beta1).to(tl.float32)  # the lerp weight, rounded as torch passes it
    lerp_low = w1 < 0.5
    lerp_w = tl.where(lerp_low, w1, w1 - 1.0)
    omb2 = (1.0 - beta2).to(tl.float32)
    beta2 = beta2.to(tl.float32)
    eps = tl.load(hp + 3).to(tl.float32)

    end = tl.minimum(start + CHUNK, n)
    iters = tl.cdiv(end - start, BLOCK)  # <= 0 when found_inf (n = 0): no iteration
    for i in range(0, iters):
        off = start + i * BLOCK
        if aligned & (off + BLOCK <= n):
            _block(
                row, off, n, ams, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2, bc2_sqrt, eps, neg_step_size,
                DTYPE, AMSGRAD, True, BLOCK,
            )  # fmt: skip
        else:
            _block(
                row, off, n, ams, gmul, neg_decay, lerp_w, lerp_low, beta2, omb2, bc2_sqrt, eps, neg_step_size,
                DTYPE, AMSGRAD, False, BLOCK,
            )  # fmt: skip


@triton.jit
def _counter_kernel(
    meta_ptr,
    n_tensors,
    step_count_ptr,
    found_inf_ptr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """After _adamw_kernel (same stream): steps[i] += 1 and step_count += 1, unless found_inf."""
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inc = 1
    if HAS_FOUND_INF:
        inc = (tl.load(found_inf_ptr) == 0.0).to(tl.int64)
    mask = i < n_tensors * inc  # no tensor when the step is skipped
    step_ptr = tl.load(meta_ptr + i * META_COLS + _STEP, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(step_ptr, tl.load(step_ptr, mask=mask) + 1.0, mask=mask)
    if pid == 0:
        tl.store(step_count_ptr, tl.load(step_count_ptr) + inc)


# ---------------------------------------------------------------------------- checks
def _fail(msg: str):
    raise RuntimeError(f"{OP}: {msg}")


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_scalar(t: Tensor, dev: torch.device, dtype: torch.dtype, name: str) -> None:
    if not isinstance(t, Tensor) or t.layout != torch.strided:
        _fail(f"{name} must be a dense tensor")
    if t.dtype != dtype:
        _fail(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != 1:
        _fail(f"{name} must have one element, got {t.numel()}")
    if t.device != dev:
        _fail(f"{name} is on {t.device} but the call is on {dev}")


def _check(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table, hparams,
    group_index, grad_scale, found_inf,
) -> torch.device:  # fmt: skip
    """Every argument check, before anything is written. Metadata only: also valid on fake tensors."""
    dev = step_count.device
    if dev.type == "cpu":
        if not _interpreting():
            _fail(
                "Triton runs on CUDA devices, but step_count and the tensors are on the CPU "
                "(TRITON_INTERPRET=1 runs the kernel on CPU tensors, for tests only); "
                "use backend='cpu' or 'torch' for CPU parameters"
            )
    elif dev.type != "cuda":
        _fail(f"Triton runs on CUDA devices, but step_count is on {dev}")
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        if len(lst) != n:
            _fail(f"{name} has {len(lst)} entries but params has {n}")
    if len(group_index) != n:
        _fail(f"group_index has {len(group_index)} entries but params has {n}")
    if max_exp_avg_sqs and len(max_exp_avg_sqs) != n:
        _fail(f"max_exp_avg_sqs has {len(max_exp_avg_sqs)} entries: it must be empty or as long as params ({n})")
    _check_scalar(step_count, dev, torch.int64, "step_count")
    for name, tab in (("lr_table", lr_table), ("wd_table", wd_table)):
        if tab.layout != torch.strided or tab.dim() != 1 or tab.dtype != torch.float32:
            _fail(f"{name} must be a 1-D float32 tensor, got {tab.dtype} with {tab.dim()} dims")
        if tab.numel() == 0:
            _fail(f"{name} is empty")
        if not tab.is_contiguous():
            _fail(f"{name} must be contiguous")
        if tab.device != dev:
            _fail(f"{name} is on {tab.device} but the call is on {dev}")
    if lr_table.numel() != wd_table.numel():
        _fail(f"lr_table ({lr_table.numel()}) and wd_table ({wd_table.numel()}) must have the same length")
    if (
        hparams.layout != torch.strided
        or hparams.dtype != torch.float64
        or hparams.dim() != 2
        or hparams.shape[1] != len(HP_COLUMNS)
        or not hparams.is_contiguous()
    ):
        _fail(f"hparams must be a contiguous float64 tensor [G, 8], got {hparams.dtype} {list(hparams.shape)}")
    if hparams.device != dev:
        _fail(f"hparams is on {hparams.device} but the call is on {dev}")
    if grad_scale is not None:
        _check_scalar(grad_scale, dev, torch.float32, "grad_scale")
    if found_inf is not None:
        _check_scalar(found_inf, dev, torch.float32, "found_inf")
    groups = hparams.shape[0]
    for i in range(n):
        p = params[i]
        if not 0 <= group_index[i] < groups:
            _fail(f"group_index[{i}] = {group_index[i]} is out of range for hparams with {groups} rows")
        if p.layout != torch.strided:
            _fail(f"params[{i}] must be a dense tensor")
        if p.dtype not in DTYPES:
            _fail(f"params[{i}] has dtype {p.dtype}; supported: float32, bfloat16, float16")
        if p.device != dev:
            _fail(f"params[{i}] is on {p.device} but the call is on {dev} (all tensors of one call on one device)")
        if not fills_block(p):
            _fail(
                f"params[{i}] is not dense (strides {list(p.stride())}): its elements must fill one block "
                "of memory, as contiguous and channels_last tensors do"
            )
        same = [(grads[i], "grads"), (exp_avgs[i], "exp_avgs"), (exp_avg_sqs[i], "exp_avg_sqs")]
        if max_exp_avg_sqs and max_exp_avg_sqs[i].numel() != 0:
            same.append((max_exp_avg_sqs[i], "max_exp_avg_sqs"))
        for t, name in same:
            if t.layout != torch.strided:
                _fail(f"{name}[{i}] is {t.layout}; only dense (strided) tensors are supported")
            if t.dtype != p.dtype:
                _fail(f"{name}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype}")
            if t.shape != p.shape:
                _fail(f"{name}[{i}] has shape {list(t.shape)} but params[{i}] has {list(p.shape)}")
            if t.device != dev:
                _fail(f"{name}[{i}] is on {t.device} but the call is on {dev}")
            if not same_layout(t, p):
                _fail(
                    f"{name}[{i}] has strides {list(t.stride())} but params[{i}] has {list(p.stride())} "
                    "(the tensors of a parameter must share its memory layout)"
                )
        if max_exp_avg_sqs:
            x = max_exp_avg_sqs[i]
            if x.layout != torch.strided or x.dtype != p.dtype:
                _fail(
                    f"max_exp_avg_sqs[{i}] must be a dense {p.dtype} tensor "
                    "(a 0-element placeholder when its group has no amsgrad)"
                )
            if x.device != dev:
                _fail(f"max_exp_avg_sqs[{i}] is on {x.device} but the call is on {dev}")
        st = steps[i]
        if st.layout != torch.strided or st.dtype != torch.float32 or st.numel() != 1:
            _fail(f"steps[{i}] must be a float32 tensor with one element")
        if st.device != dev:
            _fail(f"steps[{i}] is on {st.device} but the call is on {dev}")
    return dev


# ----------------------------------------------------------------- the device plan
class _Plan:
    """The uploaded metadata of one set of tensors: which launches, and where their lists are."""

    __slots__ = ("buf", "host", "launches", "meta", "n_tensors")

    def __init__(self, buf: Tensor, host: Tensor, meta: Tensor, n_tensors: int, launches: list) -> None:
        self.buf, self.host, self.meta, self.n_tensors, self.launches = buf, host, meta, n_tensors, launches


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 16


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _plan(dev, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_index) -> _Plan:
    """The cached plan for these addresses and sizes; built and uploaded (no sync) on a change."""
    rows = []
    for i, p in enumerate(params):
        x = max_exp_avg_sqs[i] if max_exp_avg_sqs and max_exp_avg_sqs[i].numel() != 0 else None
        rows.append(
            (
                p.data_ptr(),
                grads[i].data_ptr(),
                exp_avgs[i].data_ptr(),
                exp_avg_sqs[i].data_ptr(),
                0 if x is None else x.data_ptr(),
                steps[i].data_ptr(),
                p.numel(),
                group_index[i],
                p.dtype,
            )
        )
    sizes = {d: (BLOCK[d], CHUNK_BLOCKS * BLOCK[d]) for d in DTYPES}  # tests change them
    key = (dev, tuple(sizes.values()), tuple(rows))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    meta, work = [], {}
    for i, (pa, ga, ma, va, xa, sa, n, gi, dtype) in enumerate(rows):
        aligned = all(a % 16 == 0 for a in (pa, ga, ma, va, xa))
        meta.append((pa, ga, ma, va, xa, sa, n, gi, int(aligned)))
        items, ams = work.setdefault(dtype, ([], [False]))
        ams[0] = ams[0] or xa != 0
        for s in range(0, n, sizes[dtype][1]):
            items.append((i, s))
    flat = [v for r in meta for v in r]
    launches = []
    for dtype in DTYPES:
        if dtype in work and work[dtype][0]:
            items, ams = work[dtype]
            launches.append((dtype, ams[0], len(flat), len(items)))
            flat += [v for it in items for v in it]
    host = torch.tensor(flat or [0], dtype=torch.int64)
    if dev.type == "cuda":
        host = host.pin_memory()
    buf = host.to(dev, non_blocking=True)  # ordered before the kernels on the current stream
    plan = _Plan(buf, host, buf[: len(meta) * NCOLS], len(meta), launches)
    if len(_PLANS) >= _MAX_PLANS:  # addresses changed many times (e.g. new models): drop stale plans
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


# ------------------------------------------------------------------------ the op
@torch.library.custom_op(
    OP, mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "step_count")
)
def adamw_step_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    step_count: Tensor,
    lr_table: Tensor,
    wd_table: Tensor,
    hparams: Tensor,
    group_index: list[int],
    independent_wd: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One AdamW step of every tensor (the C++ op's arguments); see the module docstring."""
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    dev = _check(*args, step_count, lr_table, wd_table, hparams, group_index, grad_scale, found_inf)
    plan = _plan(dev, *args, group_index)
    dummy = step_count  # stands for absent optional pointers (never read)
    gs = grad_scale if grad_scale is not None else dummy
    fi = found_inf if found_inf is not None else dummy
    with _on_device(dev):
        for dtype, ams, offset, n_items in plan.launches:
            _adamw_kernel[(n_items,)](
                plan.meta,
                plan.buf[offset:],
                hparams,
                lr_table,
                wd_table,
                lr_table.numel(),
                step_count,
                gs,
                fi,
                DTYPE=_tl_dtype(dtype),
                INDEPENDENT_WD=bool(independent_wd),
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                AMSGRAD=ams,
                BLOCK=BLOCK[dtype],
                CHUNK=CHUNK_BLOCKS * BLOCK[dtype],
                num_warps=NUM_WARPS,
                enable_fp_fusion=FP_FUSION,
            )
        _counter_kernel[(max(1, triton.cdiv(plan.n_tensors, COUNTER_BLOCK)),)](
            plan.meta,
            plan.n_tensors,
            step_count,
            fi,
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=COUNTER_BLOCK,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )


@adamw_step_triton.register_fake
def _(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table, hparams,
    group_index, independent_wd, grad_scale, found_inf,
) -> None:  # fmt: skip
    _check(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table, hparams,
        group_index, grad_scale, found_inf,
    )  # fmt: skip


class _on_device:
    """The kernel's CUDA device current while launching (Triton launches on the current one)."""

    def __init__(self, dev: torch.device) -> None:
        self.ctx = torch.cuda.device(dev) if dev.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---------------------------------------------------------------------- launcher
def step(work: DeviceWork, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Apply one AdamW step to every tensor of ``work`` and advance ``work.step_count`` on the device.

    ``grad_scale``/``found_inf`` default to ``work``'s. One ``_adamw_kernel`` launch per
    parameter dtype present, then the counter kernel; never a host sync.
    """
    grad_scale = work.grad_scale if grad_scale is None else grad_scale
    found_inf = work.found_inf if found_inf is None else found_inf
    for gi, g in enumerate(work.groups):  # what the flat lists can no longer tell apart
        k = len(g.params)
        for name in ("grads", "exp_avgs", "exp_avg_sqs", "steps"):
            if len(getattr(g, name)) != k:
                _fail(f"group {gi}: {name} has {len(getattr(g, name))} entries but params has {k}")
        if g.amsgrad and len(g.max_exp_avg_sqs) != k:
            _fail(f"group {gi} has amsgrad=True but {len(g.max_exp_avg_sqs)} max_exp_avg_sqs for {k} params")
        if g.amsgrad:
            for j, (p, x) in enumerate(zip(g.params, g.max_exp_avg_sqs)):
                if x.numel() != p.numel():
                    _fail(f"group {gi}: max_exp_avg_sqs[{j}] has {x.numel()} elements but its param {p.numel()}")
    f = flatten(work)
    torch.ops.d2z.adamw_step_triton(*f.op_args(work, grad_scale, found_inf))
