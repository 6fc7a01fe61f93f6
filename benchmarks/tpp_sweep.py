"""Reproduce *Straight to Zero* at small scale: D2Z vs 10x decay across tokens-per-parameter.

    python benchmarks/tpp_sweep.py --quick     # ~5-10 min on 2 CPU cores (make reproduce ARGS=--quick)
    python benchmarks/tpp_sweep.py             # the default sweep, under an hour on 2 cores
    python benchmarks/tpp_sweep.py --full      # adds 200 TPP and more schedules' seeds

Data: the Python standard library's own source files (present on every machine, no
download), byte-level tokens (vocab 256), split into train and validation by file.
Model: a small pre-LN GPT in plain PyTorch. Training: ``d2z_optim.AdamW`` (fastest
backend available), weight decay 0.1, 10% warmup, each schedule at peak LRs spaced
by factors of 2, at 2, 20 and 80 tokens per parameter. Validation loss on a fixed
held-out token budget. Runs are appended to a CSV as they finish, and a rerun skips
what the CSV already has (resumable). Outputs under ``benchmarks/results/tpp_sweep/``:
the CSV, a Markdown report (a table shaped like the paper's Table 1 and the four
findings, checked against the numbers), and PNG plots like its Figures 3 and 4.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from d2z_optim import AdamW

RESULTS = Path(__file__).resolve().parent / "results" / "tpp_sweep"
SCHEDULES = ["linear-d2z", "linear-10x", "cosine-d2z", "cosine-10x", "constant", "wsd"]
FIELDS = ["model", "schedule", "lr", "tpp", "seed", "params", "steps", "tokens", "val_loss", "train_loss", "seconds"]


# ------------------------------------------------------------------- corpus
def corpus_files() -> tuple[list[Path], list[Path]]:
    """(train, validation) source files of the standard library, split by a hash of the path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or any(x in ("test", "tests", "idle_test") for x in parts):
            continue
        rel = "/".join(parts)
        (val if zlib.crc32(rel.encode()) % 10 == 0 else train).append(p)
    return train, val


_CACHE: dict[str, torch.Tensor] = {}


def tokens(split: str) -> torch.Tensor:
    """All bytes of a split as one uint8 tensor (files joined in sorted order)."""
    if split not in _CACHE:
        files = corpus_files()[0 if split == "train" else 1]
        data = b"".join(f.read_bytes() for f in files)
        _CACHE[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _CACHE[split]


# -------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelCfg:
    d_model: int = 48
    n_layer: int = 2
    n_head: int = 4
    ctx: int = 64
    batch: int = 32

    @property
    def name(self) -> str:
        return f"d{self.d_model}-L{self.n_layer}-ctx{self.ctx}"


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A pre-LN byte-level GPT: embeddings, causal attention blocks, final LayerNorm, linear head."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.ctx, cfg.d_model) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(idx) + self.pos[: idx.shape[1]])))


def loss_on(model: GPT, batch: torch.Tensor) -> torch.Tensor:
    x = batch[:, :-1].long()
    if next(model.parameters()).dtype != torch.float32:  # 16-bit weights: the forward in fp32 from them
        weights = {n: p.float() for n, p in model.named_parameters()}
        logits = torch.func.functional_call(model, weights, (x,))
    else:
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].long().flatten())


# How the weights and the optimizer's states are stored (precision_sweep.py compares them): the
# parameters' dtype and AdamW's options. The forward and backward run in fp32 either way.
PRECISIONS = {
    "fp32": (torch.float32, {}),
    "fp32 + bf16 states": (torch.float32, dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)),
    "bf16 round-to-nearest": (torch.bfloat16, {}),
    "bf16 stochastic rounding": (torch.bfloat16, dict(stochastic_rounding=True)),
    "bf16 + remainders": (torch.bfloat16, dict(master_weights="remainders")),
}


def n_params(cfg: ModelCfg) -> int:
    return sum(p.numel() for p in GPT(cfg).parameters())


