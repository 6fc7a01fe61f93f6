"""The TPP sweep's machinery: the corpus split, determinism, and a smoke run per schedule."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tpp_sweep

TINY = tpp_sweep.ModelCfg(d_model=16, n_layer=1, n_head=2, ctx=16, batch=4)


def test_corpus_split_is_stable_and_disjoint():
    train, val = tpp_sweep.corpus_files()
    again = tpp_sweep.corpus_files()
    assert (train, val) == again  # deterministic order and split
    assert not set(train) & set(val)
    assert len(val) > 20 and len(train) > 5 * len(val)  # about 10% of files held out
    assert all("site-packages" not in p.parts for p in train + val)
    assert tpp_sweep.tokens("val").numel() > 100_000


@pytest.mark.parametrize("schedule", tpp_sweep.SCHEDULES)
def test_smoke_run_per_schedule(schedule):
    r = tpp_sweep.run_one(TINY, schedule, 1e-2, 0.5, 0, val_budget=2048, max_steps=12)
    assert r["steps"] == 12 and 0 < r["val_loss"] < 6.0  # below log(256) = 5.55 + slack


def test_same_seed_same_loss_and_another_seed_differs():
    a = tpp_sweep.run_one(TINY, "linear-d2z", 1e-2, 0.5, 3, val_budget=2048, max_steps=15)
    b = tpp_sweep.run_one(TINY, "linear-d2z", 1e-2, 0.5, 3, val_budget=2048, max_steps=15)
    c = tpp_sweep.run_one(TINY, "linear-d2z", 1e-2, 0.5, 4, val_budget=2048, max_steps=15)
    assert a["val_loss"] == b["val_loss"] and a["train_loss"] == b["train_loss"]
    assert c["val_loss"] != a["val_loss"]


def test_sweep_resumes_from_its_csv_and_reports(tmp_path, monkeypatch):
    calls = []
    real = tpp_sweep.run_one

    def counted(*a, **k):
        calls.append(a)
        # what is tested is which runs the sweep makes and keeps, not their losses: 2,048 validation
        # tokens (the smoke tests' budget, not the default 65,536) and 2 steps each halve this test
        return real(*a, **{"val_budget": 2048, **k})

    monkeypatch.setattr(tpp_sweep, "run_one", counted)
    monkeypatch.setattr(tpp_sweep, "ModelCfg", lambda **kw: TINY)
    argv = ["--quick", "--max-steps", "2", "--out", str(tmp_path)]
    tpp_sweep.main(argv)
    first = len(calls)
    assert first == 2 * 5 * 3 + 2 * 3  # schedules x LRs x TPPs, then a second seed at each best LR
    tpp_sweep.main(argv)  # everything is in the CSV: nothing runs again
    assert len(calls) == first
    report = (tmp_path / f"report-{TINY.name}.md").read_text()
    assert "## Findings at this scale" in report and "| peak LR |" in report


@pytest.mark.parametrize("precision", list(tpp_sweep.PRECISIONS))
def test_every_precision_mode_trains_and_stores_as_it_says(precision):
    r = tpp_sweep.run_one(TINY, "linear-d2z", 1e-2, 0.5, 0, val_budget=2048, max_steps=8, precision=precision)
    assert r["steps"] == 8 and 0 < r["val_loss"] < 6.0


def test_precision_sweep_runs_resumes_and_reports(tmp_path, monkeypatch):
    import precision_sweep

    monkeypatch.setattr(precision_sweep.tpp_sweep, "ModelCfg", lambda **kw: TINY)
    monkeypatch.setattr(precision_sweep, "TPPS", [20.0])  # one TPP and schedule: the machinery, not the grid
    monkeypatch.setattr(precision_sweep, "SCHEDULES", ["linear-d2z"])
    calls = []
    real = tpp_sweep.run_one
    monkeypatch.setattr(tpp_sweep, "run_one", lambda *a, **kw: calls.append(a) or real(*a, **kw, val_budget=1024))
    precision_sweep.main(["--max-steps", "3", "--out", str(tmp_path)])
    assert len(calls) == 2 * 2 * len(tpp_sweep.PRECISIONS)  # two LRs, two seeds
    precision_sweep.main(["--max-steps", "3", "--out", str(tmp_path)])  # everything is in the CSV already
    assert len(calls) == 2 * 2 * len(tpp_sweep.PRECISIONS)  # two LRs, two seeds
    report = next(tmp_path.glob("report-*.md")).read_text()
    assert "bf16 stochastic rounding" in report and "| bf16 + remainders |" in report and "Not run" not in report
