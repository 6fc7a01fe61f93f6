"""The Triton backend: the launcher of ``triton_kernels/adamw.py``, its device metadata and the op.

Imported only when the Triton backend is used (importing ``d2z_optim`` never imports Triton).

Device-side metadata (rebuilt only when an address, size, dtype or group changes):
    meta  int64 [N, MetaCol count]: addresses of param, grad, exp_avg, exp_avg_sq,
          max_exp_avg_sq (0: none) and the float32 step, numel, group row, and
          whether every address of the tensor is 16-byte aligned (columns :class:`MetaCol`);
    work  int64 [W, 2] per launch: (tensor row, first element of the chunk).
Both live in one int64 buffer uploaded with one non-blocking copy from pinned memory.

Launches per call: one ``adamw_kernel`` per (parameter, exp_avg, exp_avg_sq) dtypes present
(one per parameter dtype unless the moments are stored in another: ``exp_avg_dtype``), then one tiny
``counter_kernel`` that advances the per-parameter steps and ``step_count``. No host sync.

The launcher is the op ``d2z::adamw_step_triton`` (``torch.library.custom_op``; its fake is
the shared check layer, ``checks.py``): ``torch.compile`` keeps it as one opaque call instead of
breaking the graph.
"""

from __future__ import annotations

import enum
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_kernels import adamw as kernels
from ..triton_kernels import clip as clip_kernels
from .checks import DTYPES, StepArgumentError, check_device_work, check_step_args
from .contract import HP_COLS, DeviceWork, HpCol, StepStatus, capturing, flatten, step_device_holder

__all__ = [
    "COLUMN_ARGS",
    "COUNTER_COLUMN_ARGS",
    "DTYPES",
    "OP",
    "MetaCol",
    "TritonStepHolder",
    "interpreting",
    "launch",
    "step",
]

OP = "d2z::adamw_step_triton"


class MetaCol(enum.IntEnum):
    """Columns of the metadata table, one row per tensor (read by the kernels as constexprs)."""

    P = 0
    G = 1
    M = 2
    V = 3
    X = 4  # max_exp_avg_sq, 0 when none
    STEP = 5
    NUMEL = 6
    GROUP = 7
    ALIGNED = 8
    R = 9  # a bf16 parameter's remainder (master_weights="remainders"), 0 when none


META_COLS = len(MetaCol)
# the kernels' constexpr arguments that give the tables' columns, derived from the enums (one
# place: the launcher and the ahead-of-time compile test pass these; a new column reaches the
# kernel's signature, which must then take it, or every Triton test fails)
COLUMN_ARGS = {
    "META_COLS": META_COLS,
    **{f"COL_{c.name}": int(c) for c in MetaCol},
    "HP_COLS": HP_COLS,
    **{f"HP_{c.name}": int(c) for c in HpCol},
}
COUNTER_COLUMN_ARGS = {"META_COLS": META_COLS, "COL_STEP": int(MetaCol.STEP)}


# The interpreter runs the masked path in one sub-block per BLOCK by default (the same numbers; the
# GPU's sub-blocks of one element per thread cost the interpreter 4-8x the time, Python per op);
# a test sets this to an element count to run the GPU's sub-block loop there too.
INTERPRETER_SUB: int | None = None


def _sub_block(block: int) -> int:
    if interpreting():
        return block if INTERPRETER_SUB is None else min(block, INTERPRETER_SUB)
    return kernels.sub_block(block)


