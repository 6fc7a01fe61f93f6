"""The fused backends on a CUDA GPU: CUDA-graph replay against eager, parity with the torch backend
and torch's fused AdamW, two devices. Marked ``cuda`` (``pytest -m cuda``, ``make gpu-check``);
without a CUDA device they are skipped, and say so.

Tolerances: the fused kernels and torch's fused AdamW compute in float32 (float64 for float64) with
the same formula and the same fma placement (adamw_math.h), so fp32 states agree to a few ulps
after 20 steps (rtol 1e-5); bf16/fp16 parameters agree to one rounding of the parameter's dtype.
Graph replay and eager run the same kernels on the same batches: bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import d2z_optim
from d2z_optim import AdamW

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)"),
]

FUSED = ["cuda", "triton"]


def _usable(name: str) -> str | None:
    why = d2z_optim.available_backends().get(name)
    if why is None and name == "cuda":
        why = d2z_optim.backends.cpp_backend.arch_refusal(torch.device("cuda"))
    return why


@pytest.fixture(params=FUSED)
def fused(request):
    why = _usable(request.param)
    if why is not None:
        pytest.fail(f"backend {request.param!r} cannot run on this GPU: {why}")
    return request.param


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.GELU(), torch.nn.Linear(33, 7))


def batches(n: int, dev):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g).to(dev), torch.randn(8, 7, generator=g).to(dev)) for _ in range(n)]


def test_cuda_graph_replays_like_eager(fused):
    """The README's pattern: gradients set to None before capture (allocated in the graph's pool),
    one eager warm-up step on a side stream, capture, 100 replays; eager sees the same batches."""
    dev = torch.device("cuda")
    model, eager = tiny_model().to(dev), tiny_model().to(dev)
    opt = AdamW(model.parameters(), lr=1e-2, total_steps=120, backend=fused)
    eager_opt = AdamW(eager.parameters(), lr=1e-2, total_steps=120, backend=fused)
    xs = batches(101, dev)
    sx, sy = xs[0][0].clone(), xs[0][1].clone()

    def train_step(m, o, x, y):
        ((m(x) - y) ** 2).mean().backward()
        o.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: the states exist before capture
        train_step(model, opt, sx, sy)
    torch.cuda.current_stream().wait_stream(stream)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture runs nothing: the step count moves at replay only
        train_step(model, opt, sx, sy)
    train_step(eager, eager_opt, sx, sy)
    eager_opt.zero_grad(set_to_none=True)
    for k in range(1, 101):
        sx.copy_(xs[k][0])
        sy.copy_(xs[k][1])
        graph.replay()
        train_step(eager, eager_opt, *xs[k])
        eager_opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert int(opt.step_count) == 101 and int(eager_opt.step_count) == 101
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(model.parameters(), eager.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], eager_opt.state[b][key], rtol=0, atol=0)


def _params(dtype, dev, misaligned: bool):
    g = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (1,), (1023,), (4099,), (5, 1, 3), (0,), (65537,)]
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        if misaligned:  # a view one element into a buffer: not 16-byte aligned (DDP bucket views)
            base = torch.empty(t.numel() + 1, dtype=dtype, device=dev)
            view = base[1:].view(s)
            view.copy_(t.to(dev))
            out.append(torch.nn.Parameter(view))
        else:
            out.append(torch.nn.Parameter(t.to(dev)))
    return out


def _train(make, params, steps, dtype, found_inf_at=None):
    """``steps`` steps on fixed gradients; with ``found_inf_at``, GradScaler's hand-over (the
    ``found_inf`` attribute both optimizers read) flags that step as overflowed."""
    opt = make(params)
    g = torch.Generator().manual_seed(7)
    for k in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1).to(dtype).to(p.device)
        if found_inf_at is not None:
            opt.grad_scale = None
            opt.found_inf = torch.tensor(1.0 if k == found_inf_at else 0.0, device=params[0].device)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_parity_with_torch_backend_and_torch_fused(fused, dtype, amsgrad, misaligned):
    dev = torch.device("cuda")
    opts = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=amsgrad, eps=1e-8)
    ours, ref, tf = (_params(dtype, dev, misaligned) for _ in range(3))
    a = _train(lambda p: AdamW(p, backend=fused, **opts), ours, 20, dtype)
    b = _train(lambda p: AdamW(p, backend="torch", **opts), ref, 20, dtype)
    c = _train(lambda p: torch.optim.AdamW(p, fused=True, **opts), tf, 20, dtype)
    if dtype in (torch.float32, torch.float64):
        rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)
    else:  # the states and parameters are stored in the low precision: one rounding of it
        rtol = atol = 2 * torch.finfo(dtype).eps
    for x, y, z in zip(ours, ref, tf):
        torch.testing.assert_close(x, z, rtol=rtol, atol=atol)
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a.state[x][key], c.state[z][key], rtol=rtol, atol=atol)
            torch.testing.assert_close(a.state[x][key], b.state[y][key], rtol=rtol, atol=atol)


def test_found_inf_skips_the_step_on_the_gpu(fused):
    dev = torch.device("cuda")
    ours, ref = _params(torch.float32, dev, False), _params(torch.float32, dev, False)
    a = _train(lambda p: AdamW(p, backend=fused, lr=1e-2), ours, 6, torch.float32, found_inf_at=3)
    b = _train(lambda p: torch.optim.AdamW(p, fused=True, lr=1e-2), ref, 6, torch.float32, found_inf_at=3)
    for x, z in zip(ours, ref):
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
    assert int(a.step_count) == 5 and int(b.state[ref[0]]["step"]) == 5


def test_no_host_sync_per_step(fused):
    dev = torch.device("cuda")
    params = _params(torch.float32, dev, False)
    opt = AdamW(params, total_steps=100, backend=fused)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # the first step builds and uploads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(fused):
    dev = torch.device("cuda:1")
    ours, ref = _params(torch.float32, dev, False), _params(torch.float32, dev, False)
    _train(lambda p: AdamW(p, backend=fused), ours, 5, torch.float32)
    _train(lambda p: torch.optim.AdamW(p, fused=True), ref, 5, torch.float32)
    for x, z in zip(ours, ref):
        assert x.device == dev
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mode",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float32, torch.float16, torch.bfloat16),
    ],
    ids=["fp32-bf16", "bf16-fp32", "fp32-fp16-bf16"],
)
def test_lean_moments_on_the_gpu_match_the_cpu_kernel_bit_for_bit(fused, mode):
    """Moments in another dtype (exp_avg_dtype): the GPU kernels round each value as the CPU kernel
    with hardware FMA does (fp32 math with the same fmas, round to nearest even): the same bits
    after 10 steps."""
    from d2z_optim import _C  # noqa: F401  (registers torch.ops.d2z)

    if torch.ops.d2z._cpu_isa(-1) == "baseline":
        pytest.skip("this host CPU has no FMA: its kernel is not bitwise the GPU's")
    p_dt, m_dt, v_dt = mode
    g = torch.Generator().manual_seed(3)
    init = [(torch.randn(s, generator=g) * 0.1).to(p_dt) for s in ((1023, 17), (5,), (65537,))]
    grads = [[torch.randn(t.shape, generator=g).to(p_dt) for t in init] for _ in range(10)]
    out = {}
    for dev, backend in (("cpu", "cpu"), ("cuda", fused)):
        params = [torch.nn.Parameter(t.clone().to(dev)) for t in init]
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, total_steps=10, backend=backend,
                    exp_avg_dtype=m_dt, exp_avg_sq_dtype=v_dt)  # fmt: skip
        for gs in grads:
            for q, gr in zip(params, gs):
                q.grad = gr.to(dev)
            opt.step()
        out[dev] = [(q.cpu(), *(opt.state[q][k].cpu() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")))
                    for q in params]  # fmt: skip
    for a, b in zip(out["cpu"], out["cuda"]):
        assert [t.dtype for t in b[1:]] == [m_dt, v_dt, v_dt]
        for x, y in zip(a, b):
            assert torch.equal(x, y)
