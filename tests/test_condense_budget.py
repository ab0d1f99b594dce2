"""Condensation budgets (--budget, --iterations, --paper-schedule, the CPU default) and progress lines off a terminal."""

from __future__ import annotations

import io
import time

import pytest

from attar.condense import condense, load_synthetic
from attar.condense.schedule import CPU_BUDGET_S, parse_budget, plan_schedule
from attar.errors import AttarError
from attar.specs import ModelSpec
from attar.train.progress import StepProgress

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelSpec(arch="convnet", width=8, depth=2)


def test_parse_budget_units_and_errors():
    assert parse_budget("10m") == 600.0 and parse_budget("90s") == 90.0 and parse_budget("1h30m") == 5400.0
    assert parse_budget("2.5h") == 9000.0 and parse_budget("45") == 45.0 and parse_budget(12) == 12.0
    assert parse_budget(None) is None
    for bad in ("ten minutes", "10x", "0m", "-5", "", True):
        with pytest.raises(AttarError, match="budget must be a"):
            parse_budget(bad)


def test_plan_cpu_default_says_it_is_a_cpu_budget_and_paper_schedule_restores_the_count():
    cpu = plan_schedule(True, 20000, device_type="cpu")
    assert (cpu.iterations, cpu.budget_s, cpu.source) == (20000, CPU_BUDGET_S, "cpu default")
    text = cpu.describe()
    assert text.startswith("CPU budget: at most 5m of wall time") and "20000" in text and "--paper-schedule" in text
    paper = plan_schedule(True, 20000, paper_schedule=True, device_type="cpu")
    assert (paper.iterations, paper.budget_s, paper.source) == (20000, None, "paper")
    gpu = plan_schedule(True, 20000, device_type="cuda")  # a GPU runs the paper's schedule by default
    assert (gpu.iterations, gpu.budget_s) == (20000, None)
    both = plan_schedule(True, 20000, iterations=50, budget="2m")  # both bind
    assert (both.iterations, both.budget_s, both.source) == (50, 120.0, "iterations")
    only_budget = plan_schedule(True, 1000, budget="30s")
    assert (only_budget.iterations, only_budget.budget_s, only_budget.source) == (1000, 30.0, "budget")
    assert plan_schedule(False, 0, device_type="cpu").budget_s is None  # selection methods: no budget needed
    with pytest.raises(AttarError, match="give one of iterations"):
        plan_schedule(True, 20000, iterations=5, paper_schedule=True)


def _warm(tmp_path):
    """One tiny run first: the first optimizer import (torch dynamo) alone can take seconds on a busy machine,
    and the budget rightly counts it."""
    condense("digits", "dm", 1, tmp_path / "warm", 1, model=TINY, params={"batch_real": 4}, progress=False, device="cpu")


def test_a_budget_stops_a_run_within_it(tmp_path):
    _warm(tmp_path)
    budget = 3.0
    lines: list[str] = []
    t0 = time.perf_counter()
    out = condense("digits", "dm", 2, tmp_path / "dm", model=TINY, params={"batch_real": 8}, progress=False,
                   budget=budget, log=lines.append, device="cpu")
    took = time.perf_counter() - t0
    meta = load_synthetic(out).meta
    assert meta["stopped_by_budget"] and meta["schedule"] == "budget" and meta["budget_seconds"] == budget
    assert 1 < meta["iterations"] < 20000 and meta["iterations_planned"] == 20000
    # within the budget: the loop stops when the next iteration would not fit (the rest is loading and saving)
    assert meta["seconds"] <= budget + 0.5, meta["seconds"]
    assert took < budget + 10
    assert "wall-time budget 3s" in lines[0] and any("ETA" in s for s in lines), lines


def test_cpu_default_is_used_and_recorded_when_nothing_is_given(tmp_path, monkeypatch):
    import attar.condense.schedule as S

    monkeypatch.setattr(S, "CPU_BUDGET_S", 1.0)
    _warm(tmp_path)
    lines: list[str] = []
    out = condense("digits", "dm", 1, tmp_path / "dm", model=TINY, params={"batch_real": 4}, progress=False,
                   log=lines.append, device="cpu")
    meta = load_synthetic(out).meta
    assert meta["schedule"] == "cpu default" and meta["budget_seconds"] == 1.0 and meta["stopped_by_budget"]
    assert "CPU budget: at most 1s of wall time" in lines[0]
    # --iterations wins over the CPU default: exactly that many, no budget
    out = condense("digits", "dm", 1, tmp_path / "dm3", 3, model=TINY, params={"batch_real": 4}, progress=False,
                   log=lines.append, device="cpu")
    meta = load_synthetic(out).meta
    assert (meta["iterations"], meta["budget_seconds"], meta["stopped_by_budget"]) == (3, None, False)


def test_the_dc_loop_honours_the_budget(tmp_path):
    _warm(tmp_path)
    out = condense("digits", "dc", 1, tmp_path / "dc", model=TINY, progress=False, budget=1.5, device="cpu",
                   params={"batch_real": 4, "inner_loop": 1, "outer_loop": 2}, log=lambda s: None)
    meta = load_synthetic(out).meta
    assert meta["stopped_by_budget"] and meta["iterations"] >= 1 and meta["seconds"] <= 2.5


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_30s_or_5_percent_whichever_is_later():
    # 1000 steps at 1 per second: 30 s would give 33 lines; 5% (50 steps) is later, so one line per 50 s
    clock, out = Clock(), io.StringIO()
    with StepProgress("condense dm", 1000, stream=out, interval=30, clock=clock) as bar:
        for _ in range(1000):
            clock.t += 1.0
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 21, len(lines)  # at 50, 100, ..., 1000 steps, then the summary
    assert lines[0].startswith("condense dm: 50/1000 steps (5%)") and lines[-1].startswith("condense dm: done")
    # a short run of 100 steps at 1 per second: 5% is 5 s, so 30 s is later: lines at 30, 60, 90 s
    clock, out = Clock(), io.StringIO()
    with StepProgress("t", 100, stream=out, interval=30, clock=clock) as bar:
        for _ in range(100):
            clock.t += 1.0
            bar.update(1)
    assert len(out.getvalue().splitlines()) == 4


def test_a_wall_budget_drives_the_share_and_the_eta():
    clock, out = Clock(), io.StringIO()
    with StepProgress("condense", 20000, stream=out, interval=30, clock=clock, budget_s=300) as bar:
        for _ in range(60):  # 60 iterations at 1 s: 0.3% of the iterations, 20% of the budget
            clock.t += 1.0
            bar.update(1)
        assert bar.fraction(clock.t) == pytest.approx(0.2)
        assert bar.eta(clock.t) == pytest.approx(240.0)  # the budget ends it long before 20000 iterations
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("condense: 30/20000 steps") and "eta 4m30s" in lines[0]