def interpreting() -> bool:
    """Triton runs kernels in its interpreter (TRITON_INTERPRET=1: on CPU tensors, for tests)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(*args) -> torch.device:
    """The shared checks, and where Triton runs."""
    dev = args[6].device  # step_count
    if dev.type == "cpu":
        if not interpreting():
            raise StepArgumentError(
                f"{OP}: Triton runs on CUDA devices, but step_count and the tensors are on the CPU "
                "(TRITON_INTERPRET=1 runs the kernel on CPU tensors, for tests only); "
                "use backend='cpu' or 'torch' for CPU parameters"
            )
    elif dev.type != "cuda":
        raise StepArgumentError(f"{OP}: Triton runs on CUDA devices, but step_count is on {dev}")
    return check_step_args(OP, *args)


# ----------------------------------------------------------------- the device metadata
class TritonMeta:
    """The uploaded metadata of one set of tensors: which launches, and where their lists are."""

    __slots__ = ("buf", "host", "launches", "n_tensors")

    def __init__(self, buf: Tensor, host: Tensor, n_tensors: int, launches: list) -> None:
        self.buf, self.host, self.n_tensors, self.launches = buf, host, n_tensors, launches


# The op's metadata, cached by the tensors' addresses and sizes (the optimizer's steady state goes
# through TritonStepHolder, whose buffers are its own). An entry a CUDA graph capture used is never
# evicted (the graph reads it at every replay): it moves to _CAPTURED and stays for the process.
_METAS: dict[tuple, TritonMeta] = {}
_CAPTURED: dict[tuple, TritonMeta] = {}
_MAX_METAS = 16
_DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # csrc's Dtype order


def launch_code(dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]) -> int:
    """One launch per (parameter, exp_avg, exp_avg_sq) dtypes, in the order of this code (the step
    holder's, ``csrc/torch/adamw_step_holder.cpp``): p + 4 m + 16 v in csrc's Dtype numbers."""
    p, m, v = (_DTYPE_CODES.index(d) for d in dtypes)
    return p + 4 * m + 16 * v


def block_dtype(dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]) -> torch.dtype:
    """The dtype whose BLOCK a launch takes: the widest of its arrays (the parameter's on a tie; a
    parameter with a remainder counts as float32, the width of the pair). Every array then has the
    same elements per thread (16 bytes of the widest, 8 of a 2-byte moment of fp32 parameters), so
    loads and stores share one layout (no shared-memory conversion)."""
    if len(dtypes) > 3:  # (p, m, v, True): a remainder
        return torch.float32
    return max(dtypes, key=lambda d: d.itemsize) if dtypes[0].itemsize < 8 else dtypes[0]


def _dtypes_of(code: int) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    return _DTYPE_CODES[code % 4], _DTYPE_CODES[code // 4 % 4], _DTYPE_CODES[code // 16]


def _tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


def _metadata(
    dev, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, group_index, remainders=None
) -> TritonMeta:
    """The cached metadata for these addresses and sizes; built and uploaded (no sync) on a change.
    A launch's key is its (p, m, v) dtypes, and True for the tensors with a remainder (their own launch)."""
    rows = []
    for i, p in enumerate(params):
        x = max_exp_avg_sqs[i] if max_exp_avg_sqs and max_exp_avg_sqs[i].numel() != 0 else None
        r = remainders[i] if remainders and remainders[i].numel() != 0 else None
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
                (p.dtype, exp_avgs[i].dtype, exp_avg_sqs[i].dtype) + ((True,) if r is not None else ()),
                0 if r is None else r.data_ptr(),
            )
        )
    sizes = {d: (kernels.BLOCK[d], kernels.CHUNK_BLOCKS * kernels.BLOCK[d]) for d in DTYPES}  # tests change them
    key = (dev, tuple(sizes.values()), tuple(rows))
    found = _CAPTURED.get(key) or _METAS.get(key)
    if found is None:
        meta, work = [], {}
        for i, (pa, ga, ma, va, xa, sa, n, gi, dtypes, ra) in enumerate(rows):
            aligned = all(a % 16 == 0 for a in (pa, ga, ma, va, xa, ra))
            meta.append((pa, ga, ma, va, xa, sa, n, gi, int(aligned), ra))
            items, ams = work.setdefault(dtypes, ([], [False]))
            ams[0] = ams[0] or xa != 0
            for s in range(0, n, sizes[block_dtype(dtypes)][1]):
                items.append((i, s))
        flat = [v for r in meta for v in r]
        launches = []
        for dtypes in sorted(
            work, key=lambda d: (len(d), launch_code(d[:3]))
        ):  # the step holder's order, remainders last
            items, ams = work[dtypes]
            if items:
                launches.append((dtypes, ams[0], len(flat), len(items)))
                flat += [v for it in items for v in it]
        host = torch.tensor(flat or [0], dtype=torch.int64)
        if dev.type == "cuda":
            host = host.pin_memory()
        buf = host.to(dev, non_blocking=True)  # ordered before the kernels on the current stream
        found = TritonMeta(buf, host, len(meta), launches)
        if len(_METAS) >= _MAX_METAS:  # addresses changed many times (e.g. new models): drop stale ones
            _METAS.clear()
        _METAS[key] = found
    if capturing(dev) and key not in _CAPTURED:
        _CAPTURED[key] = _METAS.pop(key, found)
    return found


