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


@pytest.mark.parametrize(
    "kw",
    [{}, dict(stochastic_rounding=True, rounding_seed=3), dict(master_weights="remainders")],
    ids=["rne", "sr", "remainders"],
)
def test_the_torch_backend_steps_in_bounded_chunks_with_the_same_bits(monkeypatch, kw):
    """backends/torch_backend.py splits a group's foreach calls into runs of at most CHUNK_ELEMENTS
    elements (its temporaries are as large as one call's tensors): elementwise math, so the bits
    are those of one call over every tensor."""
    from d2z_optim.backends import torch_backend

    def run(chunk):
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk)
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, generator=g).to(torch.bfloat16)) for n in (700, 5, 300, 1200, 64)]
        opt = AdamW(ps, lr=1e-2, weight_decay=0.1, backend="torch", total_steps=10, **kw)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            opt.step()
        return ps, opt

    calls = []
    real = torch_backend._update
    monkeypatch.setattr(
        torch_backend, "_update", lambda g, ids, *a, **k: calls.append(list(ids)) or real(g, ids, *a, **k)
    )
    (a, oa), (b, ob) = run(1 << 30), run(1000)
    assert calls[0] == [0, 1, 2, 3, 4] and calls[-4:] == [[0, 1], [2], [3], [4]]  # 700+5 | 300 | 1200 alone | 64
    for p, q in zip(a, b):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k
