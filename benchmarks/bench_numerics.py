"""Numerics: each backend's and torch's AdamW error against a float64 reference, step by step.

    python benchmarks/bench_numerics.py            # 200 steps (make bench)
    python benchmarks/bench_numerics.py --steps 1000

Every competitor steps the same parameters on the same fixed-seed gradients
(scales 1e-3 .. 10 across tensors; fp16 1e-1 .. 10, since smaller squared
gradients underflow fp16 states for everyone) under linear-d2z. Torch runs the
schedule through ``LambdaLR``. The reference (``d2z_optim.reference.Fp64AdamW``)
starts from the same (rounded) initial parameters and sees the same gradients in
float64. Reported per dtype: max and mean absolute and relative error at the
last step, and the worst max-abs error over all steps; a PNG plots max-abs
error against the step. Rows "+ bf16 moments" (and "+ fp16 m, fp32 v"): the moments stored in
that dtype (``exp_avg_dtype``, ``exp_avg_sq_dtype``) while the parameters keep theirs. Rows
"+ remainders" (bf16, ``master_weights="remainders"``): the error of the fp32 master values (each
bf16 parameter joined with its int16 remainder), and of the bf16 halves alone.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
import warnings
from pathlib import Path

import torch

import d2z_optim
from d2z_optim import AdamW, schedules
from d2z_optim.backends.remainders import join
from d2z_optim.reference import Fp64AdamW

# a benchmark times a few steps of a long schedule: not a run that ended short of it
warnings.filterwarnings("ignore", message=r"d2z_optim\.AdamW: the run ended")

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(256, 64), (64,), (1000,), (33, 17), (4097,)]
HP = dict(lr=1e-2, weight_decay=0.1)


def grad_scales(dtype: torch.dtype) -> list[float]:
    exps = (-1, 0, 1) if dtype == torch.float16 else (-3, -2, -1, 0, 1)
    return [10.0 ** exps[j % len(exps)] for j in range(len(SHAPES))]


# moments stored in another dtype than the parameters' (exp_avg_dtype = exp_avg_sq_dtype), per dtype
# (exp_avg_dtype, exp_avg_sq_dtype) per parameter dtype. fp16 second moments underflow for small
# gradients (g^2 (1 - beta2) < 6e-8 flushes to 0 and the step becomes m / eps): the fp16 rows show it
LEAN = {
    torch.float32: ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float16, torch.float16)),
    torch.bfloat16: ((torch.float32, torch.float32),),
    torch.float16: ((torch.float32, torch.float32),),
}


def _short(d: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[d]


# master_weights="remainders" rows (bf16 parameters): their error is that of the fp32 master values
# (the bf16 half joined with its remainder); one more row gives the bf16 halves' error
REM_ROWS = ("d2z auto + remainders (fp32 masters)", "d2z auto + remainders + bf16 moments (fp32 masters)")
HALVES_ROW = "d2z auto + remainders (the bf16 halves)"


def _values(name: str, params, opt) -> list[torch.Tensor]:
    """What a row's error is measured on: the parameters, or a remainders row's fp32 masters."""
    if name not in REM_ROWS:
        return [p.detach() for p in params]
    return [join(p.detach(), opt.state[p]["param_remainder"]) if opt.state[p] else p.detach() for p in params]


def competitors(sched, device, dtype=torch.float32):
    out = {}
    for name, why in d2z_optim.available_backends().items():
        if why is None and name in ("torch", "cpu") + (("cuda", "triton") if device.type == "cuda" else ()):
            out[f"d2z {name}"] = lambda p, n=name: (AdamW(p, backend=n, schedule=sched, **HP), None)
        elif why is not None:
            print(f"skipped: d2z {name} ({why})", file=sys.stderr)
    for m, v in LEAN.get(dtype, ()):
        kw = dict(exp_avg_dtype=m, exp_avg_sq_dtype=v)
        label = f"d2z auto + {_short(m)} moments" if m == v else f"d2z auto + {_short(m)} m, {_short(v)} v"
        out[label] = lambda p, kw=kw: (AdamW(p, schedule=sched, **HP, **kw), None)
    # stochastic rounding of every 16-bit value the step writes (the parameters' dtype, or bf16 moments)
    sr = dict(stochastic_rounding=True)
    if dtype != torch.float32:
        out["d2z auto + stochastic rounding"] = lambda p: (AdamW(p, schedule=sched, **HP, **sr), None)
    else:
        bf16 = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16, **sr)
        out["d2z auto + bf16 moments, stochastic rounding"] = lambda p: (AdamW(p, schedule=sched, **HP, **bf16), None)
    if dtype == torch.bfloat16:  # fp32 master values as bf16 + int16 remainder: judged by the masters
        rem = dict(master_weights="remainders")
        out[REM_ROWS[0]] = lambda p: (AdamW(p, schedule=sched, **HP, **rem), None)
        bf16 = dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16, **rem)
        out[REM_ROWS[1]] = lambda p: (AdamW(p, schedule=sched, **HP, **bf16), None)
    for label, kw in (
        ("torch fused", dict(fused=True)),
        ("torch foreach", dict(foreach=True)),
        ("torch for-loop", dict(foreach=False)),
    ):

        def make(p, kw=kw):
            opt = torch.optim.AdamW(p, **HP, **kw)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, sched.multiplier)

        out[label] = make
    return out


def run(dtype: torch.dtype, steps: int, device: torch.device):
    sched = schedules.get("linear-d2z", steps)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    ref = Fp64AdamW(init, mult=sched.multiplier, **HP)
    comps = {}
    for name, make in competitors(sched, device, dtype).items():
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        try:
            opt, lam = make(params)
        except (RuntimeError, ValueError) as e:  # e.g. a dtype a kernel does not take
            print(f"skipped: {name} at {dtype} ({e})", file=sys.stderr)
            continue
        comps[name] = (params, opt, lam)
    curves = {name: [] for name in comps}
    scales = grad_scales(dtype)
    for k in range(steps):
        g = torch.Generator().manual_seed(10_000 + k)
        grads = [(torch.randn(s, generator=g, dtype=torch.float64) * c).to(dtype) for s, c in zip(SHAPES, scales)]
        ref.step(grads)
        for name, (params, opt, lam) in comps.items():
            for p, gr in zip(params, grads):
                p.grad = gr.to(device)
            opt.step()
            if lam is not None:
                lam.step()
            vals = _values(name, params, opt)
            curves[name].append(max(float((x.cpu().double() - r).abs().max()) for x, r in zip(vals, ref.p)))
            if name == REM_ROWS[0]:
                curves.setdefault(HALVES_ROW, []).append(
                    max(float((p.detach().cpu().double() - r).abs().max()) for p, r in zip(params, ref.p))
                )
    rows = []
    views = [(name, _values(name, params, opt)) for name, (params, opt, _) in comps.items()]
    if REM_ROWS[0] in comps:
        views.insert(
            [n for n, _ in views].index(REM_ROWS[0]) + 1, (HALVES_ROW, [p.detach() for p in comps[REM_ROWS[0]][0]])
        )
    for name, vals in views:
        err = torch.cat([(x.cpu().double() - r).abs().flatten() for x, r in zip(vals, ref.p)])
        mag = torch.cat([r.abs().flatten() for r in ref.p]).clamp(min=1e-3)  # relative to |p|, floor 1e-3
        rel = err / mag
        rows.append(
            dict(
                dtype=str(dtype).replace("torch.", ""),
                competitor=name,
                max_abs=float(err.max()),
                mean_abs=float(err.mean()),
                max_rel=float(rel.max()),
                mean_rel=float(rel.mean()),
                worst_max_abs=max(curves[name]),
                finite=all(map(lambda x: x == x and x != float("inf"), curves[name])),
            )
        )
    return rows, curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    all_rows, all_curves = [], {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        print(f"\rnumerics: {dtype} ...".ljust(40), end="", file=sys.stderr, flush=True)
        rows, curves = run(dtype, args.steps, device)
        all_rows += rows
        all_curves[str(dtype).replace("torch.", "")] = curves
    print("\r".ljust(41), file=sys.stderr)
    lines = [
        f"Error vs a float64 reference after {args.steps} steps of linear-d2z (lr 1e-2, wd 0.1), {device.type}",
        "",
        "| dtype | competitor | max abs | mean abs | max rel | mean rel | worst max abs over steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        lines.append(
            f"| {r['dtype']} | {r['competitor']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | {r['max_rel']:.3g} "
            f"| {r['mean_rel']:.3g} | {r['worst_max_abs']:.3g}{'' if r['finite'] else ' (non-finite!)'} |"
        )
    table = "\n".join(lines)
    print(table)

    from bench_throughput import device_folder  # same folder naming as the throughput table

    folder = device_folder(args.out, device)
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    tag = f"numerics-{stamp}"
    (folder / f"{tag}.md").write_text(
        f"# Numerics, {stamp}\n\ntorch {torch.__version__}, d2z_optim {d2z_optim.__version__}. "
        f"Command: `python benchmarks/bench_numerics.py --steps {args.steps}`\n\n{table}\n"
    )
    with open(folder / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        w.writeheader()
        w.writerows(all_rows)
    if not args.no_plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot (pip install 'd2z_optim[plot]')", file=sys.stderr)
        else:
            fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
            for ax, (dtype, curves) in zip(axes, all_curves.items()):
                for name, ys in curves.items():
                    ax.plot(range(1, len(ys) + 1), ys, label=name, lw=1.2)
                ax.set(title=dtype, xlabel="step", ylabel="max |p - p_fp64|", yscale="log")
                ax.grid(alpha=0.3)
                ax.legend(fontsize="small")
            fig.tight_layout()
            fig.savefig(folder / f"{tag}.png", dpi=90)
            plt.close(fig)
    print(f"\nwrote {folder / tag}.md, .csv, .png")


if __name__ == "__main__":
    main()