def launch(
    buf: Tensor, n_tensors: int, launches: list, hparams: Tensor, lr_table: Tensor, wd_table: Tensor,
    step_count: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None, independent_wd: bool,
) -> None:  # fmt: skip
    """One ``adamw_kernel`` per ((param, exp_avg, exp_avg_sq) dtypes, amsgrad, offset, items) of
    ``launches`` over the int64 metadata ``buf`` (its first ``n_tensors`` rows: the tensors), then
    the counter kernel."""
    dev = step_count.device
    meta = buf[: n_tensors * META_COLS]
    dummy = step_count  # stands for absent optional pointers (never read)
    gs = grad_scale if grad_scale is not None else dummy
    fi = found_inf if found_inf is not None else dummy
    with _on_device(dev):
        for dtypes, ams, offset, n_items in launches:
            dtype, m_dtype, v_dtype = dtypes[:3]
            wide = block_dtype(dtypes)
            kernels.adamw_kernel[(n_items,)](
                meta,
                buf[offset:],
                hparams,
                lr_table,
                wd_table,
                lr_table.numel(),
                step_count,
                gs,
                fi,
                **COLUMN_ARGS,
                DTYPE=_tl_dtype(dtype),
                M_DTYPE=_tl_dtype(m_dtype),
                V_DTYPE=_tl_dtype(v_dtype),
                COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                INDEPENDENT_WD=bool(independent_wd),
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                AMSGRAD=ams,
                REMAINDER=len(dtypes) > 3,
                BLOCK=kernels.BLOCK[wide],
                CHUNK=kernels.CHUNK_BLOCKS * kernels.BLOCK[wide],
                SUB=_sub_block(kernels.BLOCK[wide]),
                num_warps=kernels.NUM_WARPS,
                enable_fp_fusion=kernels.FP_FUSION,
            )
        kernels.counter_kernel[(max(1, triton.cdiv(n_tensors, kernels.COUNTER_BLOCK)),)](
            meta,
            n_tensors,
            step_count,
            fi,
            **COUNTER_COLUMN_ARGS,
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=kernels.COUNTER_BLOCK,
            num_warps=4,
            enable_fp_fusion=kernels.FP_FUSION,
        )


def launch_clip(
    buf: Tensor, launches: list, partials: Tensor, grad_scale: Tensor | None, found_inf: Tensor | None,
    clip_args: tuple,
) -> None:  # fmt: skip
    """Clipping before :func:`launch`: one ``norm_kernel`` per launch of the update (its programs:
    the update's work items, one partial each, into ``partials``), then ``clip_finalize_kernel``
    (one program: the partials in order, the decisions into ``clip_args``' outputs)."""
    ring, recorded, grad_norm, scale_out, found_out, max_norm, norm_type, spike, sigma = clip_args
    inf = norm_type == float("inf")
    dev = partials.device
    total = 0
    with _on_device(dev):
        for dtypes, _, offset, n_items in launches:
            dtype, wide = dtypes[0], block_dtype(dtypes)  # the update's work items: its CHUNK
            clip_kernels.norm_kernel[(n_items,)](
                buf,
                buf[offset:],
                partials[total:],
                META_COLS=META_COLS,
                COL_G=int(MetaCol.G),
                COL_NUMEL=int(MetaCol.NUMEL),
                DTYPE=_tl_dtype(dtype),
                COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                INF=inf,
                BLOCK=kernels.BLOCK[wide],
                CHUNK=kernels.CHUNK_BLOCKS * kernels.BLOCK[wide],
                num_warps=kernels.NUM_WARPS,
                enable_fp_fusion=kernels.FP_FUSION,
            )
            total += n_items
        dummy = scale_out  # stands for absent optional pointers (never read)
        clip_kernels.clip_finalize_kernel[(1,)](
            partials,
            total,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            ring,
            ring.numel(),
            recorded,
            grad_norm,
            scale_out,
            found_out,
            max(float(max_norm), 0.0),
            float(sigma),
            INF=inf,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            CLIP=max_norm > 0,
            SPIKE=bool(spike),
            BLOCK=clip_kernels.FINALIZE_BLOCK,
            num_warps=4,
            enable_fp_fusion=kernels.FP_FUSION,
        )


# ------------------------------------------------------------------------ the op
@torch.library.custom_op(
    OP, mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "step_count", "remainders")
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
    remainders: list[Tensor],  # empty: none (the C++ schema's Tensor[]? remainders=None)
) -> None:
    """One AdamW step of every tensor (the C++ op's arguments); see the module docstring."""
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    dev = _check(*args, step_count, lr_table, wd_table, hparams, group_index, grad_scale, found_inf, remainders)
    md = _metadata(dev, *args, group_index, remainders)
    launch(md.buf, md.n_tensors, md.launches, hparams, lr_table, wd_table, step_count, grad_scale, found_inf,
           independent_wd)  # fmt: skip


@adamw_step_triton.register_fake
def _(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table, hparams,
    group_index, independent_wd, grad_scale, found_inf, remainders=None,
) -> None:  # fmt: skip
    _check(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table, hparams,
        group_index, grad_scale, found_inf, remainders,
    )  # fmt: skip


