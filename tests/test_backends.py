"""Which backends this install has, and which one "auto" picks: a missing build fails here, loudly.

`make test` builds the C++ extension; if that build is missing or broken these tests fail
instead of the suite quietly running on the torch backend alone.
"""

import importlib.util
import os
import shutil

import pytest
import torch

import d2z_optim
from d2z_optim import AdamW, backends


def test_the_cpp_extension_with_its_cpu_kernel_is_built():
    why = d2z_optim.available_backends()["cpu"]
    assert why is None, f"d2z_optim._C is missing or broken ({why}): run `make setup` and read its output"


@pytest.mark.skipif(
    torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("D2Z_FORCE_CPU") == "1",
    reason="a CPU build of torch or no nvcc: the extension is built without CUDA on purpose",
)
def test_a_cuda_torch_with_nvcc_gets_the_cuda_kernel():
    assert d2z_optim.available_backends()["cuda"] is None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_is_available_where_triton_is_installed():
    assert d2z_optim.available_backends()["triton"] is None


def test_auto_prefers_triton_then_the_cuda_kernel_on_cuda_devices(monkeypatch):
    """Selection logic only (no GPU needed): what "auto" returns for CUDA parameters of an H100
    (the arch gate reads the capability: tests/test_arch_gate.py)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    avail = d2z_optim.available_backends()
    expect = next((n for n in ("triton", "cuda") if avail[n] is None), "torch")
    chosen = backends.resolve("auto").for_device(torch.device("cuda", 0), {torch.float32})
    assert chosen.name == expect
    # float64 too (torch's fused kernels take it); complex is for the torch backend only
    assert backends.resolve("auto").for_device(torch.device("cuda", 0), {torch.float64}).name == expect
    assert backends.resolve("auto").for_device(torch.device("cuda", 0), {torch.complex64}).name == "torch"


def test_auto_picks_the_cpu_kernel_for_cpu_parameters():
    opt = AdamW([torch.nn.Parameter(torch.ones(3))])
    assert opt.backend_name == "cpu"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_on_cpu_parameters_says_it_runs_on_cuda():
    with pytest.raises(ValueError, match=r"runs on CUDA devices.*TRITON_INTERPRET=1"):
        AdamW([torch.nn.Parameter(torch.ones(3))], backend="triton")
