"""The C++/CUDA backends: one call of the fused op ``d2z::adamw_step_`` per device and step.

Torch glue only. The op (``csrc/``) updates every tensor of the call, reads
``lr_table[step_count]`` and ``wd_table[step_count]`` and advances ``step_count`` on the
device. Here the optimizer's groups are flattened into the op's lists (``contract.flatten``),
and the CPU step holder (:class:`CpuStepHolder`) keeps those lists in C++ across steps.
"""

from __future__ import annotations

import torch

from . import contract
from .checks import DTYPES, check_step_args
from .contract import DeviceWork, StepStatus, flatten, hparams_tensor, step_device_holder

__all__ = [
    "DTYPES",
    "CpuStepHolder",
    "CudaStepHolder",
    "arch_refusal",
    "built_with_torch",
    "clip",
    "cuda_code",
    "has_clip",
    "has_kernel",
    "has_norm",
    "has_scan",
    "load_extension",
    "norm",
    "runs_on",
    "step",
    "torch_mismatch",
]

OPS = ("d2z::adamw_step_", "d2z::adamw_step_grid_replay_")  # one schema
SCAN = "d2z::any_nonfinite_"
NORM = "d2z::grad_norm"
CLIP = "d2z::clip_grad_norm_"

_LOADED = False


def load_extension() -> str | None:
    """Import ``d2z_optim._C`` (registers the ``d2z`` ops); the reason on failure."""
    global _LOADED
    if _LOADED:
        return None
    running = torch.__version__
    try:
        from .. import _C  # noqa: F401
    except ImportError as e:
        other = torch_mismatch(built_with_torch(), running)
        return f"{other} ({e})" if other else f"the C++ extension d2z_optim._C is not built or failed to import ({e})"
    other = torch_mismatch(built_with_torch(), running)
    if other:  # it imported, but another torch's ABI may crash later: refuse it
        return other
    for op in OPS:
        _register_fake(op)
    torch.library.register_fake(SCAN)(lambda tensors, found: None)
    torch.library.register_fake(NORM)(lambda tensors, ord: tensors[0].new_empty((), dtype=torch.float32))
    torch.library.register_fake(CLIP)(lambda *args: None)
    _SCAN_DEVICES.update(t for t in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key(SCAN, t.upper()))
    _LOADED = True
    return None


_SCAN_DEVICES: set[str] = set()


def built_with_torch() -> str | None:
    """The torch version d2z_optim._C was compiled against (setup.py's record), if known."""
    try:
        from .. import build_info
    except ImportError:
        return None
    return build_info.TORCH_VERSION


def torch_mismatch(built: str | None, running: str) -> str | None:
    """Why an extension built against torch ``built`` cannot serve torch ``running`` (another
    major.minor: another C++ ABI), else None. Patch releases and local tags (+cpu) may differ."""

    def release(v: str) -> tuple[str, ...]:
        return tuple(v.split("+")[0].split(".")[:2])

    if built is None or release(built) == release(running):
        return None
    return (
        f"d2z_optim._C was built against torch {built} but torch {running} is running: rebuild it against "
        "this torch with `pip install --no-build-isolation --force-reinstall --no-deps <d2z_optim source>`"
    )


def has_scan(device: torch.device) -> bool:
    """The exact non-finite scan ``d2z::any_nonfinite_`` runs on ``device`` in this install."""
    if not _LOADED and not torch.compiler.is_compiling():
        load_extension()
    return device.type in _SCAN_DEVICES


def has_norm(dispatch_key: str) -> bool:
    """The one-pass gradient norm ``d2z::grad_norm`` has a kernel for ``dispatch_key`` in this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(NORM, dispatch_key)


def norm(grads: list[torch.Tensor], ord: float) -> torch.Tensor:
    """The global norm of ``grads`` (ord 2.0 or inf) in one pass of the extension's kernel."""
    return torch.ops.d2z.grad_norm(grads, ord)


def has_clip(dispatch_key: str) -> bool:
    """The fused clip ``d2z::clip_grad_norm_`` has a kernel for ``dispatch_key`` in this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(CLIP, dispatch_key)


def clip(grads: list[torch.Tensor], *args) -> None:
    """One device's clip in one call: norm, decisions, the window (``d2z::clip_grad_norm_``)."""
    torch.ops.d2z.clip_grad_norm_(grads, *args)


