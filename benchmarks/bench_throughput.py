"""Optimizer-step throughput: every d2z backend against torch.optim.AdamW, side by side.

    python benchmarks/bench_throughput.py            # quick (make bench)
    python benchmarks/bench_throughput.py --full     # bigger workloads, bf16, more repeats
    python benchmarks/bench_throughput.py --compile  # add torch.compile of torch's AdamW step

Every competitor steps its own copy of the same parameters on the same gradients,
and the competitors of a workload are timed *interleaved* (one step each, round
after round, in a new random order each round), so a slow phase of a noisy machine
hits all of them alike. Torch runs the same schedule as d2z (linear-d2z) through
``LambdaLR`` on the host. Reported: median step time with the 20%/80% quantiles
after warm-up (CUDA events on GPU), effective bandwidth under the bytes-per-parameter
model (read p, g, m, v; write p, m, v: 28 B for fp32, 14 B for bf16), the step's
time as a fraction of the memory roofline's (an in-place add moving the same bytes,
interleaved with the competitors as one of them), the speedup over
``torch fused + LambdaLR`` (paired: the median over rounds of the two step times'
ratio in the same round, so a burst of machine noise cannot favour one side), host
syncs per step (aten host reads recorded on CPU; CUDA sync debug mode on GPU) and
kernel launches per step (profiler, GPU).
Competitors that cannot run here are listed as skipped, with the reason.
Output: Markdown on stdout, and Markdown, CSV and a PNG chart under
``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import gc
import itertools
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import d2z_optim
from d2z_optim import AdamW, schedules

# a benchmark times a few steps of a long schedule: not a run that ended short of it
warnings.filterwarnings("ignore", message=r"d2z_optim\.AdamW: the run ended")

RESULTS = Path(__file__).resolve().parent / "results"
TOTAL_STEPS = 1000
BASELINE = "torch fused + LambdaLR"
SCHEDULE_ROW = "d2z auto, constant schedule"
SKIP_ROW = "d2z auto + skip_nonfinite"
CLIP_ROW = "d2z auto + max_grad_norm=1.0"
LEAN_ROW = "d2z auto + bf16 moments"  # exp_avg_dtype = exp_avg_sq_dtype = bfloat16
TORCH_CLIP_ROW = "torch clip_grad_norm_ + fused + LambdaLR"
# paired ratios printed as speedups (the others as costs, +x%)
SPEEDUPS = ("d2z clip over torch clip (x)",)
STREAM_ROW = "memory roofline: add_ of the same bytes"
# rows more than SLOW_FACTOR x slower than the baseline (its warm-up step) are timed in the first
# SLOW_ROUNDS rounds only, unless --full: torch's foreach and for-loop paths and the d2z torch
# backend are most of a round's time, and their ratios to torch fused are far from 1
SLOW_FACTOR, SLOW_ROUNDS = 3.0, 5
PAIR_SECONDS, PAIR_ROUNDS = 6.0, (20, 400)  # paired-cost rounds: ~6 s per workload, 20 to 400
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}


# ------------------------------------------------------------------ workloads
def gpt_shapes(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """A GPT-2-style parameter list: embeddings, 12 tensors per block, final LayerNorm."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): 148 tensors."""
    return gpt_shapes(768, 12)


def gpt_1b3_shapes() -> list[tuple[int, ...]]:
    """A GPT-3 XL-like 1.3B shape list (d 2048, 24 layers, context 2048): 292 tensors."""
    return gpt_shapes(2048, 24, ctx=2048)


def workloads(full: bool, device: torch.device) -> dict[str, list[tuple[int, ...]]]:
    out = {
        "1 x 64M": [(64 << 20,)],
        "GPT-2 small (124M, 148 tensors)": gpt2_small_shapes(),
        "GPT 1.3B (292 tensors)": gpt_1b3_shapes() if (full or device.type == "cuda") else None,
        "10,000 x 1,024": [(1024,)] * 10_000,
    }
    return {k: v for k, v in out.items() if v is not None}