@torch.no_grad()
def val_loss(model: GPT, cfg: ModelCfg, budget: int) -> float:
    """Mean loss over the first ``budget`` validation tokens, in fixed, non-overlapping windows."""
    data = tokens("val")
    n_win = budget // cfg.ctx
    wins = data[: n_win * (cfg.ctx + 1)].view(n_win, cfg.ctx + 1)
    model.eval()
    total = sum(float(loss_on(model, wins[i : i + 64])) * len(wins[i : i + 64]) for i in range(0, n_win, 64))
    model.train()
    return total / n_win


def run_one(
    cfg: ModelCfg,
    schedule: str,
    lr: float,
    tpp: float,
    seed: int,
    *,
    val_budget: int = 65536,
    max_steps: int | None = None,
    precision: str = "fp32",
) -> dict:
    """Train one model for ``tpp`` tokens per parameter and return its row (``precision``: a key of
    :data:`PRECISIONS`)."""
    torch.manual_seed(seed)
    dtype, opt_kw = PRECISIONS[precision]
    if opt_kw.get("stochastic_rounding"):  # the run's seed seeds the rounding too: its noise is in the spread
        opt_kw = dict(opt_kw, rounding_seed=seed)
    model = GPT(cfg).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    steps = max(10, math.ceil(tpp * params / (cfg.batch * cfg.ctx)))
    if max_steps is not None:
        steps = min(steps, max_steps)
    opt = AdamW(model.parameters(), lr=lr, weight_decay=0.1, schedule=schedule, total_steps=steps, warmup=0.1, **opt_kw)
    data = tokens("train")
    gen = torch.Generator().manual_seed(10_000 + seed)
    t0 = time.perf_counter()
    ema = None
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - cfg.ctx - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([data[s : s + cfg.ctx + 1] for s in starts.tolist()])
        loss = loss_on(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
    return dict(
        model=cfg.name,
        schedule=schedule,
        lr=lr,
        tpp=tpp,
        seed=seed,
        params=params,
        steps=steps,
        tokens=steps * cfg.batch * cfg.ctx,
        val_loss=val_loss(model, cfg, val_budget),
        train_loss=ema,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- the sweep
def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("lr", "tpp", "val_loss", "train_loss", "seconds"):
            r[k] = float(r[k])
        for k in ("seed", "params", "steps", "tokens"):
            r[k] = int(r[k])
    return rows


def key(r: dict) -> tuple:
    return (r["model"], r["schedule"], f"{float(r['lr']):.6g}", f"{float(r['tpp']):g}", int(r["seed"]))


def best_lr(rows, model, schedule, tpp, seed=0):
    sel = [r for r in rows if (r["model"], r["schedule"], r["tpp"], r["seed"]) == (model, schedule, tpp, seed)]
    return min(sel, key=lambda r: r["val_loss"]) if sel else None


def sweep(args) -> tuple[list[dict], ModelCfg, list[str], list[float], list[float]]:
    cfg = ModelCfg(d_model=32, n_layer=2) if args.quick else ModelCfg()
    scheds = ["linear-d2z", "linear-10x"] if args.quick else list(SCHEDULES)
    tpps = [2.0, 20.0, 80.0] + ([200.0] if args.full else [])
    lrs = [args.lr_centre * 2.0**k for k in (-2, -1, 0, 1, 2)]
    out = args.out / f"runs-{cfg.name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    done = {key(r) for r in rows}
    plan = [(s, lr, t, 0) for t in tpps for s in scheds for lr in lrs]

    def execute(plan):
        todo = [p for p in plan if key(dict(model=cfg.name, schedule=p[0], lr=p[1], tpp=p[2], seed=p[3])) not in done]
        t_start = time.perf_counter()
        for n, (s, lr, t, seed) in enumerate(todo, 1):
            el = time.perf_counter() - t_start
            eta = f", ~{el / (n - 1) * (len(todo) - n + 1) / 60:.0f} min left" if n > 1 else ""
            bar = "#" * int(20 * (n - 1) / len(todo))
            print(
                f"\r[{bar:<20}] {n}/{len(todo)} {s} lr={lr:g} tpp={t:g} seed={seed}{eta}".ljust(100),
                end="",
                file=sys.stderr,
                flush=True,
            )
            r = run_one(cfg, s, lr, t, seed, max_steps=args.max_steps)
            rows.append(r)
            done.add(key(r))
            new = not out.exists()
            with open(out, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerow({k: r[k] for k in FIELDS})
        if todo:
            print(file=sys.stderr)

    execute(plan)
    # a second seed at each schedule's best LR, for the seed-to-seed spread
    seeds = [(b["schedule"], b["lr"], t, 1) for t in tpps for s in scheds if (b := best_lr(rows, cfg.name, s, t))]
    execute(seeds)
    return rows, cfg, scheds, tpps, lrs


# ------------------------------------------------------------------ report
def report(rows, cfg, scheds, tpps, lrs, out: Path) -> str:
    rows = [r for r in rows if r["model"] == cfg.name]
    lines = [f"# TPP sweep: D2Z vs 10x on the Python standard library ({cfg.name}, {rows[0]['params']:,} params)", ""]
    lines += [
        "Validation loss (bytes, nats/token) at 20 TPP, seed 0; best per row in bold (the paper's Table 1 shape).",
        "",
        "| peak LR | " + " | ".join(scheds) + " |",
        "|---" * (len(scheds) + 1) + "|",
    ]
    for lr in lrs:
        vals = {
            s: next(
                (
                    r["val_loss"]
                    for r in rows
                    if r["schedule"] == s and r["tpp"] == 20 and r["seed"] == 0 and math.isclose(r["lr"], lr)
                ),
                None,
            )
            for s in scheds
        }
        best = min(v for v in vals.values() if v is not None)
        cells = [("**%.4f**" if v == best else "%.4f") % v if v is not None else "-" for v in vals.values()]
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")

    def best(s, t, seed=0):
        return best_lr(rows, cfg.name, s, t, seed)

    def spread(s, t):
        b0 = best(s, t)
        b1 = (
            next(
                (
                    r
                    for r in rows
                    if r["schedule"] == s and r["tpp"] == t and r["seed"] == 1 and math.isclose(r["lr"], b0["lr"])
                ),
                None,
            )
            if b0
            else None
        )
        return abs(b0["val_loss"] - b1["val_loss"]) if b1 else float("nan")

    lines += [
        "",
        "Best LR per schedule and TPP (seed 0), with the seed-to-seed difference at that LR (seeds 0, 1):",
        "",
        "| TPP | schedule | best peak LR | val loss | seed spread |",
        "|---|---|---|---|---|",
    ]
    for t in tpps:
        for s in scheds:
            b = best(s, t)
            if b:
                lines.append(f"| {t:g} | {s} | {b['lr']:g} | {b['val_loss']:.4f} | {spread(s, t):.4f} |")
    gaps = {}
    for t in tpps:
        d, x = best("linear-d2z", t), best("linear-10x", t)
        if d and x:
            gaps[t] = 100 * (x["val_loss"] - d["val_loss"]) / x["val_loss"]  # > 0: D2Z better
    noise = {t: max(spread("linear-d2z", t), spread("linear-10x", t)) for t in tpps}
    lines += ["", "## Findings at this scale", ""]

    def verdict(ok):
        return "reproduces" if ok else "does NOT reproduce"

    f1 = [t for t in (20.0, 80.0) if t in gaps]
    ok1 = all(gaps[t] > 0 for t in f1)
    lines.append(
        f"1. D2Z beats 10x at the best LR at 20 and 80 TPP: {verdict(ok1)}. Gap (10x - D2Z) / 10x: "
        + ", ".join(f"{gaps[t]:+.2f}% at {t:g} TPP (seed spread {noise[t]:.4f} nats)" for t in f1)
        + "."
    )
    ts = sorted(gaps)
    ok2 = all(gaps[a] < gaps[b] for a, b in itertools.pairwise(ts))
    lines.append(
        f"2. The gap grows with TPP: {verdict(ok2)} (" + ", ".join(f"{t:g}: {gaps[t]:+.2f}%" for t in ts) + ")."
    )
    ok3 = 2.0 in gaps and gaps[2.0] <= 0
    lines.append(f"3. At 2 TPP 10x is at least as good: {verdict(ok3)} ({gaps.get(2.0, float('nan')):+.2f}%).")
    moves = {}
    for s in ("linear-d2z", "linear-10x", "constant"):
        bl = [best(s, t)["lr"] for t in tpps if best(s, t)]
        if len(bl) == len(tpps):
            moves[s] = math.log2(max(bl) / min(bl))
    ok4 = "linear-d2z" in moves and all(moves["linear-d2z"] <= v for k, v in moves.items() if k != "linear-d2z")
    lines.append(
        f"4. The best peak LR moves less across TPP with D2Z than with 10x and constant: {verdict(ok4)} "
        "(spread of the best LR across TPP, in factors of 2: "
        + ", ".join(f"{k} {v:g}" for k, v in moves.items())
        + ")."
    )
    edges = [
        f"{s} at {t:g} TPP ({best(s, t)['lr']:g})"
        for t in tpps
        for s in scheds
        if best(s, t) and best(s, t)["lr"] in (min(lrs), max(lrs))
    ]
    lines.append("")
    lines.append("A gap smaller than the seed spread next to it is within noise at this scale.")
    if edges:
        lines.append(
            "The best LR sits at an edge of the sweep for: " + "; ".join(edges) + ". There the true optimum "
            "may lie outside the sweep, and the comparison at 'the best LR' is a lower bound for that schedule "
            "(the paper's diagnostic, Appendix B.9: if D2Z does not beat 10x at 20 TPP, the peak LR is too low)."
        )
    text = "\n".join(lines) + "\n"
    (out / f"report-{cfg.name}.md").write_text(text)
    plots(rows, cfg, scheds, tpps, gaps, out)
    return text


def plots(rows, cfg, scheds, tpps, gaps, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'd2z_optim[plot]')", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(tpps), figsize=(4.5 * len(tpps), 4), squeeze=False)
    for ax, t in zip(axes[0], tpps):
        for s in scheds:
            sel = sorted(
                (r["lr"], r["val_loss"]) for r in rows if r["schedule"] == s and r["tpp"] == t and r["seed"] == 0
            )
            if sel:
                ax.plot(*zip(*sel), marker="o", label=s)
        ax.set(xscale="log", xlabel="peak LR", ylabel="validation loss", title=f"{t:g} TPP")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"Validation loss vs peak LR ({cfg.name}); cf. the paper's Figure 3")
    fig.tight_layout()
    fig.savefig(out / f"fig3-{cfg.name}.png", dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    ts = sorted(gaps)
    ax.plot(ts, [gaps[t] for t in ts], marker="o")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xscale="log",
        xlabel="tokens per parameter",
        ylabel="(10x - D2Z) / 10x loss, %",
        title="D2Z gain over 10x at the best LR",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"fig4-{cfg.name}.png", dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, 2 schedules (~5-10 min)")
    ap.add_argument("--full", action="store_true", help="adds 200 TPP")
    ap.add_argument(
        "--lr-centre",
        type=float,
        default=None,
        help="centre of the peak-LR sweep, in factors of 2 (default 1.6e-2, the paper's; 3.2e-2 with --quick)",
    )
    ap.add_argument("--max-steps", type=int, default=None, help="cap steps per run (smoke tests)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.lr_centre is None:  # tuned by hand: the best 20-TPP LR of each model sits inside its sweep
        args.lr_centre = 3.2e-2 if args.quick else 1.6e-2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cfg, scheds, tpps, lrs = sweep(args)
    print(report(rows, cfg, scheds, tpps, lrs, args.out))


if __name__ == "__main__":
    main()
