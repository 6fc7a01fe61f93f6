"""Optimizer-step throughput: every d2z backend against torch.optim.AdamW, side by side.

    python benchmarks/bench_throughput.py            # quick (make bench)
    python benchmarks/bench_throughput.py --full     # bigger workloads, more repeats

Each competitor steps the same parameters and gradients. Torch runs the same
schedule as d2z through ``LambdaLR`` on the host (its usual setup). Reported:
median step time with the 20%/80% quantiles, effective bandwidth under the
bytes-per-parameter model (fp32: read p, g, m, v = 16 B, write p, m, v = 12 B),
that bandwidth as a fraction of a plain copy measured in the same run, and the
speedup over ``torch fused + LambdaLR``. Results go to stdout (Markdown) and to
``benchmarks/results/<device>/throughput-<date>.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import d2z_optim
from d2z_optim import AdamW, schedules

RESULTS = Path(__file__).resolve().parent / "results"


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): 148 tensors."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),
            (d, 3 * d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (d, 4 * d),
            (4 * d,),
            (4 * d, d),
            (d,),
        ]
    return shapes + [(d,), (d,)]


def workloads(full: bool) -> dict[str, list[tuple[int, ...]]]:
    return {
        "1 x 64M" if full else "1 x 16M": [(64 << 20,) if full else (16 << 20,)],
        "GPT-2 small (124M, 148 tensors)": gpt2_small_shapes(),
        "10,000 x 1,024": [(1024,)] * 10_000,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def bytes_per_param(dtype: torch.dtype) -> int:
    e = torch.tensor([], dtype=dtype).element_size()
    return 7 * e  # read p, g, m, v; write p, m, v (states in the parameter's dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device, nbytes: int, reps: int) -> tuple[float, float]:
    """GB/s of ``dst.copy_(src)`` (2 x bytes) and of ``dst.add_(src)`` (3 x bytes).

    On CPUs a copy also reads ``dst`` before writing it (write-allocate), which
    the 2 x count hides; the in-place add moves exactly what it counts, like an
    optimizer step, whose written tensors are all read first. The larger of the
    two is the roofline reference.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).zero_()
    t_copy = statistics.median(time_steps(lambda: dst.copy_(src), device, 2, reps))
    t_add = statistics.median(time_steps(lambda: dst.add_(src), device, 2, reps))
    return 2 * nbytes / t_copy / 1e9, 3 * nbytes / t_add / 1e9


def competitors(total_steps: int):
    """name -> factory(params) returning a step() callable."""
    sched = schedules.get("linear-d2z", total_steps)
    out = {}
    usable = [n for n, why in d2z_optim.available_backends().items() if why is None]
    for name in usable:
        out[f"d2z {name}"] = lambda p, n=name: AdamW(p, backend=n, total_steps=total_steps).step
    # the cost of checking every gradient for NaN/Inf on the device, with the default backend
    out["d2z auto + skip_nonfinite"] = lambda p: AdamW(p, total_steps=total_steps, skip_nonfinite=True).step

    def torch_with_lambdalr(**kw):
        def make(p):
            opt = torch.optim.AdamW(p, **kw)
            lam = torch.optim.lr_scheduler.LambdaLR(opt, sched.multiplier)

            def step():
                opt.step()
                lam.step()

            return step

        return make

    out["torch fused + LambdaLR"] = torch_with_lambdalr(fused=True)
    out["torch foreach + LambdaLR"] = torch_with_lambdalr(foreach=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="bigger workloads and more repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    reps = args.reps or (20 if args.full else 7)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    threads = torch.get_num_threads()
    print(
        f"device: {device} ({dev_name}), threads: {threads}, torch {torch.__version__}, "
        f"d2z_optim {d2z_optim.__version__}, dtype {args.dtype}, median of {reps} steps"
    )
    copy_gbs, add_gbs = copy_bandwidth(device, 512 << 20 if args.full else 256 << 20, reps)
    print(f"same run: copy_ {copy_gbs:.1f} GB/s (read+write), add_ {add_gbs:.1f} GB/s (2 reads + write)")
    copy_gbs = max(copy_gbs, add_gbs)
    print(f"bytes per parameter per step: {bytes_per_param(dtype)} (read p, g, m, v; write p, m, v)\n")

    rows = []
    comps = competitors(total_steps=1000)
    todo = [(w, c) for w in workloads(args.full) for c in comps]
    for n, (wname, cname) in enumerate(todo, 1):
        shapes = workloads(args.full)[wname]
        print(f"\r[{n}/{len(todo)}] {wname}: {cname}".ljust(78), end="", file=sys.stderr, flush=True)
        gen = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype) * 1e-2
        step = comps[cname](params)
        times = time_steps(step, device, warmup=2, reps=reps)
        numel = sum(p.numel() for p in params)
        med = statistics.median(times)
        q = statistics.quantiles(times, n=5) if len(times) > 1 else [med] * 4
        gbs = numel * bytes_per_param(dtype) / med / 1e9
        rows.append(
            dict(
                workload=wname,
                competitor=cname,
                median_ms=med * 1e3,
                p20_ms=q[0] * 1e3,
                p80_ms=q[3] * 1e3,
                gb_s=gbs,
                frac_copy=gbs / copy_gbs,
            )
        )
        del params, step
        gc.collect()
    print("\r".ljust(79), file=sys.stderr)

    base = {r["workload"]: r["median_ms"] for r in rows if r["competitor"] == "torch fused + LambdaLR"}
    for r in rows:
        r["speedup_vs_torch_fused"] = base[r["workload"]] / r["median_ms"]
    head = "| workload | competitor | median ms (p20-p80) | GB/s | of copy | vs torch fused |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['competitor']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) "
            f"| {r['gb_s']:.1f} | {r['frac_copy']:.0%} | {r['speedup_vs_torch_fused']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)

    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    folder = args.out / "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{device.type}-{dev_name}")
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"throughput-{args.dtype}{'-full' if args.full else ''}-{stamp}"
    header = (
        f"# Throughput, {device.type} ({dev_name}), {threads} threads, {stamp}\n\n"
        f"torch {torch.__version__}, d2z_optim {d2z_optim.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs. dtype {args.dtype}, {bytes_per_param(dtype)} B/param, median of {reps} steps "
        f"after 2 warm-up steps. Copy bandwidth in the same run (the larger of copy_ and in-place add_, "
        f"bytes moved as counted): {copy_gbs:.1f} GB/s.\n"
        "Command: `python benchmarks/bench_throughput.py" + (" --full" if args.full else "") + "`\n\n"
    )
    (folder / f"{tag}.md").write_text(header + table + "\n")
    with open(folder / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {folder / tag}.md and .csv")


if __name__ == "__main__":
    main()
