"""``d2z``: look at a schedule and its dual coefficients before spending a training budget.

    d2z plot --preset fig2 -o fig2.png          # LR curves and dual coefficients, side by side
    d2z plot linear-d2z cosine-10x --steps 20000 --lr 3e-3 --wd 0.1 -o mine.svg
    d2z table wsd --steps 1000 --param cooldown=0.2 > wsd.csv
    d2z describe linear-d2z linear-10x constant --steps 11752 --lr 1.6e-2 --wd 0.1 --rho 0.125

Also ``python -m d2z_optim ...``. Plotting needs matplotlib (``pip install 'd2z_optim[plot]'``).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

from . import dual, schedules
from .schedules import Schedule

# The paper's figures (Bergsma et al., 2025): peak LR 1.6e-2, lambda 0.1, 10% warmup.
# Figure 2's step decay drops 10x at 50% and 75% of training (the figure shows the
# shape, not the milestones: ours is the usual choice, labelled as such).


@dataclass
class Preset:
    title: str
    steps: int
    rho: float
    curves: list[tuple[str, str, dict]] = field(default_factory=list)  # label, name, params
    lr: float = 1.6e-2
    wd: float = 0.1


PRESETS = {
    "fig2": Preset(
        "Figure 2: 111M, 200 TPP (t = 55680, rho = 1/3)",
        55680,
        1 / 3,
        [
            ("Linear", "linear-d2z", {}),
            ("Cosine", "cosine-d2z", {}),
            ("Step (x0.1 at 50%, 75%)", "step", {"milestones": (0.5, 0.75), "gamma": 0.1}),
        ],
    ),
    "fig26": Preset(
        "Figure 26: 617M, 20 TPP (t = 11752, rho = 1/8)",
        11752,
        1 / 8,
        [
            ("Constant", "constant", {}),
            ("InvSqrt", "invsqrt", {}),
            ("Cosine-10x", "cosine-10x", {}),
            ("Linear-D2Z", "linear-d2z", {}),
            ("Rational", "rational", {}),
        ],
    ),
    "fig27": Preset(
        "Figure 27: 617M, 80 TPP (t = 47008, rho = 1/8)",
        47008,
        1 / 8,
        [
            ("Linear-D2Z", "linear-d2z", {}),
            ("Linear-10x", "linear-10x", {}),
            ("WSD (22.5% cooldown)", "wsd", {"cooldown": 0.225}),
            ("Cyclic", "cyclic", {}),
        ],
    ),
}


class CliError(Exception):
    pass


MAX_STEPS = 10_000_000  # a run's optimizer steps: the paper's longest has ~47k; tables of 8 B per step
DPI_RANGE = (10, 1200)
MAX_PIXELS = 20_000  # per side


class _Parser(argparse.ArgumentParser):
    """argparse's errors on one line (``d2z <command>: error: ...``), exit status 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word, e.g. shape=1-sqrt
    return key.strip(), value