# ---------------------------------------------------------------- the step holder
class TritonStepHolder:
    """The Triton step of a fixed set of tensors: ``d2z_optim._C.DeviceStepHolder`` (kind "triton")
    keeps the metadata of the kernels (columns :class:`MetaCol`, work items per dtype) in a buffer of
    its own and rebuilds and uploads it only when a tensor's address, size or dtype changed (read in
    C++ each step, with the op's checks then); Python launches the kernels from it. ``mode``:
    "device" (CUDA tensors), "replay" (CPU tensors under TRITON_INTERPRET=1), "stub" (CPU tensors:
    the C++ half only, for host-overhead benchmarks, with :func:`launch` replaced)."""

    scans_nonfinite = False  # skip_nonfinite steps go through the op and the scan op instead
    takes_remainders = False  # master_weights="remainders" steps go through the op (its launches)

    def __init__(self, work: DeviceWork, mode: str | None = None) -> None:
        from .. import _C

        f = flatten(work)
        chunk = [kernels.CHUNK_BLOCKS * kernels.BLOCK[d] for d in _DTYPE_CODES]
        if mode is None:
            mode = "device" if work.step_count.device.type == "cuda" else "replay"
        args = (f.params, f.exp_avgs, f.exp_avg_sqs, f.max_exp_avg_sqs, f.steps, f.group_index)
        self._holder = _C.DeviceStepHolder(*args, kind="triton", mode=mode, chunk=chunk)
        self._refused = _C.StepRefused
        self._n = len(f.params)
        self._version = -1
        self._buf: Tensor | None = None
        self._launches: list = []
        self._partials: Tensor | None = None  # the clip's, one per update program
        self._kept: list[Tensor] = []  # partial buffers a capture used: never written again

    def captured(self) -> list[Tensor]:
        """The buffers a CUDA graph capture recorded (they must outlive the holder if it goes first)."""
        return list(self._holder.captured) + self._kept

    def _checked(self, work: DeviceWork) -> tuple[StepStatus, Tensor]:
        status, hp = step_device_holder(self._holder, self._refused, work)
        if status == StepStatus.APPLIED and self._holder.version != self._version:  # new metadata: its layout
            self._buf = self._holder.metadata.view(torch.int64)
            self._launches = [(_dtypes_of(d), ams, off, n) for d, ams, off, n in self._holder.launches]
            self._version = self._holder.version
        return status, hp

    def step(self, work: DeviceWork, skip_nonfinite: bool = False) -> StepStatus:
        assert not skip_nonfinite, "TritonStepHolder does not scan gradients (scans_nonfinite is False)"
        status, hp = self._checked(work)
        if status != StepStatus.APPLIED:
            return status
        launch(self._buf, self._n, self._launches, hp, work.lr_table, work.wd_table, work.step_count,
               work.grad_scale, work.found_inf, work.independent_wd)  # fmt: skip
        return StepStatus.APPLIED

    clips = True  # step_clipped: the clip's kernels, then the update reading their decisions

    def step_clipped(self, work: DeviceWork, clip_args: tuple) -> StepStatus:
        """The step of ``work`` clipped by the global norm of its gradients (``GradClip.kernel_args``):
        :func:`launch_clip` over the update's work items, then :func:`launch` with its divisor."""
        status, hp = self._checked(work)
        if status != StepStatus.APPLIED:
            return status
        need = max(1, sum(n for *_, n in self._launches))
        dev = work.step_count.device
        if self._partials is None or self._partials.numel() < need or self._partials.device != dev:
            self._partials = torch.empty(need, dtype=torch.float64, device=dev)
        if capturing(dev) and not any(t is self._partials for t in self._kept):
            self._kept.append(self._partials)  # a graph replays into it: a later resize takes a new one
        launch_clip(self._buf, self._launches, self._partials, work.grad_scale, work.found_inf, clip_args)
        scale_out, found_out = clip_args[3], clip_args[4]
        launch(self._buf, self._n, self._launches, hp, work.lr_table, work.wd_table, work.step_count,
               scale_out, found_out, work.independent_wd)  # fmt: skip
        return StepStatus.APPLIED


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

    ``grad_scale``/``found_inf`` default to ``work``'s. One ``adamw_kernel`` launch per
    parameter dtype present, then the counter kernel; never a host sync.
    """
    grad_scale = work.grad_scale if grad_scale is None else grad_scale
    found_inf = work.found_inf if found_inf is None else found_inf
    check_device_work(OP, work)
    f = flatten(work)
    torch.ops.d2z.adamw_step_triton(*f.op_args(work, grad_scale, found_inf))