def bytes_per_param(dtype: torch.dtype, moments: torch.dtype | None = None) -> int:
    """Traffic per parameter and step: read p, g, m, v; write p, m, v (moments in their own dtype)."""
    p, m = dtype.itemsize, (moments or dtype).itemsize
    return 3 * p + 4 * m


def storage_per_param(dtype: torch.dtype, moments: torch.dtype | None = None) -> int:
    """Bytes kept per parameter between steps: p, m, v (the gradient is the model's)."""
    return dtype.itemsize + 2 * (moments or dtype).itemsize


# the modes of lean moments (exp_avg_dtype = exp_avg_sq_dtype), per parameter dtype
MODES = [
    (torch.float32, None),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, None),
    (torch.bfloat16, torch.float32),
]
ROW_MOMENTS = {LEAN_ROW: torch.bfloat16}  # rows whose moments are not in the parameters' dtype


def modes_table() -> list[str]:
    name = lambda d: str(d).removeprefix("torch.")
    lines = ["| parameters | moments | storage B/param (p, m, v) | traffic B/param/step |", "|---|---|---|---|"]
    for p, m in MODES:
        lines.append(f"| {name(p)} | {name(m or p)} | {storage_per_param(p, m)} | {bytes_per_param(p, m)} |")
    return lines


# -------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def stream_bandwidth(device, nbytes: int, reps: int) -> tuple[float, float]:
    """GB/s of ``dst.copy_(src)`` (2 x bytes) and of ``dst.add_(src)`` (3 x bytes).

    On CPUs a copy also reads ``dst`` before writing it (write-allocate), which the
    2 x count hides; the in-place add moves exactly what it counts, like an optimizer
    step, whose written tensors are all read first. The larger is the reference. Best of
    ``reps`` (as STREAM reports): a peak to compare with, not a typical time.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).zero_()
    for f in (lambda: dst.copy_(src), lambda: dst.add_(src)):
        f()
    t_copy = min(timed(lambda: dst.copy_(src), device) for _ in range(max(reps, 10)))
    t_add = min(timed(lambda: dst.add_(src), device) for _ in range(max(reps, 10)))
    return 2 * nbytes / t_copy / 1e9, 3 * nbytes / t_add / 1e9


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_READS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def host_syncs(step: Callable[[], None], device: torch.device) -> int:
    """Host syncs of one step: aten host reads (CPU), CUDA sync-debug warnings (GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(x.message) for x in w)
    with _HostReads() as rec:
        step()
    return rec.n


def kernel_launches(step: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "")