def _positive_int(text: str, most: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {v}")
    if most is not None and v > most:
        raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {v:,}")
    return v


def _steps(text: str) -> int:
    return _positive_int(text, MAX_STEPS)


def _pixels(text: str) -> int:
    return _positive_int(text, MAX_PIXELS)


def _dpi(text: str) -> int:
    v = _positive_int(text)
    if not DPI_RANGE[0] <= v <= DPI_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be between {DPI_RANGE[0]} and {DPI_RANGE[1]}, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return v


def _warmup(text: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int number of steps or a fraction, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 steps or a fraction in [0, 1], got {text}")
    return int(v) if v.is_integer() and "." not in text else v


def _output(path: str, plt) -> str:
    """A file we can write, in a format matplotlib knows: checked before anything is computed."""
    if not path.strip():
        raise CliError("-o/--output is empty: give a file name such as d2z.png or d2z.svg")
    if os.path.isdir(path):
        raise CliError(f"-o/--output {path!r} is a directory: give a file name such as {os.path.join(path, 'd2z.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"-o/--output {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CliError(f"-o/--output {path!r}: not writable")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if ext not in formats:
        raise CliError(f"-o/--output {path!r}: the extension must name an image format ({', '.join(sorted(formats))})")
    return ext


def _build(name: str, steps: int, warmup, lr: float, wd: float, rho: float, params: dict) -> Schedule:
    if name == "rational":  # Eq. 7 decays at rate eta * lambda of the actual (muP-scaled) peak
        params = {"peak_lr": rho * lr, "weight_decay": wd, **params}
    return schedules.get(name, steps, warmup=warmup, **params)


def _curves(args) -> tuple[str, int, float, float, float, list[tuple[str, Schedule]]]:
    """(title, steps, lr, wd, rho, [(label, schedule)]) from a preset or the command line."""
    if args.preset:
        p = PRESETS[args.preset]
        if args.names:
            raise CliError("give either --preset or schedule names, not both")
        built = [(label, _build(n, p.steps, 0.1, p.lr, p.wd, p.rho, prm)) for label, n, prm in p.curves]
        return p.title, p.steps, p.lr, p.wd, p.rho, built
    if not args.names:
        raise CliError("name at least one schedule (see `d2z table --list`) or a --preset")
    if args.steps is None:
        raise CliError("--steps is required (the number of optimizer steps of the run)")
    params = dict(args.param or [])
    built = [(n, _build(n, args.steps, args.warmup, args.lr, args.wd, args.rho, params)) for n in args.names]
    title = f"t = {args.steps}, peak LR {args.lr:g}, lambda {args.wd:g}, rho {args.rho:g}"
    return title, args.steps, args.lr, args.wd, args.rho, built


def cmd_table(args) -> None:
    if args.list:
        print("\n".join(schedules.names()))
        return
    if not args.names or len(args.names) != 1:
        raise CliError("`d2z table` takes exactly one schedule name")
    if args.steps is None:
        raise CliError("--steps is required (the number of optimizer steps of the run)")
    s = _build(args.names[0], args.steps, args.warmup, args.lr, args.wd, args.rho, dict(args.param or []))
    out = sys.stdout
    out.write("step,multiplier\n")
    for i, m in enumerate(s.multipliers().tolist()):
        out.write(f"{i},{m!r}\n")


def cmd_describe(args) -> None:
    title, _, lr, wd, rho, curves = _curves(args)
    rows = [(label, dual.summary(s, lr, wd, rho=rho)) for label, s in curves]  # errors before output
    print(f"{title}\n")
    print("| schedule | initial weights c_t0 | effective updates | last 10% share | timescale at peak | at end |")
    print("|---|---|---|---|---|---|")
    for label, d in rows:
        end = "inf" if math.isinf(d.timescale_end) else f"{d.timescale_end:,.0f}"
        print(
            f"| {label} | {d.initial_weight:.4g} | {d.effective_updates:,.0f} | {d.last10_share:.2%} "
            f"| {d.timescale_peak:,.0f} | {end} |"
        )


def cmd_plot(args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("plotting needs matplotlib: pip install 'd2z_optim[plot]' (or pip install matplotlib)") from None
    fmt = _output(args.output, plt)
    title, steps, lr, wd, rho, curves = _curves(args)
    coefficients = [(label, s, dual.coefficients(s, lr, wd, rho=rho)[1]) for label, s in curves]  # errors first
    fig, (ax_lr, ax_c) = plt.subplots(1, 2, figsize=(args.width / args.dpi, args.height / args.dpi), dpi=args.dpi)
    for label, s, c in coefficients:
        i = range(1, steps + 1)
        ax_lr.plot(i, (s.multipliers() * (rho * lr)).tolist(), label=label)
        ax_c.plot(i, c.tolist(), label=label)
    ax_lr.set(xlabel="step", ylabel="learning rate (rho x peak x multiplier)", title="LR schedule")
    ax_c.set(xlabel="update i", ylabel="c_{t,i}", yscale="log", title=f"dual coefficients at t = {steps}")
    ax_c.set_ylim(bottom=max(1e-12, ax_c.get_ylim()[0]))
    for ax in (ax_lr, ax_c):
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    # into a temporary file beside the output (a symlink's target), renamed when complete: a
    # failure writes nothing; the file gets the mode a plain open() would (the umask's)
    target = os.path.realpath(args.output)
    fd, tmp = tempfile.mkstemp(prefix=".d2z-", suffix=f".{fmt}", dir=os.path.dirname(target))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=args.dpi, format=fmt)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {args.output}")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="d2z", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("names", nargs="*", help="schedule names (d2z table --list)")
        p.add_argument("--steps", type=_steps, help=f"total optimizer steps T (at most {MAX_STEPS:,})")
        p.add_argument("--warmup", type=_warmup, default=0.1, help="warmup steps (int) or fraction (default 0.1)")
        p.add_argument("--lr", type=_nonneg_float, default=1.6e-2, help="peak learning rate (default 1.6e-2)")
        p.add_argument("--wd", type=_nonneg_float, default=0.1, help="weight decay lambda (default 0.1)")
        p.add_argument("--rho", type=_nonneg_float, default=1.0, help="muP width factor of the LR (default 1)")
        p.add_argument("--param", type=_param, action="append", help="schedule parameter key=value (repeatable)")

    p = sub.add_parser("plot", help="LR curves and their dual coefficients, side by side (PNG or SVG)")
    common(p)
    p.add_argument("--preset", choices=sorted(PRESETS), help="reproduce one of the paper's figures")
    p.add_argument("-o", "--output", default="d2z.png", help="output file; the extension picks PNG or SVG")
    p.add_argument("--width", type=_pixels, default=1200, help="pixels (default 1200)")
    p.add_argument("--height", type=_pixels, default=450, help="pixels (default 450)")
    p.add_argument("--dpi", type=_dpi, default=100, help=f"dots per inch, {DPI_RANGE[0]}-{DPI_RANGE[1]} (default 100)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("table", help="a schedule's multiplier table as CSV")
    common(p)
    p.add_argument("--list", action="store_true", help="list the schedule names")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("describe", help="the dual's summary numbers as a table")
    common(p)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.set_defaults(func=cmd_describe)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, ValueError, OSError, MemoryError) as e:  # what a bad argument can cause: one line
        print(f"d2z {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