def has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("d2z::adamw_step_", dispatch_key)


def cuda_code() -> tuple[str, ...]:
    """The CUDA device code of this build, as nvcc was asked for it: ("sm_80", "compute_90", "sm_90")
    (cubins sm_XY, PTX compute_XY); empty without the CUDA kernel."""
    from .. import _C

    return tuple(c for c in _C.cuda_code().split(",") if c)


def runs_on(capability: tuple[int, int], code: tuple[str, ...]) -> bool:
    """Whether a GPU of ``capability`` can run a kernel built as ``code``: a cubin sm_XY runs on
    X.Y and later minors of major X (sm_XYa / sm_XYf: on X.Y only / major X from Y on); PTX
    compute_XY is compiled by the driver for X.Y and every later capability (compute_XYa: X.Y only)."""
    for c in code:
        kind, _, num = c.partition("_")
        suffix = num[-1] if num[-1] in "af" else ""
        digits = num[: len(num) - len(suffix)]
        if kind not in ("sm", "compute") or not digits.isdigit() or len(digits) < 2:
            raise ValueError(f"unknown CUDA device code {c!r} in {code}")
        built = (int(digits[:-1]), int(digits[-1]))
        if suffix == "a":
            ok = capability == built
        elif kind == "sm":
            ok = capability[0] == built[0] and capability[1] >= built[1]
        else:
            ok = capability >= built
        if ok:
            return True
    return False


def arch_refusal(device: torch.device) -> str | None:
    """Why the CUDA kernel of this build cannot run on ``device`` (None: it can)."""
    try:
        cap = tuple(torch.cuda.get_device_capability(device))
    except (AssertionError, RuntimeError) as e:  # no such device, or a torch without CUDA
        return f"cannot read the compute capability of {device} ({e})"
    code = cuda_code()
    if runs_on(cap, code):
        return None
    return (
        f"d2z_optim._C holds CUDA code for {', '.join(code) or 'no GPU'}, but {device} has compute capability "
        f"{cap[0]}.{cap[1]}: rebuild for it with D2Z_CUDA_ARCH_LIST='{cap[0]}.{cap[1]}' (README: building for CUDA)"
    )


def step(work: DeviceWork) -> None:
    """Apply the whole step of ``work`` in one call of the op."""
    f = flatten(work)
    if not f.params:  # no gradients on this device: the schedule still moves (unless skipped)
        work.step_count.add_(1 if work.found_inf is None else (work.found_inf.reshape(()) == 0).to(torch.int64))
        return
    torch.ops.d2z.adamw_step_(*f.op_args(work, work.grad_scale, work.found_inf))


class CpuStepHolder:
    """The CPU step of a fixed set of tensors, kept in C++ across steps (``d2z_optim._C.CpuStepHolder``).

    (``scans_nonfinite``: with skip_nonfinite it scans the gradients' bits itself.)

    Handing the op its six lists costs more than the update itself for thousands of small
    tensors: every tensor crosses from Python and is unpacked each step (10,000 x 1,024 fp32: an
    ~18 ms call, of which the update is ~4.5 ms). A holder takes the lists once; each step it is
    handed the schedule tensors and hyperparameters only, reads the gradients from the
    parameters in C++, runs the op's checks and kernel (with skip_nonfinite, after a scan of
    every gradient for a NaN or an Inf: exact, and one read of the gradients).
    """

    scans_nonfinite = True
    takes_remainders = True  # master_weights="remainders": checked and stepped as the op does

    def __init__(self, work: DeviceWork) -> None:
        from .. import _C

        f = flatten(work)
        self._holder = _C.CpuStepHolder(
            f.params, f.exp_avgs, f.exp_avg_sqs, f.max_exp_avg_sqs, f.steps, f.group_index, f.remainders
        )
        self._refused = _C.StepRefused

    def captured(self) -> list[torch.Tensor]:
        return []

    clips = True  # step_clipped: the norm and decisions of clipping inside the same C++ call

    def step_clipped(self, work: DeviceWork, clip_args: tuple) -> StepStatus:
        """The step of ``work`` clipped by the global norm of its gradients: ``clip_args`` are
        ``GradClip.kernel_args`` (the verdict lands in their found_out). As :meth:`step` declines."""
        hp = work.hparams if work.hparams is not None else hparams_tensor(work)
        try:
            status = self._holder.step_clipped(
                work.step_count, work.lr_table, work.wd_table, hp, work.independent_wd, work.grad_scale,
                work.found_inf, *clip_args,
            )  # fmt: skip
        except self._refused:
            return StepStatus.DECLINED
        return StepStatus(status)

    def step(self, work: DeviceWork, skip_nonfinite: bool = False) -> StepStatus:
        """Apply the step of ``work`` (its tensors must be the holder's, their gradients those the
        parameters hold now). ``DECLINED``, with nothing written, when a parameter has no gradient
        or changed size, or when the op's checks refuse a tensor (the C++ holder raises
        ``d2z_optim._C.StepRefused`` with the op's message then): stepping through the op next
        says what is wrong."""
        hp = work.hparams if work.hparams is not None else hparams_tensor(work)
        try:
            status = self._holder.step(
                work.step_count,
                work.lr_table,
                work.wd_table,
                hp,
                work.independent_wd,
                work.grad_scale,
                work.found_inf,
                skip_nonfinite,
            )
        except self._refused:
            return StepStatus.DECLINED
        return StepStatus(status)


