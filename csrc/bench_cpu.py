"""CPU speed of d2z::adamw_step_ vs torch.optim.AdamW(fused=True), same process, fp32.

    .venv/bin/python csrc/bench_cpu.py [--steps 7]

Median of --steps timed steps after 2 warm-up steps, both optimizers run per workload in one
process; the d2z columns average two runs each (order linear, constant, constant, linear).
"""

import argparse
import statistics
import time

import d2z_optim._C  # noqa: F401
import torch


def gpt2_small_shapes():
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


WORKLOADS = {
    "1 x 64M": [(64 * 2**20,)],
    "10,000 x 1,024": [(1024,)] * 10_000,
    "GPT-2 small (124M, 148 tensors)": gpt2_small_shapes(),
}


def bench_torch(shapes, steps):
    params = [torch.randn(s) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_d2z(shapes, steps, schedule):
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    st = [torch.zeros(()) for _ in params]
    sc = torch.zeros((), dtype=torch.int64)
    T = 1000
    lr = torch.linspace(1, 0, T) if schedule == "linear-d2z" else torch.ones(T)
    wd = torch.ones(T)
    hp = torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.1, 0, 0, 0]], dtype=torch.float64)
    gi = [0] * len(params)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        torch.ops.d2z.adamw_step_(params, grads, m, v, [], st, sc, lr, wd, hp, gi, False, None, None)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, isa {torch.ops.d2z._cpu_isa(-1)}")
    print("| workload | torch fused (ms) | d2z linear-d2z (ms) | d2z constant (ms) | speedup vs torch | d2z/constant |")
    print("|---|---|---|---|---|---|")
    for name, shapes in WORKLOADS.items():
        t = bench_torch(shapes, args.steps)
        # order L, C, C, L: the first run of a size warms the allocator; neither variant gets only that
        runs = [bench_d2z(shapes, args.steps, s) for s in ("linear-d2z", "constant", "constant", "linear-d2z")]
        dl, dc = (runs[0] + runs[3]) / 2, (runs[1] + runs[2]) / 2
        print(
            f"| {name} | {t * 1e3:.1f} | {dl * 1e3:.1f} | {dc * 1e3:.1f} | {t / dl:.2f}x | {dl / dc:.3f} |", flush=True
        )


if __name__ == "__main__":
    main()