# --------------------------------------------------------------- competitors
def competitors(device: torch.device, with_compile: bool) -> tuple[dict, dict]:
    """(name -> factory(params) -> step callable, name -> reason skipped)."""
    sched = schedules.get("linear-d2z", TOTAL_STEPS)
    table = sched.table(device)
    out: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    for name, why in d2z_optim.available_backends().items():
        runs_here = {"torch": True, "cpu": device.type == "cpu"}.get(name, device.type == "cuda")
        if why is None and runs_here:
            out[f"d2z {name}"] = lambda p, n=name: AdamW(p, backend=n, total_steps=TOTAL_STEPS).step
        else:
            skipped[f"d2z {name}"] = why or f"runs on {'CUDA devices' if name != 'cpu' else 'the CPU'}"
    # what the schedule itself costs: the same step with a constant table
    out[SCHEDULE_ROW] = lambda p: AdamW(p, schedule="constant", total_steps=TOTAL_STEPS).step
    out[SKIP_ROW] = lambda p: AdamW(p, total_steps=TOTAL_STEPS, skip_nonfinite=True).step
    # clipping by the global norm inside the step (one read of the gradients for the norm) against
    # torch's clip_grad_norm_ (a read for the norm, a read and a write to scale .grad) before its step
    out[CLIP_ROW] = lambda p: AdamW(p, total_steps=TOTAL_STEPS, max_grad_norm=1.0).step
    # moments stored in bf16 (fp32 workloads: 20 bytes per parameter and step instead of 28)
    lean = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    out[LEAN_ROW] = lambda p: AdamW(p, total_steps=TOTAL_STEPS, **lean).step

    def with_lambdalr(**kw):
        def make(p):
            opt = torch.optim.AdamW(p, **kw)
            lam = torch.optim.lr_scheduler.LambdaLR(opt, sched.multiplier)

            def step():
                opt.step()
                lam.step()

            step.opt = opt
            return step

        return make

    out[BASELINE] = with_lambdalr(fused=True)

    def clipped(p):  # scales the shared gradients in place: after the first step their norm is ~1
        # (a coefficient just under 1 from then on: the same bytes moved, values barely changing)
        inner = with_lambdalr(fused=True)(p)

        def step():
            torch.nn.utils.clip_grad_norm_(p, 1.0, foreach=True)
            inner()

        step.opt = inner.opt
        return step

    out[TORCH_CLIP_ROW] = clipped
    out["torch fused (no schedule)"] = lambda p: torch.optim.AdamW(p, fused=True).step
    out["torch foreach + LambdaLR"] = with_lambdalr(foreach=True)
    out["torch for-loop + LambdaLR"] = with_lambdalr(foreach=False)

    def capturable(p):  # torch's way to keep the LR on the device: a tensor LR the host refills
        lr = torch.tensor(1e-3, device=device)
        opt = torch.optim.AdamW(p, lr=lr, fused=True, capturable=True)
        k = [0]

        def step():
            opt.step()
            k[0] += 1
            opt.param_groups[0]["lr"].copy_(table[min(k[0], TOTAL_STEPS - 1)] * 1e-3)

        step.opt = opt
        return step

    out["torch fused capturable + tensor LR"] = capturable
    if with_compile:

        def compiled(p):
            opt = torch.optim.AdamW(p, lr=torch.tensor(1e-3, device=device), foreach=True, capturable=True)
            return torch.compile(opt.step)

        out["torch.compile(torch AdamW.step)"] = compiled
    else:
        skipped["torch.compile(torch AdamW.step)"] = "pass --compile (compiling takes minutes on 2 cores)"
    peers = (
        ("apex FusedAdam", "apex.optimizers", "FusedAdam"),
        ("Transformer Engine FusedAdam", "transformer_engine.pytorch.optimizers", "FusedAdam"),
    )
    for label, mod, cls in peers:
        try:
            fused_cls = getattr(__import__(mod, fromlist=[cls]), cls)
        except Exception as e:  # any import failure: not available here
            skipped[label] = f"not importable ({type(e).__name__})"
            continue
        if device.type != "cuda":
            skipped[label] = "runs on CUDA devices"
            continue
        out[label] = lambda p, c=fused_cls: c(p, adam_w_mode=True).step
    return out, skipped


def graph_rows(params_fn, device) -> dict[str, Callable]:
    """CUDA: the step captured in a CUDA graph. d2z needs nothing from the host per step;
    torch needs a capturable optimizer and a host refill of its LR tensor outside the graph."""
    sched = schedules.get("linear-d2z", TOTAL_STEPS).table(device)
    out = {}

    def d2z_graph(p):
        opt = AdamW(p, total_steps=TOTAL_STEPS)
        opt.step()  # state exists before capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            opt.step()
        return g.replay

    def torch_graph(p):
        lr = torch.tensor(1e-3, device=device)
        opt = torch.optim.AdamW(p, lr=lr, fused=True, capturable=True)
        opt.step()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            opt.step()
        k = [0]

        def step():
            g.replay()
            k[0] += 1
            lr.copy_(sched[min(k[0], TOTAL_STEPS - 1)] * 1e-3)  # the host still drives the schedule

        return step

    out["d2z (CUDA graph replay)"] = d2z_graph
    out["torch fused capturable (CUDA graph) + LR refill"] = torch_graph
    return out


# ---------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def device_folder(root: Path, device: torch.device) -> Path:
    name = f"{device.type}-{device_name(device)}"
    folder = root / "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def progress(n: int, total: int, text: str) -> None:
    bar = "#" * int(24 * n / total)
    print(f"\r[{bar:<24}] {n}/{total} {text}"[:100].ljust(100), end="", file=sys.stderr, flush=True)