def device_mode(work: DeviceWork) -> str:
    """How a device step holder runs ``work``: on CUDA tensors for real; on CPU tensors (tests), its
    kernels replayed or interpreted on the host."""
    return "device" if work.step_count.device.type == "cuda" else "replay"


class CudaStepHolder:
    """The CUDA step of a fixed set of tensors (``d2z_optim._C.DeviceStepHolder``, kind "cuda").

    A steady step is one call into C++: it reads every tensor's address, size and dtype from the
    parameters and their gradients, runs the op's checks and rebuilds and uploads the device
    metadata (one asynchronous copy from pinned memory) only when one changed, and launches the
    kernel from the metadata it owns (no process-wide cache, so a CUDA graph that captured it
    replays safely). ``mode``: "device" (CUDA tensors), "replay" (CPU tensors: the CUDA grid
    replayed on the host), "stub" (CPU tensors, nothing launched: host-overhead benchmarks).
    """

    scans_nonfinite = False  # skip_nonfinite steps go through the op and the scan op instead
    takes_remainders = True  # master_weights="remainders": in the metadata, checked as the op does

    def __init__(self, work: DeviceWork, mode: str | None = None) -> None:
        from .. import _C

        f = flatten(work)
        args = (f.params, f.exp_avgs, f.exp_avg_sqs, f.max_exp_avg_sqs, f.steps, f.group_index)
        self._holder = _C.DeviceStepHolder(*args, kind="cuda", mode=mode or device_mode(work), remainders=f.remainders)
        self._refused = _C.StepRefused

    def captured(self) -> list[torch.Tensor]:
        """The buffers a CUDA graph capture recorded (they must outlive the holder if it goes first)."""
        return list(self._holder.captured)

    def step(self, work: DeviceWork, skip_nonfinite: bool = False) -> StepStatus:
        assert not skip_nonfinite, "CudaStepHolder does not scan gradients (scans_nonfinite is False)"
        return step_device_holder(self._holder, self._refused, work)[0]

    clips = True  # step_clipped: clip_kernel, then the update reading its decisions (3 launches)

    def step_clipped(self, work: DeviceWork, clip_args: tuple) -> StepStatus:
        """The step of ``work`` clipped by the global norm of its gradients (``GradClip.kernel_args``)."""
        hp = work.hparams if work.hparams is not None else hparams_tensor(work)
        try:
            status = self._holder.step_clipped(
                work.step_count, work.lr_table, work.wd_table, hp, work.independent_wd, work.grad_scale,
                work.found_inf, *clip_args, contract.capturing(work.step_count.device),
            )  # fmt: skip
        except self._refused:
            return StepStatus.DECLINED
        return StepStatus(status)


def _register_fake(op: str) -> None:
    """The op's fake kernel (the shared checks), so torch.compile and FakeTensor tracing see a proper op."""

    @torch.library.register_fake(op)
    def _(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table, hparams,
        group_index, independent_wd, grad_scale, found_inf, remainders=None,
    ):  # fmt: skip
        check_step_args(
            op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, step_count, lr_table, wd_table,
            hparams, group_index, grad_scale, found_inf, remainders,
        )  # fmt: skip
