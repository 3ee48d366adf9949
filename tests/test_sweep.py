"""Distributed sweeps (benchmarks/sweep.py): worker processes on one storage run every scenario exactly once.

Each storage variant runs on SQLite (a file in tmp_path) and, when MEMPLAN_TEST_POSTGRES_URL names a server
(`.ci/run` starts a throw-away one), on PostgreSQL. Workers are real processes running a fake measurement
(a sleep) that logs "start <scenario> <pid>" and "end <scenario> <pid>": the log tells what really ran.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from benchmarks.scenarios import Scenario
from benchmarks.sweep import open_sweep, run_sweep, sweep_name, sweep_rows

POSTGRES_ENV = "MEMPLAN_TEST_POSTGRES_URL"
ROOT = Path(__file__).resolve().parents[1]
SCENARIO_S = 0.6  # seconds each fake measurement sleeps

WORKER = """
import os, sys, time
from benchmarks.sweep import run_sweep
url, name, log, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
def fake_measure(scenario):
    with open(log, "a") as f:
        f.write(f"start {scenario.name} {os.getpid()}\\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"end {scenario.name} {os.getpid()}\\n")
    return {"scenario": scenario.name, "status": "ok", "meas_total_s": seconds}
run_sweep(None, url, name=name, run=fake_measure, poll_s=0.2, heartbeat_interval_s=1, grace_period_s=2)
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sweep.db'}"
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a PostgreSQL and sets it)")
    return url


def scenarios(n: int) -> list[Scenario]:
    return [Scenario(f"s{i}", "tiny-flux") for i in range(n)]


def start_sweep(url: str, n: int) -> str:
    """Create the sweep here (so the workers only join it) under a name no other test uses."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    open_sweep(url, scenarios(n), name, heartbeat_interval_s=1, grace_period_s=2)
    return name


@pytest.fixture
def start_workers():
    """Starts k worker processes; any still alive when the test ends (a failed test) is killed."""
    started: list[subprocess.Popen] = []

    def start(url: str, name: str, log: Path, k: int) -> list[subprocess.Popen]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(log), str(SCENARIO_S)], env=env,
                                  cwd=ROOT) for _ in range(k)]
        started.extend(procs)
        return procs

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def log_lines(log: Path) -> list[tuple[str, str, int]]:
    if not log.exists():
        return []
    return [(kind, name, int(pid)) for kind, name, pid in (line.split() for line in log.read_text().splitlines())]


def finished_once(url: str, name: str) -> collections.Counter:
    study = optuna.load_study(study_name=name, storage=url)
    return collections.Counter(t.user_attrs["scenario"] for t in study.trials if t.state.name == "COMPLETE")


def test_three_workers_run_every_scenario_exactly_once(storage_url, tmp_path, start_workers):
    name, log = start_sweep(storage_url, 9), tmp_path / "log"
    workers = start_workers(storage_url, name, log, 3)
    assert [w.wait(timeout=60) for w in workers] == [0, 0, 0]
    ends = collections.Counter(n for kind, n, _ in log_lines(log) if kind == "end")
    assert ends == collections.Counter(f"s{i}" for i in range(9))  # each measured once, none lost
    assert finished_once(storage_url, name) == ends
    assert len({pid for _, _, pid in log_lines(log)}) > 1  # the work was shared, not done by one worker


def test_a_killed_worker_loses_and_duplicates_nothing(storage_url, tmp_path, start_workers):
    name, log = start_sweep(storage_url, 6), tmp_path / "log"
    workers = start_workers(storage_url, name, log, 3)
    deadline = time.monotonic() + 30
    while not log_lines(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    _, victim_scenario, victim_pid = log_lines(log)[0]
    os.kill(victim_pid, signal.SIGKILL)  # mid-scenario: it started and sleeps SCENARIO_S before its "end"
    victim = next(w for w in workers if w.pid == victim_pid)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    survivors = [w for w in workers if w is not victim]
    assert [w.wait(timeout=60) for w in survivors] == [0, 0]

    lines = log_lines(log)
    ends = collections.Counter(n for kind, n, _ in lines if kind == "end")
    assert ends == collections.Counter(f"s{i}" for i in range(6))
    assert all(pid != victim_pid for kind, _, pid in lines if kind == "end")
    assert [n for kind, n, pid in lines if kind == "start" and pid != victim_pid].count(victim_scenario) == 1
    assert finished_once(storage_url, name) == ends
    study = optuna.load_study(study_name=name, storage=storage_url)
    (stale,) = [t for t in study.trials if t.state.name == "FAIL"]  # the victim's, failed by a survivor
    assert stale.user_attrs["scenario"] == victim_scenario
    rows = sweep_rows(study)
    assert [r["scenario"] for r in rows] == [f"s{i}" for i in range(6)] and {r["status"] for r in rows} == {"ok"}


def test_in_process_sweep_returns_rows_in_order_and_resumes(tmp_path):
    url, ran = f"sqlite:///{tmp_path / 'one.db'}", []

    def fake(s: Scenario) -> dict:
        ran.append(s.name)
        return {"scenario": s.name, "status": "ok"}

    rows = run_sweep(scenarios(3), url, run=fake)
    assert [r["scenario"] for r in rows] == ["s0", "s1", "s2"] and sorted(ran) == ["s0", "s1", "s2"]
    again = run_sweep(scenarios(3), url, run=fake)  # same scenarios: the same, finished sweep
    assert again == rows and len(ran) == 3
    assert optuna.load_study(study_name=sweep_name(scenarios(3)), storage=url).user_attrs["scenarios"]


def test_a_raising_measurement_is_a_row_not_a_lost_scenario(tmp_path):
    def broken(s: Scenario) -> dict:
        raise RuntimeError("boom")

    (row,) = run_sweep(scenarios(1), f"sqlite:///{tmp_path / 'e.db'}", run=broken)
    assert row["status"] == "error" and "RuntimeError: boom" in row["message"]


def test_joining_with_other_scenarios_or_an_unknown_sweep_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'j.db'}"
    open_sweep(url, scenarios(2), "mine")
    with pytest.raises(ValueError, match="holds other scenarios"):
        open_sweep(url, scenarios(3), "mine")
    with pytest.raises(ValueError, match="no sweep named 'other'"):
        open_sweep(url, None, "other")
    with pytest.raises(ValueError, match="must be unique"):
        open_sweep(url, [Scenario("a", "tiny-flux"), Scenario("a", "tiny-sdxl")], "dup")


def test_bench_cli_with_storage_runs_the_sweep_and_writes_every_row(tmp_path):
    from benchmarks.scenarios import TINY_FLUX_WORK, save_scenarios
    from planner.cli import main

    spec, out, url = tmp_path / "s.json", tmp_path / "rows.jsonl", f"sqlite:///{tmp_path / 'b.db'}"
    save_scenarios([Scenario("flux-block1", "tiny-flux", plan="group_block_1", workload=TINY_FLUX_WORK,
                             measured_steps=1)], spec)
    assert main(["bench", str(spec), "--storage", url, "--sweep", "cli", "-o", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["scenario"] == "flux-block1" and row["status"] == "ok", row.get("message")
    assert finished_once(url, "cli") == {"flux-block1": 1}
    assert main(["bench", str(spec), "--sweep", "cli"]) == 2  # a sweep name without a storage is refused
