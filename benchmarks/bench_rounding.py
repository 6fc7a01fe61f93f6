"""bf16 parameters' storage modes side by side: stochastic rounding's cost, and what fp32 master
weights kept as remainders (``master_weights="remainders"``) cost against fp32 parameters.

    python benchmarks/bench_rounding.py           # make bench
    python benchmarks/bench_rounding.py --rounds 40
    python benchmarks/bench_rounding.py --quick --rounds 2 --out /tmp/x   # a smoke test

Two comparisons, each a set of optimizers stepping their own copies of the same parameters on the
same gradients, interleaved round after round in a random order (as bench_throughput.py times its
competitors):

* rounding: bf16 parameters with bf16 moments, rounded to nearest even vs stochastically
  (``stochastic_rounding=True``). The issue's bound: SR within 5% of RNE (the generator must be
  cheap). A second copy of the RNE optimizer is timed with them: how far two identical steps
  differ here (on a 2-core VM, up to ~15% on GPT-2 small, by where their memory landed).
* master weights: bf16 parameters with an int16 remainder against the fp32 parameters they stand
  for (the same fp32 math and values, bit for bit), with fp32 moments and with bf16 moments.

Reported: each mode's storage and traffic per parameter (the traffic model: what a step reads,
p, g, m, v and the remainder, and writes, p, m, v and the remainder, in their dtypes), its median
step time and bandwidth under that model, and paired ratios (the median over rounds of two step
times' ratio in the same round). Output: Markdown on stdout and under
``benchmarks/results/<device>/rounding-<date>.md``.
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
BF16, F32 = torch.bfloat16, torch.float32
LEAN = dict(exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16)
REM = dict(master_weights="remainders")
# label: (parameter dtype, AdamW options, moments' dtype, remainder bytes)
MODES = {
    "round to nearest even": (BF16, LEAN, BF16, 0),
    "stochastic rounding": (BF16, dict(LEAN, stochastic_rounding=True), BF16, 0),
    # a second, identical optimizer: the floor of what side-by-side steps tell apart here (two
    # copies of the same step differ by where their memory landed)
    "round to nearest even, a second copy": (BF16, LEAN, BF16, 0),
    "fp32 parameters": (F32, {}, F32, 0),
    "bf16 + remainders": (BF16, REM, F32, 2),
    "fp32 parameters + bf16 moments": (F32, LEAN, BF16, 0),
    "bf16 + remainders + bf16 moments": (BF16, dict(REM, **LEAN), BF16, 2),
}
# the sets timed together, and the paired ratios each reports: (numerator, denominator, bound)
COMPARISONS = {
    "rounding": [
        ("stochastic rounding", "round to nearest even", 1.05),
        ("round to nearest even, a second copy", "round to nearest even", None),
    ],
    "master weights": [
        ("bf16 + remainders", "fp32 parameters", None),
        ("bf16 + remainders + bf16 moments", "fp32 parameters + bf16 moments", None),
    ],
}


def storage_bytes(mode: str) -> int:
    """Kept per parameter between steps: the parameter, its moments and its remainder."""
    p, _, m, r = MODES[mode]
    return p.itemsize + 2 * m.itemsize + r


def traffic_bytes(mode: str) -> int:
    """Moved per parameter and step: read p, g, m, v (and the remainder), write p, m, v (and it)."""
    p, _, m, r = MODES[mode]
    return 3 * p.itemsize + 4 * m.itemsize + 2 * r


def _params(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, BF16) for s in shapes]


def bench(name, shapes, device, rounds, modes):
    base = _params(shapes, device)  # bf16 values: the fp32 modes start from the same ones
    grads = [torch.randn_like(p) * 1e-3 for p in base]
    steps = {}
    for label in modes:
        dtype, kw, _, _ = MODES[label]
        params = [torch.nn.Parameter(p.to(dtype)) for p in base]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt = AdamW(params, lr=1e-3, total_steps=1000, **kw)
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
        rows.append(
            f"| {name} | {k} | {storage_bytes(k)} | {traffic_bytes(k)} | {med * 1e3:.2f} "
            f"| {n * traffic_bytes(k) / med / 1e9:.1f} |"
        )
    return rows, times


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
    head = [
        "| workload | mode | storage B/param | traffic B/param/step | median ms | GB/s |",
        "|---|---|---|---|---|---|",
    ]
    lines, ratios = list(head), []
    for name, shapes in loads.items():
        for pairs in COMPARISONS.values():
            modes = list(dict.fromkeys(m for pair in pairs for m in pair[:2]))
            rows, times = bench(name, shapes, device, args.rounds, modes)
            lines += rows
            for num, den, bound in pairs:
                ratio = paired(times[num], times[den])
                verdict = "-" if bound is None else ("within" if ratio <= bound else "**over**") + f" {bound:.2f}"
                ratios.append(f"| {name} | {num} / {den} | {ratio:.3f} | {(ratio - 1) * 100:+.1f}% | {verdict} |")
    out = [
        f"# bf16 storage modes: rounding and master weights, {device_name(device)}, {dt.date.today()}",
        "",
        f"`d2z_optim.AdamW` (backend auto), {args.rounds} interleaved rounds per comparison; torch "
        f"{torch.__version__}. Command: `python benchmarks/bench_rounding.py --rounds {args.rounds}`. "
        "Storage: parameter, moments and remainder (the gradient is the model's); traffic: read p, g, m, v "
        "(and the remainder), write p, m, v (and it).",
        "",
        *lines,
        "",
        "Paired ratios (median over rounds of the two step times' ratio in the same round; SR / RNE "
        "bound: <= 1.05; the second copy of the RNE optimizer over the first is what two identical "
        "steps differ by here, the floor below which a cost is not seen):",
        "",
        "| workload | ratio | value | cost | bound |",
        "|---|---|---|---|---|",
        *ratios,
    ]
    text = "\n".join(out) + "\n"
    print(text)
    folder = device_folder(args.out, device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rounding-{dt.date.today()}.md").write_text(text)


if __name__ == "__main__":
    main()
