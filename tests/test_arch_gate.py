"""The arch gate: "auto" never picks a kernel the build holds no code for, or that Triton does not
support; backend="cuda" there says the capability and what to rebuild with. No GPU needed: the
device's compute capability is monkeypatched, the build's device code too where the install is a
CPU build. setup.py's arch list: D2Z_CUDA_ARCH_LIST, else the user's TORCH_CUDA_ARCH_LIST."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from d2z_optim import backends
from d2z_optim.backends import cpp_backend

ROOT = Path(__file__).resolve().parents[1]
BUILD = ("sm_80", "compute_90", "sm_90")  # what setup.py builds by default ("8.0;9.0+PTX")
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability, code, ok",
    [
        ((8, 0), BUILD, True),  # A100: the sm_80 cubin
        ((8, 6), BUILD, True),  # A10 / RTX 30xx: sm_80 cubin, binary compatible within major 8
        ((8, 9), BUILD, True),  # L4 / L40
        ((9, 0), BUILD, True),  # H100 / H200: the sm_90 cubin
        ((10, 0), BUILD, True),  # B200: compute_90 PTX, compiled by the driver
        ((12, 0), BUILD, True),
        ((7, 5), BUILD, False),  # T4: no cubin of major 7, PTX only from 9.0
        ((8, 6), ("sm_90", "compute_90"), False),
        ((9, 0), ("sm_90a",), True),
        ((10, 0), ("sm_90a",), False),  # arch-specific cubins run on their capability only
        ((10, 0), ("compute_90a",), False),
        ((10, 3), ("sm_100f",), True),  # family cubins: later minors of the major
        ((12, 0), ("sm_100f",), False),
        ((7, 5), ("sm_75",), True),
    ],
)
def test_runs_on(capability, code, ok):
    assert cpp_backend.runs_on(capability, code) is ok


def test_unknown_device_code_is_an_error():
    with pytest.raises(ValueError, match="unknown CUDA device code 'lto_90'"):
        cpp_backend.runs_on((9, 0), ("lto_90",))


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA "device" of a chosen capability, and a cuda backend as a CUDA build of this code loads it."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    monkeypatch.setattr(cpp_backend, "cuda_code", lambda: BUILD)
    cuda = backends.Backend(
        "cuda", cpp_backend.step, "cuda", cpp_backend.DTYPES, holder=cpp_backend.CudaStepHolder,
        gpu_refusal=cpp_backend.arch_refusal,
    )  # fmt: skip
    saved = dict(backends._LOADED)
    backends._LOADED["cuda"] = cuda
    loaded = backends._load("triton")
    if isinstance(loaded, backends.Backend):  # under TRITON_INTERPRET it runs on CPU tensors: as on a GPU here
        backends._LOADED["triton"] = dataclasses.replace(loaded, device_type="cuda")
    yield cap
    backends._LOADED.clear()
    backends._LOADED.update(saved)


def test_cuda_backend_on_a_gpu_without_code_names_the_capability_and_the_variable(gpu):
    gpu["value"] = (7, 5)
    with pytest.raises(ValueError) as e:
        backends.resolve("cuda").for_device(GPU, [torch.float32])
    msg = str(e.value)
    assert "compute capability 7.5" in msg and "D2Z_CUDA_ARCH_LIST='7.5'" in msg, msg
    assert "sm_80, compute_90, sm_90" in msg, msg


def test_cuda_backend_where_the_build_has_code(gpu):
    for cap in ((8, 0), (8, 6), (9, 0), (10, 0)):
        gpu["value"] = cap
        assert backends.resolve("cuda").for_device(GPU, [torch.float32]).name == "cuda"


def test_auto_skips_kernels_the_gpu_cannot_run(gpu):
    gpu["value"] = (7, 5)  # neither Triton (8.0+) nor this build's CUDA code
    assert backends.resolve("auto").for_device(GPU, [torch.float32]).name == "torch"
    with pytest.raises(ValueError, match=r"fused=True needs a fused kernel backend.*compute capability 7\.5"):
        backends.resolve("auto", fused=True).for_device(GPU, [torch.float32])


def test_auto_takes_the_cuda_kernel_where_triton_is_refused(gpu, monkeypatch):
    gpu["value"] = (7, 5)
    monkeypatch.setattr(cpp_backend, "cuda_code", lambda: ("sm_75", "sm_80"))  # a build for T4
    assert backends.resolve("auto").for_device(GPU, [torch.float32]).name == "cuda"


def test_triton_needs_capability_8(gpu):
    if not isinstance(backends._LOADED.get("triton"), backends.Backend):
        pytest.skip(f"triton backend unavailable here: {backends._load('triton')}")
    gpu["value"] = (7, 5)
    with pytest.raises(ValueError, match=r"Triton supports compute capability 8\.0 and later.*has 7\.5"):
        backends.resolve("triton").for_device(GPU, [torch.float32])
    gpu["value"] = (8, 0)
    assert backends.resolve("triton").for_device(GPU, [torch.float32]).name == "triton"
    assert backends.resolve("auto").for_device(GPU, [torch.float32]).name == "triton"


def _setup_module():
    spec = importlib.util.spec_from_file_location("d2z_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() is not called
    return mod


def test_setup_respects_the_users_arch_list(monkeypatch):
    setup = _setup_module()
    monkeypatch.delenv("D2Z_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup.cuda_arch_list() == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.6")
    assert setup.cuda_arch_list() == "7.5;8.6"
    monkeypatch.setenv("D2Z_CUDA_ARCH_LIST", "9.0")
    assert setup.cuda_arch_list() == "9.0"


def test_setup_records_the_code_nvcc_is_asked_for():
    setup = _setup_module()
    flags = [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90a,code=[sm_90a,compute_90a]",
    ]
    assert setup.cuda_code(flags) == ["sm_80", "compute_90", "sm_90", "sm_90a", "compute_90a"]
    with pytest.raises(RuntimeError, match="no device code"):
        setup.cuda_code(["-O3"])


def test_this_build_reports_its_device_code():
    if backends.available()["cpu"] is not None:
        pytest.fail(f"the extension is not built: {backends.available()['cpu']}")
    code = cpp_backend.cuda_code()
    if cpp_backend.has_kernel("CUDA"):
        assert code and all(c.split("_")[0] in ("sm", "compute") for c in code), code
    else:
        assert code == (), code


def test_auto_warns_once_when_the_kernel_is_missing(monkeypatch):
    """A CPU optimizer on the torch backend because the extension is missing (an install that lost
    the kernel) says so once per device type; a dtype no kernel takes is no reason to warn."""
    import warnings

    monkeypatch.setattr(backends, "_WARNED_MISSING", set())
    monkeypatch.setitem(backends._LOADED, "cpu", "the C++ extension d2z_optim._C is not built")
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"no fused kernel is installed for cpu.*not built.*backend='torch'"):
        assert backends.resolve("auto").for_device(cpu, [torch.float32]).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto").for_device(cpu, [torch.bfloat16]).name == "torch"
        monkeypatch.setattr(backends, "_WARNED_MISSING", set())
        assert backends.resolve("torch").for_device(cpu, [torch.float32]).name == "torch"


def test_auto_does_not_warn_for_parameters_no_kernel_takes():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto").for_device(torch.device("cpu"), [torch.complex64]).name == "torch"


def test_a_device_whose_capability_cannot_be_read_gets_no_fused_kernel(gpu, monkeypatch):
    def unreadable(device=None):
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_capability", unreadable)
    assert backends.resolve("auto").for_device(GPU, [torch.float32]).name == "torch"
    with pytest.raises(ValueError, match=r"cannot read the compute capability of cuda:0 \(no CUDA GPUs"):
        backends.resolve("cuda").for_device(GPU, [torch.float32])
