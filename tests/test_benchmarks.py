"""The benchmark scripts behind `make bench` still run: every competitor steps, the table fields
hold, the baseline's paired ratio is 1 (small workloads, a few steps; timings are not judged)."""

import runpy
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_throughput  # noqa: E402


def test_every_cpu_competitor_steps_and_the_table_fields_hold():
    cpu = torch.device("cpu")
    comps, skipped = bench_throughput.competitors(cpu, with_compile=False)
    assert bench_throughput.BASELINE in comps and "d2z cpu" in comps
    assert all(isinstance(why, str) and why for why in skipped.values())
    extra: dict[str, str] = {}
    pairs = {"schedule": ("d2z cpu", bench_throughput.SCHEDULE_ROW), "same": ("d2z cpu", "d2z cpu")}
    costs: list = []
    shapes = [(33, 7), (5,), (0,)]
    rounds: dict = {}
    rows = bench_throughput.bench_workload("tiny", shapes, torch.float32, cpu, comps, 3, 1, extra, pairs, costs, rounds)
    assert not extra, extra  # no competitor failed on the workload
    assert [c[:3] for c in costs] == [("tiny", "float32", "schedule"), ("tiny", "float32", "same")]
    assert costs[1][3] == 0.0  # a row paired with itself costs nothing
    assert bench_throughput.PAIR_ROUNDS[0] <= rounds["tiny", "torch.float32"] <= bench_throughput.PAIR_ROUNDS[1]
    assert {r["competitor"] for r in rows} == set(comps) | {bench_throughput.STREAM_ROW}
    roofline = next(r for r in rows if r["competitor"] == bench_throughput.STREAM_ROW)
    assert roofline["frac_of_stream"] == 1.0
    base = next(r for r in rows if r["competitor"] == bench_throughput.BASELINE)
    assert base["speedup_vs_torch_fused"] == 1.0
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        if r["competitor"].startswith("d2z"):
            assert r["host_syncs"] == 0, r  # the point of the design
    assert base["host_syncs"] >= 1  # LambdaLR writes the LR from the host each step


def test_numerics_script_runs_and_writes_its_table(tmp_path, monkeypatch, capsys):
    """The script as ``python benchmarks/bench_numerics.py`` runs it (its ``__main__`` block, its own
    argv), in this process: a child's interpreter and torch start-up were most of this test's
    time. The host-overhead script below is run as a process."""
    script = ROOT / "benchmarks" / "bench_numerics.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "3", "--out", str(tmp_path), "--no-plot"])
    runpy.run_path(str(script), run_name="__main__")
    assert "| float32 | d2z cpu |" in capsys.readouterr().out
    tables = list(tmp_path.rglob("numerics-*.md"))
    assert len(tables) == 1 and "| float32 | d2z cpu |" in tables[0].read_text()


def test_host_overhead_script_runs_every_row_and_writes_its_table(tmp_path):
    """Tiny counts: the stubbed cuda/triton holders, the cpu one and the peers each give a figure."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_host_overhead.py"), "--counts", "5", "148"]
        + ["--reps", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (table,) = tmp_path.rglob("host-overhead-*.md")
    text = table.read_text()
    for row in ("| d2z cpu | 148 |", "| d2z cuda (launch stubbed) | 148 |", "| torch _fused_adamw_"):
        assert row in text, text
    assert "<= 0.3 ms:" in text  # the target printed beside the figure


def test_gpu_check_script_parses_its_arguments():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stdout + proc.stderr


def test_slow_rows_are_timed_in_the_first_rounds_only(monkeypatch):
    """Which rows are slow comes from their warm-up times: faked here (each step returns its
    time), so the test does not depend on this machine's timings."""

    def timed(step, device):
        t = step()
        return t if isinstance(t, float) else 1.0  # the roofline row's add_: as fast as the baseline

    monkeypatch.setattr(bench_throughput, "timed", timed)
    cpu = torch.device("cpu")
    comps = {
        bench_throughput.BASELINE: lambda p: lambda: 1.0,
        "slow": lambda p: lambda: 5.0,  # over SLOW_FACTOR (3) x the baseline
        "fast": lambda p: lambda: 2.5,
    }
    bench = bench_throughput.bench_workload
    rows = bench("tiny", [(4,)], torch.float32, cpu, comps, 6, 1, {}, {}, [], {}, slow_rounds=2)
    by = {r["competitor"]: r for r in rows}
    assert by["slow"]["rounds"] == 2 and by["fast"]["rounds"] == 6 and by[bench_throughput.BASELINE]["rounds"] == 6
    assert by["slow"]["speedup_vs_torch_fused"] == 0.2  # paired over the two rounds it ran in
    rows = bench("tiny", [(4,)], torch.float32, cpu, comps, 3, 1, {}, {}, [], {})
    assert all(r["rounds"] == 3 for r in rows)  # slow_rounds=0 (--full): every row, every round


def test_rounding_script_times_both_roundings_and_writes_its_table(tmp_path, capsys):
    import bench_rounding

    bench_rounding.main(["--quick", "--rounds", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 1 x 64K | stochastic rounding | 6 | 14 |" in out and "| 100 x 1K | round to nearest even |" in out
    assert "| 1 x 64K | bf16 + remainders | 12 | 26 |" in out and "| 100 x 1K | fp32 parameters | 12 | 28 |" in out
    assert "| 1 x 64K | bf16 + remainders + bf16 moments | 8 | 18 |" in out
    (table,) = tmp_path.glob("*/rounding-*.md")
    text = table.read_text()
    assert "stochastic rounding / round to nearest even" in text and "bf16 + remainders / fp32 parameters" in text