def optimizer_of(step: Callable) -> torch.optim.Optimizer | None:
    """The optimizer a competitor's step callable steps (a bound ``opt.step``, or ``step.opt``)."""
    opt = getattr(step, "opt", None) or getattr(step, "__self__", None)
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def paired(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den in the same round (a burst of noise hits one round)."""
    return statistics.median(a / b for a, b in zip(num, den))


def bench_workload(wname, shapes, dtype, device, comps, reps, warmup, extra, pairs, costs, pair_rounds, slow_rounds=0):
    """One workload's rows. ``slow_rounds``: rows over SLOW_FACTOR x the baseline's warm-up time
    are timed in that many rounds only (0: every row in every round); their paired ratio is over
    the rounds they ran in."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device, dtype) for s in shapes]
    steps, rows = {}, []
    # One set of parameters, gradients and moments for every competitor (each updates them in
    # place, as each would its own): the bytes each step moves are the same, and the run holds 4
    # copies of the workload instead of 3 per competitor (GPT-2 small: 17.8 -> ~4 GB peak). Each
    # optimizer's first step creates its own states; its moments are then replaced by the shared
    # ones (its step counters stay its own: torch wants them on the CPU or on the device by path).
    params = [torch.nn.Parameter(t) for t in init]  # init's own tensors: no second copy
    numel = sum(t.numel() for t in init)
    del init
    for p, g in zip(params, grads):
        p.grad = g  # read-only for every competitor
    moments = None
    for cname, make in comps.items():
        try:
            step = make(params)
            opt = optimizer_of(step)
            if opt is not None:
                step()
                own = [(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params]
                if moments is None:
                    moments = own
                if own[0][0].dtype == moments[0][0].dtype:  # lean moments (another dtype): its own
                    for p, (m, v) in zip(params, moments):
                        opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"] = m, v
                del own
                step()  # a step holder lets go of the replaced moments only when it next steps
            steps[cname] = (step, params)
        except Exception as e:  # a competitor that cannot take this workload
            extra[f"{cname} @ {wname}"] = f"{type(e).__name__}: {str(e)[:80]}"
        gc.collect()
    # the memory roofline, interleaved like a competitor (a shared VM's bandwidth moves during a
    # run): an in-place add moving the step's bytes (3 accesses of 4 B per element)
    src = torch.empty(max(1, numel * bytes_per_param(dtype) // 12), device=device).uniform_()
    steps[STREAM_ROW] = (functools.partial(torch.Tensor.add_, torch.zeros_like(src), src), [])
    warm: dict[str, float] = {}
    for _ in range(warmup):
        for c, (step, _) in steps.items():
            warm[c] = timed(step, device)
    sync(device)
    syncs = {c: host_syncs(s, device) for c, (s, _) in steps.items()}
    launches = {c: kernel_launches(s, device) for c, (s, _) in steps.items()}
    times: dict[str, list[float]] = {c: [] for c in steps}
    base_warm = warm.get(BASELINE)
    slow = set()
    if slow_rounds and base_warm is not None:
        slow = {c for c, t in warm.items() if t > SLOW_FACTOR * base_warm}
    shuffle = random.Random(0).shuffle
    for k in range(reps):  # interleaved: one step of each competitor per round, in a new order
        order = [c for c in steps if k < slow_rounds or c not in slow]  # slow rows: the first rounds
        shuffle(order)  # (a fixed order measured the step after a slow one as slower)
        for c in order:
            times[c].append(timed(steps[c][0], device))
    base = times.get(BASELINE)
    stream_med = statistics.median(times[STREAM_ROW])
    for c, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [med] * 4
        gbs = numel * bytes_per_param(dtype, ROW_MOMENTS.get(c)) / med / 1e9
        rows.append(
            dict(
                workload=wname,
                dtype=str(dtype).replace("torch.", ""),
                competitor=c,
                median_ms=med * 1e3,
                p20_ms=q[0] * 1e3,
                p80_ms=q[3] * 1e3,
                gb_s=gbs,
                frac_of_stream=stream_med / med,
                # paired: the baseline's time over this competitor's in the same round, median over
                # rounds (a burst of machine noise slows one round, not one competitor's median)
                speedup_vs_torch_fused=paired(base, ts) if base else float("nan"),
                host_syncs=syncs[c],
                launches=launches[c],
                rounds=len(ts),
            )
        )
    # paired costs, from more rounds of just the rows they compare (a few percent is below the
    # noise of 15 rounds on a shared VM)
    members = sorted({c for pair in pairs.values() for c in pair if c in steps})
    more: dict[str, list[float]] = {c: [] for c in members}
    start = time.perf_counter()
    while len(members) > 1 and len(more[members[0]]) < PAIR_ROUNDS[1]:
        if len(more[members[0]]) >= PAIR_ROUNDS[0] and time.perf_counter() - start > PAIR_SECONDS:
            break
        shuffle(members)
        for c in members:
            more[c].append(timed(steps[c][0], device))
    pair_rounds[wname, str(dtype)] = len(more[members[0]]) if members else 0
    for label, (num, den) in pairs.items():
        if num in more and den in more:
            costs.append((wname, str(dtype).replace("torch.", ""), label, paired(more[num], more[den]) - 1))
    del steps, params, grads, src, moments
    gc.collect()
    return rows


def _cost(label: str, value: float) -> str:
    return f"{value + 1:.2f}x" if label in SPEEDUPS else f"{value:+.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="bigger workloads, bf16 too, more repeats")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of torch's AdamW step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device(args.device)
    reps = args.reps or (30 if args.full else 15)
    dtypes = [torch.float32, torch.bfloat16] if (args.full or device.type == "cuda") else [torch.float32]
    threads = torch.get_num_threads()
    print(
        f"device: {device} ({device_name(device)}), threads: {threads}, torch {torch.__version__}, "
        f"d2z_optim {d2z_optim.__version__}, median of {reps} interleaved steps after 2 warm-up steps"
    )
    copy_gbs, add_gbs = stream_bandwidth(device, 512 << 20 if args.full else 256 << 20, reps)
    print(f"same run: copy_ {copy_gbs:.1f} GB/s (read+write), add_ {add_gbs:.1f} GB/s (2 reads + write)")
    print("bytes per parameter per step: read p, g, m, v + write p, m, v = 7 x element size\n")

    comps, skipped = competitors(device, args.compile)
    auto = f"d2z {AdamW([torch.zeros(1, device=device, requires_grad=True)]).backend_name}"
    # what the schedule and skip_nonfinite cost: (numerator, denominator) rows, paired by round
    pairs = {
        "linear-d2z vs constant": (auto, SCHEDULE_ROW),
        "skip_nonfinite": (SKIP_ROW, auto),
        "max_grad_norm": (CLIP_ROW, auto),
        "bf16 moments": (LEAN_ROW, auto),
        SPEEDUPS[0]: (TORCH_CLIP_ROW, CLIP_ROW),
    }
    costs: list[tuple[str, str, str, float]] = []
    pair_rounds: dict[tuple[str, str], int] = {}
    if device.type == "cuda":
        comps.update(graph_rows(None, device))
    loads = workloads(args.full, device)
    todo = [(w, d) for w in loads for d in dtypes]
    rows: list[dict] = []
    for n, (wname, dtype) in enumerate(todo):
        progress(n, len(todo), f"{wname} {dtype}")
        rows += bench_workload(
            wname, loads[wname], dtype, device, comps, reps, 2, skipped, pairs, costs, pair_rounds,
            slow_rounds=0 if args.full else SLOW_ROUNDS,
        )  # fmt: skip
    progress(len(todo), len(todo), "done")
    print(file=sys.stderr)

    head = "| workload | dtype | competitor | median ms (p20-p80) | GB/s | of roofline | vs torch fused | syncs "
    head += "| launches |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        launches = "-" if r["launches"] is None else r["launches"]
        name = r["competitor"] if r["rounds"] == reps else f"{r['competitor']} ({r['rounds']} rounds)"
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {name} | {r['median_ms']:.2f} "
            f"({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | {r['gb_s']:.1f} | {r['frac_of_stream']:.0%} "
            f"| {r['speedup_vs_torch_fused']:.2f}x | {r['host_syncs']} | {launches} |"
        )
    if costs:
        lines += [
            "",
            f"Paired costs against `{auto}`: the median over more rounds of just these rows (about "
            f"{PAIR_SECONDS:.0f} s, {PAIR_ROUNDS[0]} to {PAIR_ROUNDS[1]} rounds per workload) of the two steps' "
            "time ratio in the same round, minus 1: linear-d2z over a constant table, skip_nonfinite's "
            "check, clipping by the global norm (max_grad_norm=1.0, d2z over d2z) and bf16 moments (negative: "
            "faster); the last column is the "
            f"ratio itself: `{TORCH_CLIP_ROW}` over `{CLIP_ROW}`. Two identical optimizers differ by up to "
            "about 1% this way (their memory differs).",
            "",
            "| workload | dtype | rounds | " + " | ".join(pairs) + " |",
            "|---|---|---|" + "---|" * len(pairs),
        ]
        for (w, d), cs in itertools.groupby(costs, key=lambda c: c[:2]):
            by_label = {c[2]: c[3] for c in cs}
            n = pair_rounds.get((w, f"torch.{d}"), 0)
            lines.append(
                f"| {w} | {d} | {n} | " + " | ".join(_cost(k, by_label.get(k, float("nan"))) for k in pairs) + " |"
            )
    lines += [
        "",
        f"Bytes per parameter of each storage mode (`{LEAN_ROW}`: exp_avg_dtype = exp_avg_sq_dtype = "
        "bfloat16; GB/s above counts each row's own traffic):",
        "",
        *modes_table(),
    ]
    lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in skipped.items()]
    table = "\n".join(lines)
    print(table)

    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    folder = device_folder(args.out, device)
    tag = f"throughput{'-full' if args.full else ''}-{stamp}"
    cmd = (
        "python benchmarks/bench_throughput.py"
        + (" --full" if args.full else "")
        + (" --compile" if args.compile else "")
    )
    header = (
        f"# Throughput, {device.type} ({device_name(device)}), {threads} threads, {stamp}\n\n"
        f"torch {torch.__version__}, d2z_optim {d2z_optim.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs. Median of {reps} interleaved steps (one of each competitor per round, in "
        "a new random order each round) after 2 warm-up steps. Bytes per parameter: 7 x element size "
        "(moments in their own dtype: see the modes table). "
        "'of roofline': the roofline row's median time over the row's (the roofline: an in-place add_ "
        "moving the step's bytes, timed in the same rounds). Peak stream bandwidth at the start (best of "
        f"{max(reps, 10)}): copy_ {copy_gbs:.1f} GB/s, in-place add_ {add_gbs:.1f} GB/s (bytes as counted). "
        "'vs torch fused': median over rounds of the ratio of the two steps' times in the same round. "
        f"Rows marked '(N rounds)': over {SLOW_FACTOR:g}x slower than torch fused at warm-up, timed in the "
        "first N rounds only (all with --full).\n"
        f"Command: `{cmd}`\n\n"
    )
    (folder / f"{tag}.md").write_text(header + table + "\n")
    with open(folder / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    chart(rows, folder / f"{tag}.png", device)
    print(f"\nwrote {folder / tag}.md, .csv, .png")


def chart(rows: list[dict], path: Path, device: torch.device) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'd2z_optim[plot]')", file=sys.stderr)
        return
    groups = sorted(
        {(r["workload"], r["dtype"]) for r in rows}, key=lambda x: [r["workload"] for r in rows].index(x[0])
    )
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.8), squeeze=False)
    for ax, (w, d) in zip(axes[0], groups):
        sel = [r for r in rows if r["workload"] == w and r["dtype"] == d]
        ax.barh(
            [r["competitor"] for r in sel],
            [r["speedup_vs_torch_fused"] for r in sel],
            color=["tab:blue" if r["competitor"].startswith("d2z") else "tab:gray" for r in sel],
        )
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set(title=f"{w}, {d}", xlabel="speedup vs torch fused + LambdaLR")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"AdamW step throughput on {device_name(device)}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
