"""Distributed sweeps: N worker processes on N machines run one list of scenarios from one Optuna study.

Everything that makes it safe is Optuna's own (no queue of ours):
- The sweep is a study (named after its scenarios, or given). The process that creates it (`create_study`
  without `load_if_exists`: the database's unique study name picks exactly one creator) enqueues one WAITING
  trial per scenario (`enqueue_trial`, the scenario's name in `user_attrs`) and then publishes the scenario
  list as a study attribute; every other worker loads the study and waits for that list.
- A worker takes a scenario with `study.optimize(..., n_trials=1)`: Optuna pops a WAITING trial (an atomic
  WAITING -> RUNNING update: `FOR UPDATE` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite, see planner/storage.py),
  runs it with a heartbeat thread, and tells it COMPLETE with the row in its user attributes.
- A worker that dies stops its heartbeat; after `grace_period_s` the next worker to look fails the trial
  (`fail_stale_trials`, also run by `optimize` before each trial) and `RetryHeartbeatStaleTrialCallback` enqueues
  a copy, which a survivor runs. A scenario that kills its worker `max_retry + 1` times is given up and reported
  as a row with status "worker_died".
- A worker stops when no trial is WAITING and none is RUNNING; while others still run, it waits, so that a
  retry of a dead worker's scenario is picked up.

Accounting: each scenario has exactly one COMPLETE trial (its row), FAIL trials of dead workers, and possibly a
PRUNED one where a worker found the queue emptied under it (it ran nothing). A worker wrongly declared dead (no
heartbeat within the grace period while it was alive) cannot record its row: its trial is already finished, the
tell is refused, and the retry's row is the one kept. The trial's value is the seconds the worker spent on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from typing import Callable

import optuna
from optuna.trial import TrialState

from benchmarks.scenarios import Scenario
from planner.storage import open_storage

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 10  # a running scenario records a heartbeat this often ...
GRACE_PERIOD_S = 60  # ... and one silent this long belongs to a dead worker
MAX_RETRY = 2  # a scenario is retried after this many dead workers, then reported as "worker_died"
STUDY_READY_TIMEOUT_S = 120.0  # how long a worker waits for the creator to publish the scenario list
SCENARIOS_ATTR = "scenarios"
RunScenario = Callable[[Scenario], dict]


def sweep_name(scenarios: list[Scenario]) -> str:
    """The same scenario list always names the same sweep, so workers started alike join one study."""
    key = json.dumps([s.to_dict() for s in scenarios], sort_keys=True, default=str)
    return f"memplan-sweep-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def open_sweep(storage: str, scenarios: list[Scenario] | None, name: str | None = None, *,
               heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S, grace_period_s: int = GRACE_PERIOD_S,
               max_retry: int = MAX_RETRY) -> optuna.Study:
    """Create the sweep study (and enqueue its scenarios) or join it; without `scenarios`, join by `name`."""
    if not scenarios and not name:
        raise ValueError("a sweep needs scenarios to create it or a sweep name to join it")
    name = name or sweep_name(scenarios)
    store = open_storage(storage, heartbeat_interval_s=heartbeat_interval_s, grace_period_s=grace_period_s,
                         max_retry=max_retry)
    with warnings.catch_warnings():  # heartbeats and the retry callback are experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            if not scenarios:
                raise optuna.exceptions.DuplicatedStudyError  # join only
            study = optuna.create_study(storage=store, study_name=name)
        except optuna.exceptions.DuplicatedStudyError:
            study = _join(store, name, scenarios)
        else:
            _enqueue(study, scenarios)
    return study


def _enqueue(study: optuna.Study, scenarios: list[Scenario]) -> None:
    names = [s.name for s in scenarios]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"scenario names must be unique in a sweep: {duplicated} appear more than once")
    for s in scenarios:
        study.enqueue_trial({}, user_attrs={"scenario": s.name})
    study.set_user_attr(SCENARIOS_ATTR, [s.to_dict() for s in scenarios])  # last: the sweep is ready
    logger.info("sweep %s: created with %d scenarios", study.study_name, len(scenarios))


def _join(storage, name: str, scenarios: list[Scenario] | None) -> optuna.Study:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as err:
        raise ValueError(f"no sweep named {name!r} in the storage: start one with its scenarios first") from err
    deadline = time.monotonic() + STUDY_READY_TIMEOUT_S
    while SCENARIOS_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise ValueError(f"sweep {name!r} has no scenario list after {STUDY_READY_TIMEOUT_S:.0f} s: its creator "
                             f"died while enqueuing; delete it (optuna delete-study --study-name {name}) and restart")
        time.sleep(0.2)
    if scenarios is not None and study.user_attrs[SCENARIOS_ATTR] != [s.to_dict() for s in scenarios]:
        raise ValueError(f"sweep {name!r} in the storage holds other scenarios than the ones given: name the sweep "
                         "differently, or join it without scenarios")
    return study


def study_scenarios(study: optuna.Study) -> dict[str, Scenario]:
    return {d["name"]: Scenario.from_dict(d) for d in study.user_attrs[SCENARIOS_ATTR]}


def _objective(scenarios: dict[str, Scenario], run: RunScenario, worker: str):
    def objective(trial: optuna.Trial) -> float:
        name = trial.user_attrs.get("scenario")
        if name is None:  # the queue emptied between our look and Optuna's pop: a fresh trial, nothing to run
            raise optuna.TrialPruned("no scenario was waiting")
        # Optuna never fails a RUNNING trial that has no heartbeat yet, and its heartbeat thread may record the
        # first one after the measurement started: record it now, before anything can be lost.
        trial.storage.record_heartbeat(trial._trial_id)
        start = time.perf_counter()
        try:
            row = run(scenarios[name])
        except Exception as err:  # a row, never a lost scenario (run_scenario itself never raises)
            logger.warning("scenario %s raised %s: %s", name, type(err).__name__, err)
            row = {"scenario": name, "status": "error", "message": f"{type(err).__name__}: {err}"[:2000]}
        trial.set_user_attr("row", json.loads(json.dumps({**row, "worker": worker}, default=str)))
        return time.perf_counter() - start

    return objective


def work(study: optuna.Study, run: RunScenario, *, poll_s: float = 1.0,
         on_row: Callable[[dict], None] | None = None) -> int:
    """Take and run scenarios from the sweep until none waits and none runs; returns how many this worker ran."""
    scenarios, worker, done = study_scenarios(study), f"{socket.gethostname()}:{os.getpid()}", 0
    objective = _objective(scenarios, run, worker)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's scenario goes back to WAITING
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            done += _run_one(study, objective, on_row)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(poll_s)  # others are running: stay, in case one dies and its retry needs a worker
        else:
            return done


def _run_one(study: optuna.Study, objective, on_row) -> int:
    finished: list[optuna.trial.FrozenTrial] = []
    try:
        study.optimize(objective, n_trials=1, callbacks=[lambda _study, trial: finished.append(trial)])
    except optuna.exceptions.UpdateFinishedTrialError:
        logger.warning("this worker was declared dead (no heartbeat within the grace period): its result is "
                       "dropped and the retry's row is kept")
        return 0
    if not finished or finished[0].state != TrialState.COMPLETE:
        return 0
    if on_row:
        on_row(finished[0].user_attrs["row"])
    return 1


def sweep_rows(study: optuna.Study) -> list[dict]:
    """One row per scenario, in the sweep's order: its COMPLETE trial's row, or a "worker_died" / "pending" row."""
    by_name: dict[str, dict] = {}
    died: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get("scenario")
        if t.state == TrialState.COMPLETE and "row" in t.user_attrs:
            by_name.setdefault(name, t.user_attrs["row"])
        elif t.state == TrialState.FAIL:
            died[name] = died.get(name, 0) + 1
    rows = []
    for name in study_scenarios(study):
        if name in by_name:
            rows.append(by_name[name])
        else:
            status = "worker_died" if died.get(name) else "pending"
            rows.append({"scenario": name, "status": status,
                         "message": f"{died.get(name, 0)} worker(s) died running it" if died.get(name) else ""})
    return rows


def run_sweep(scenarios: list[Scenario] | None, storage: str, *, name: str | None = None,
              run: RunScenario | None = None, poll_s: float = 1.0, heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S,
              grace_period_s: int = GRACE_PERIOD_S, max_retry: int = MAX_RETRY,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Join (or create) the sweep in `storage`, work until it is done, and return every scenario's row.

    Start the same command on as many machines as you like, all with the same `storage` URL (PostgreSQL across
    machines, SQLite for the processes of one machine): each scenario is run by exactly one of them."""
    if run is None:
        from benchmarks.runner import PipelineCache, run_scenario

        cache = PipelineCache()
        run = lambda s: run_scenario(s, cache)  # noqa: E731
    study = open_sweep(storage, scenarios, name, heartbeat_interval_s=heartbeat_interval_s,
                       grace_period_s=grace_period_s, max_retry=max_retry)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ran = work(study, run, poll_s=poll_s, on_row=on_row)
    logger.info("sweep %s: this worker ran %d scenarios", study.study_name, ran)
    return sweep_rows(study)
