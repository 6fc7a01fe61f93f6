"""Stochastic rounding's cost: bf16 parameters with bf16 moments, rounded to nearest even vs
stochastically (``stochastic_rounding=True``), side by side on the same gradients.

    python benchmarks/bench_rounding.py           # make bench
    python benchmarks/bench_rounding.py --rounds 40
    python benchmarks/bench_rounding.py --quick --rounds 2 --out /tmp/x   # a smoke test

The two optimizers step their own copies of the same bf16 parameters, interleaved round after
round in a random order (as bench_throughput.py times its competitors); reported: each one's
median step time, bandwidth under the 14-bytes-per-parameter model (read p, g, m, v; write p, m,
v, 2 bytes each) and the paired ratio SR / RNE (the median over rounds of the two step times'
ratio in the same round). The issue's bound: within 5% (the generator must be cheap).
Output: Markdown on stdout and under ``benchmarks/results/<device>/rounding-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import RESULTS, device_folder, device_name, gpt2_small_shapes, paired, timed

from d2z_optim import AdamW

warnings.filterwarnings("ignore", message=r"d2z_optim\.AdamW: the run ended")
BYTES = 14  # bf16: read p, g, m, v and write p, m, v


def _params(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, torch.bfloat16) for s in shapes]


def bench(name, shapes, device, rounds):
    base = _params(shapes, device)
    grads = [torch.randn_like(p) * 1e-3 for p in base]
    steps = {}
    for label, sr in (("round to nearest even", False), ("stochastic rounding", True)):
        params = [torch.nn.Parameter(p.clone()) for p in base]
        for p, g in zip(params, grads):
            p.grad = g
        opt = AdamW(params, lr=1e-3, total_steps=1000, stochastic_rounding=sr)
        for _ in range(2):  # warm-up: states, step holders
            opt.step()
        steps[label] = opt.step
    times = {k: [] for k in steps}
    for _ in range(rounds):
        order = list(steps)
        random.shuffle(order)
        for k in order:
            times[k].append(timed(steps[k], device))
    n = sum(p.numel() for p in base)
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append(f"| {name} | {k} | {med * 1e3:.2f} | {n * BYTES / med / 1e9:.1f} |")
    ratio = paired(times["stochastic rounding"], times["round to nearest even"])
    return rows, ratio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="small workloads (a smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loads = {"1 x 64M": [(64 * 2**20,)], "GPT-2 small": gpt2_small_shapes()}
    if args.quick:
        loads = {"1 x 64K": [(65536,)], "100 x 1K": [(1024,)] * 100}
    lines = ["| workload | rounding | median ms | GB/s (14 B/param) |", "|---|---|---|---|"]
    ratios = []
    for name, shapes in loads.items():
        rows, ratio = bench(name, shapes, device, args.rounds)
        lines += rows
        ratios.append(f"| {name} | {ratio:.3f} | {(ratio - 1) * 100:+.1f}% |")
    out = [
        f"# Stochastic rounding vs round to nearest even: {device_name(device)}, {dt.date.today()}",
        "",
        f"bf16 parameters, bf16 moments, `d2z_optim.AdamW` (backend auto), {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}. Command: `python benchmarks/bench_rounding.py --rounds {args.rounds}`.",
        "",
        *lines,
        "",
        "Paired ratio (median over rounds of SR time / RNE time in the same round; bound: <= 1.05):",
        "",
        "| workload | SR / RNE | cost |",
        "|---|---|---|",
        *ratios,
    ]
    text = "\n".join(out) + "\n"
    print(text)
    folder = device_folder(args.out, device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rounding-{dt.date.today()}.md").write_text(text)


if __name__ == "__main__":
    main()
