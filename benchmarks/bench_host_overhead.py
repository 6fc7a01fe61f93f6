"""Host time per optimizer step: what the CPU spends to issue one step, per backend and tensor count.

    python benchmarks/bench_host_overhead.py            # 148 / 1,000 / 10,000 tensors
    python benchmarks/bench_host_overhead.py --reps 200

A GPU step is bound by the host when issuing it costs more than the kernels run: with thousands of
tensors, handing every tensor from Python to the op each step does (10,000 tensors: ~55 ms). The
d2z step holders take the lists once; a steady step ("hit") reads the gradients in C++ and
launches from metadata they keep; a step whose tensors moved ("miss": new gradient tensors every
step, as zero_grad(set_to_none=True) leaves them) also rebuilds and uploads the metadata.

Without a GPU the ``cuda`` and ``triton`` rows run their holders on CPU tensors of one element
with the launch stubbed (mode "stub": the C++ gather, key comparison, checks and metadata of a
real step, no kernel), through the optimizer's own ``step()`` (the step cache included). On a GPU
they run for real on CUDA tensors, the launches asynchronous (host time only). Peer rows: torch's
``_fused_adamw_`` handed the same lists (its CPU kernel on one-element tensors costs next to
nothing, so its time is the hand-over), and ``torch.optim.AdamW(fused=True).step()``.
Output: Markdown on stdout and under ``benchmarks/results/<device>/host-overhead-<date>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import RESULTS, device_folder, device_name

import d2z_optim
from d2z_optim import AdamW, backends
from d2z_optim.backends import cpp_backend

# a benchmark times a few steps of a long schedule: not a run that ended short of it
warnings.filterwarnings("ignore", message=r"d2z_optim\.AdamW: the run ended")

COUNTS = (148, 1000, 10_000)
TARGETS = {"cuda": {10_000: 1.0, 148: 0.3}, "triton": {10_000: 2.0, 148: 0.3}}  # ms per step (issue 15)


def _stubbed(name: str):
    """The backend ``name``'s step holder in stub mode, as the cpu backend's, for CPU tensors."""
    if name == "cuda":
        return lambda work: cpp_backend.CudaStepHolder(work, mode="stub")
    from d2z_optim.backends import triton_backend

    return lambda work: triton_backend.TritonStepHolder(work, mode="stub")


class _Patched:
    """Within: the cpu backend's holder replaced (a stubbed cuda/triton holder), Triton's launch a no-op."""

    def __init__(self, holder=None):
        self.holder = holder

    def __enter__(self):
        self.saved = dict(backends._LOADED)
        if self.holder is not None:
            backends._LOADED["cpu"] = dataclasses.replace(backends._load("cpu"), holder=self.holder)
            try:
                from d2z_optim.backends import triton_backend

                self.launch = triton_backend.launch
                triton_backend.launch = lambda *a, **k: None
            except ImportError:
                self.launch = None
        return self

    def __exit__(self, *exc):
        backends._LOADED.clear()
        backends._LOADED.update(self.saved)
        if self.holder is not None and self.launch is not None:
            from d2z_optim.backends import triton_backend

            triton_backend.launch = self.launch


def _params(n: int, device: torch.device) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(1, device=device)) for _ in range(n)]


def time_steps(step, reps: int, miss_params=None, device=None) -> float:
    """Median host ms of ``step()``; with ``miss_params``, new gradient tensors before each step."""
    ts = []
    for k in range(reps + 3):
        if miss_params is not None:
            for p in miss_params:
                p.grad = torch.ones_like(p)
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        if k >= 3:
            ts.append(t1 - t0)
        if device is not None and device.type == "cuda" and k % 16 == 15:
            torch.cuda.synchronize()  # keep the launch queue short (host time is what is measured)
    return statistics.median(ts) * 1e3


def rows_for(n: int, device: torch.device, reps: int) -> list[dict]:
    out = []
    avail = d2z_optim.available_backends()
    names = ["cpu", "cuda", "triton"] if device.type == "cpu" else ["cuda", "triton"]
    for name in names:
        stub = device.type == "cpu" and name != "cpu"
        if name == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                out.append(dict(row=f"d2z {name}", tensors=n, hit="-", miss="-", note="triton not installed"))
                continue
        if not stub and avail.get(name) is not None:
            out.append(dict(row=f"d2z {name}", tensors=n, hit="-", miss="-", note=avail[name]))
            continue
        with _Patched(_stubbed(name) if stub else None):
            params = _params(n, device)
            opt = AdamW(params, total_steps=10_000, backend="cpu" if stub else name)
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            assert opt._cache.lists is not None and opt._cache.lists.holder is not None, "no holder"
            hit = time_steps(opt.step, reps, device=device)
            miss = time_steps(opt.step, max(reps // 4, 10), miss_params=params, device=device)
        label = f"d2z {name}" + (" (launch stubbed)" if stub else "")
        out.append(dict(row=label, tensors=n, hit=hit, miss=miss, note=""))
    # peers: the list hand-over of torch's fused op, and torch's whole fused step
    params = _params(n, device)
    grads = [torch.ones_like(p) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros((), device=device) for _ in params]

    def fused_op():
        torch._fused_adamw_(
            params, grads, states[0], states[1], [], steps, lr=1e-3, beta1=0.9, beta2=0.999,
            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
        )  # fmt: skip

    with torch.no_grad():
        out.append(
            dict(
                row="torch _fused_adamw_ (the list hand-over)",
                tensors=n,
                hit=time_steps(fused_op, reps, device=device),
                miss="-",
                note="",
            )
        )
    params = _params(n, device)
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(params, fused=True)
    out.append(
        dict(
            row="torch AdamW(fused=True).step()",
            tensors=n,
            hit=time_steps(opt.step, reps, device=device),
            miss="-",
            note="",
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--counts", type=int, nargs="*", default=list(COUNTS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for n in args.counts:
        print(f"{n} tensors ...", file=sys.stderr, flush=True)
        rows += rows_for(n, device, args.reps)

    def fmt(v):
        return v if isinstance(v, str) else f"{v:.3f}"

    lines = [
        "| step | tensors | host ms, hit | host ms, miss | target | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["row"].split()[1] if r["row"].startswith("d2z") else ""
        target = TARGETS.get(name, {}).get(r["tensors"])
        verdict = ""
        if target is not None and not isinstance(r["hit"], str):
            verdict = f"<= {target} ms: {'met' if r['hit'] <= target else 'MISSED'}"
        lines.append(
            f"| {r['row']} | {r['tensors']:,} | {fmt(r['hit'])} | {fmt(r['miss'])} | {verdict} | {r['note']} |"
        )
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    head = (
        f"# Host time per step, {device.type} ({device_name(device)}), {stamp}\n\n"
        f"torch {torch.__version__}, d2z_optim {d2z_optim.__version__}, {torch.get_num_threads()} threads. Median "
        f"of {args.reps} steps (hit: the same tensors each step; miss: new gradient tensors before each step, "
        "the metadata rebuilt and uploaded). One-element tensors; without a GPU the cuda and triton holders "
        "run with the launch stubbed on CPU tensors, through AdamW.step() (see the script's docstring).\n"
        "Command: `python benchmarks/bench_host_overhead.py`\n\n"
    )
    table = "\n".join(lines)
    print(head + table)
    folder = device_folder(args.out, device)
    (folder / f"host-overhead-{stamp}.md").write_text(head + table + "\n")
    print(f"\nwrote {folder / f'host-overhead-{stamp}.md'}")


if __name__ == "__main__":
    main()
