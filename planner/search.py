"""Optuna search: the fastest plan whose predicted card peak and host RAM fit the budgets.

Objective: predicted seconds of one pipeline call. Constraints (`trial.set_constraint`, feasible when <= 0):
card peak - VRAM budget, host RAM - RAM budget. The study is seeded with the classic plans so the first trials
already answer, then TPE explores, then `polish` (a local search that changes up to three components at once)
refines the best trial of each pipeline mode; polished plans are stored as trials too. Storage: in memory, or any
Optuna RDB URL to persist and share a study; `record_measurement` adds measured runs to a stored study.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable

import optuna

from cost_models import Estimate, HardwareSpec, card_bytes, estimate
from cost_models.memory import PHASES, activation_bytes, host_terms, in_call_weight_bytes, resident_bytes
from cost_models.time import component_run_s
from planner.errors import ArgumentError, BudgetError  # noqa: F401  (BudgetError re-exported)
from planner.plan import describe_choice
from planner.profile_data import ComponentProfile, Profile
from planner.storage import open_storage
from planner.space import (PER_COMPONENT, SearchSpace, choice_trial_params, enumerate_component,
                           enumerate_vae, suggest_choice)
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD,
                              Choice, ComponentPlan)
from planner.units import format_size

logger = logging.getLogger(__name__)

# Trials per search (classic plans included) and how many are sampled at random before TPE models the rest.
# The polish that follows does the fine work, so TPE only has to land near the right plan: on the zoo, 20 trials
# already reach the exact optimum (benchmarks/search_quality.py); 48 leave room for larger spaces. TPE's cost per
# trial grows with the trials before it (300 trials: ~3 s of CPU), the polish's does not.
DEFAULT_N_TRIALS = 48
N_STARTUP_TRIALS = 16


@dataclass(frozen=True)
class Budgets:
    vram_bytes: int
    ram_bytes: int


@dataclass(frozen=True)
class Candidate:
    choice: Choice
    estimate: Estimate

    def fits(self, budgets: Budgets) -> bool:
        return (self.estimate.card_peak_bytes <= budgets.vram_bytes
                and self.estimate.host_ram_bytes <= budgets.ram_bytes)


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    pareto: tuple[Candidate, ...]  # feasible, non-dominated in (card peak, seconds, host RAM)
    n_trials: int
    # What holds the plan back: the budgets ("vram", "host_ram") that the faster priced plans exceed (empty when
    # no priced plan is faster than `best`), and the fastest of those plans.
    binding: tuple[str, ...] = ()
    blocked: Candidate | None = None


def binding_constraints(cands: list[Candidate], best: Candidate,
                        budgets: Budgets) -> tuple[tuple[str, ...], Candidate | None]:
    """Which budget binds: a budget binds when some priced plan faster than `best` exceeds it and fits the other
    (raising that budget alone would buy speed); when every faster plan exceeds both, both bind."""
    faster = [c for c in cands if c.estimate.total_s < best.estimate.total_s]
    if not faster:
        return (), None
    over_vram = {id(c) for c in faster if c.estimate.card_peak_bytes > budgets.vram_bytes}
    over_ram = {id(c) for c in faster if c.estimate.host_ram_bytes > budgets.ram_bytes}
    binding = tuple(name for name, only in (("vram", over_vram - over_ram), ("host_ram", over_ram - over_vram)) if only)
    return binding or ("vram", "host_ram"), min(faster, key=lambda c: c.estimate.total_s)


def _uniform(profile: Profile, plan: ComponentPlan, fallback: ComponentPlan | None = None) -> Choice:
    """The same plan for every component (block_level falls back where a component has no blocks)."""
    comps = {}
    for name, comp in profile.components.items():
        use = fallback if (plan.offload_type == BLOCK_LEVEL and not comp.has_blocks and fallback) else plan
        comps[name] = ComponentPlan(RESIDENT) if comp.calls_per_run == 0 and use.strategy == GROUP_OFFLOAD else use
    return Choice(comps)


def classic_choices(profile: Profile, space: SearchSpace) -> list[Choice]:
    """The plans people try first: all resident, model/sequential offload, leaf + streams, block n=1 / n=4."""
    leaf = ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL)
    plans = [(ComponentPlan(), None), (leaf, None)]
    plans += [(ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, n), leaf) for n in (1, 4)]
    if space.cuda:
        leaf_stream = ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL, use_stream=True)
        plans += [(ComponentPlan(MODEL_OFFLOAD), None), (ComponentPlan(SEQUENTIAL_OFFLOAD), None), (leaf_stream, None),
                  (ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1, use_stream=True), leaf_stream)]
    return [_uniform(profile, p, f) for p, f in plans]


def study_name(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace) -> str:
    """One study per model architecture x workload x GPU x budgets x space: shared storages reuse it."""
    key = json.dumps([{n: c.config_hash for n, c in profile.components.items()}, profile.workload.to_dict(),
                      hw.to_dict(), budgets.__dict__, space.__dict__], sort_keys=True, default=str)
    return f"memplan-{profile.pipeline_class}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _constraints(est: Estimate, budgets: Budgets) -> dict[str, float]:
    """Optuna constraints (feasible when <= 0): card peak over the VRAM budget, host RAM over the RAM budget."""
    return {"vram": float(est.card_peak_bytes - budgets.vram_bytes),
            "host_ram": float(est.host_ram_bytes - budgets.ram_bytes)}


def _objective(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace):
    def objective(trial: optuna.Trial) -> float:
        choice = suggest_choice(trial, profile, space)
        est = estimate(profile, choice, hw)
        for key, value in _constraints(est, budgets).items():
            trial.set_constraint(key, value)
        trial.set_user_attr("choice", choice.to_dict())
        trial.set_user_attr("estimate", est.to_dict())
        return est.total_s

    return objective


def _choice_key(choice: Choice) -> str:
    return json.dumps(choice.to_dict(), sort_keys=True)


def _candidates(study: optuna.Study) -> list[Candidate]:
    """Every priced trial (sampled, enqueued or polished); measured trials carry no estimate and are skipped."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "choice" in t.user_attrs and "estimate" in t.user_attrs:
            out.append(Candidate(Choice.from_dict(t.user_attrs["choice"]), Estimate.from_dict(t.user_attrs["estimate"])))
    return out


def _measured_failures(study: optuna.Study) -> set[str]:
    """Plans that failed (OOM or error) when measured: never recommended again from this study."""
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    return {_choice_key(Choice.from_dict(t.user_attrs["choice"])) for t in failed
            if t.user_attrs.get("measured") and "choice" in t.user_attrs}


def _key(c: Candidate) -> tuple:
    return (c.estimate.card_peak_bytes, c.estimate.total_s, c.estimate.host_ram_bytes)


def pareto_front(cands: list[Candidate]) -> tuple[Candidate, ...]:
    """Non-dominated candidates in (card peak, seconds, host RAM), sorted by card peak; duplicates dropped."""
    unique = {_choice_key(c.choice): c for c in cands}.values()
    ordered = sorted(unique, key=_key)
    front: list[Candidate] = []
    for cand in ordered:
        if not any(all(a <= b for a, b in zip(_key(f), _key(cand))) for f in front):
            front.append(cand)
    return tuple(front)


# ---------------------------------------------------------------- polish

# The polish changes up to this many components in one move: two catch one component giving back the memory
# another needs to get faster; three catch two small ones making room for a big one.
POLISH_MOVE_SIZE = 3


@dataclass(frozen=True)
class _Terms:
    """One option of one component as the cost model adds plans up (cost_models/memory.py, time.py):
    peak = sum resident + max over running components of excess (in-call bytes - resident bytes);
    host = sum held + max extra; seconds = sum seconds. Every total grows with every term, so an option
    no better in all five than another is never needed."""

    resident: int
    excess: int
    held: int
    extra: int
    seconds: float

    def dominates(self, other: "_Terms") -> bool:
        return all(a <= b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))


def _terms(comp: ComponentProfile, plan: ComponentPlan, flags: Choice, hw: HardwareSpec) -> _Terms:
    runs = PHASES.get(comp.role) is not None and comp.calls_per_run > 0
    resident = resident_bytes(comp, plan)
    excess = in_call_weight_bytes(comp, plan) + activation_bytes(comp, flags) - resident if runs else 0
    held, extra = host_terms(comp, plan)
    seconds = component_run_s(comp, plan, flags, hw) if PHASES.get(comp.role) is not None else 0.0
    return _Terms(resident, excess, held, extra, seconds)


def _prune(options: list[ComponentPlan], terms: list[_Terms]) -> list[tuple[ComponentPlan, _Terms]]:
    kept: list[tuple[ComponentPlan, _Terms]] = []
    for plan, t in zip(options, terms):
        if not any(k.dominates(t) for _, k in kept):
            kept = [(p, k) for p, k in kept if not t.dominates(k)] + [(plan, t)]
    return kept


def _scorer(hw: HardwareSpec, budgets: Budgets):
    """(relative budget excess, seconds, card peak) of a list of options' terms: lower is better."""
    def score(terms: list[_Terms]) -> tuple:
        card = card_bytes(sum(t.resident for t in terms) + max((t.excess for t in terms), default=0), hw)
        host = sum(t.held for t in terms) + max((t.extra for t in terms), default=0)
        return _excess(card, host, budgets), sum(t.seconds for t in terms), card
    return score


def polish(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace, start: Choice,
           move_size: int = POLISH_MOVE_SIZE) -> Choice:
    """Local search from `start` within its pipeline mode, for each VAE flag setting: take the best move that
    sets up to `move_size` components to any option `enumerate_component` offers, until no move helps.

    "Best" lowers (budget excess, seconds, card peak), so an infeasible start first walks into the budgets.
    Moves are priced by the cost model's per-component terms (`_Terms`), which makes thousands of them cost
    milliseconds, and options dominated in every term are dropped first (that loses nothing)."""
    return _polish(profile, hw, budgets, space, start, move_size)[1]


def _polish(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace, start: Choice,
            move_size: int) -> tuple[tuple, Choice]:
    mode, score = _mode(start), _scorer(hw, budgets)
    best: tuple | None = None
    options = {n: enumerate_component(n, c, mode, space) for n, c in profile.components.items()}
    for name, opts in options.items():
        if start.components[name] not in opts:
            opts.append(start.components[name])  # a start from another version of the space
    for tiling, slicing in enumerate_vae(profile, space):
        flags = Choice({}, tiling, slicing)
        axes = [_prune(opts, [_terms(profile.components[n], p, flags, hw) for p in opts])
                for n, opts in options.items()]
        current = [_start_index(axis, _terms(profile.components[n], start.components[n], flags, hw))
                   for n, axis in zip(profile.components, axes)]
        current, result = _local_search(axes, current, score, move_size)
        if best is None or result < best[0]:
            best = (result, Choice({n: axis[i][0] for n, axis, i in zip(profile.components, axes, current)},
                                   tiling, slicing))
    return best


def _start_index(axis: list[tuple[ComponentPlan, _Terms]], start: _Terms) -> int:
    """The start's option, or one that dominates it (pruning keeps one for every option it drops)."""
    return next(i for i, (_, t) in enumerate(axis) if t.dominates(start))


def _local_search(axes: list[list], current: list[int], score, move_size: int) -> tuple[list[int], tuple]:
    terms = lambda state: [axis[i][1] for axis, i in zip(axes, state)]  # noqa: E731
    best, size = score(terms(current)), 1
    while size <= move_size:
        found = None
        for idx in itertools.combinations(range(len(axes)), size):
            for values in itertools.product(*(range(len(axes[i])) for i in idx)):
                state = list(current)
                for i, v in zip(idx, values):
                    state[i] = v
                s = score(terms(state))
                if s < best:
                    found, best = state, s
        current, size = (found, 1) if found is not None else (current, size + 1)
    return current, best


def _polish_study(study: optuna.Study, profile: Profile, hw: HardwareSpec, budgets: Budgets,
                  space: SearchSpace) -> int:
    """Polish the best trial of each pipeline mode and store every new result as a trial; returns how many."""
    cands = _candidates(study)
    known = {_choice_key(c.choice) for c in cands}
    starts: dict[str, Candidate] = {}
    for c in cands:  # per mode: the least over budget, then the fastest, then the smallest
        if _mode(c.choice) not in starts or _rank(c, budgets) < _rank(starts[_mode(c.choice)], budgets):
            starts[_mode(c.choice)] = c
    added = 0
    for start in starts.values():
        (_, seconds, card), choice = _polish(profile, hw, budgets, space, start.choice, POLISH_MOVE_SIZE)
        if _choice_key(choice) in known:
            continue
        known.add(_choice_key(choice))
        est = estimate(profile, choice, hw)
        if est.card_peak_bytes != card or not math.isclose(est.total_s, seconds, rel_tol=1e-9):
            logger.warning("the polish's per-component terms disagree with estimate() (%s s, %s bytes vs %s s, "
                           "%s bytes): the cost model changed; update search._terms", seconds, card, est.total_s,
                           est.card_peak_bytes)
        _add_priced_trial(study, choice, est, budgets, profile, space)
        added += 1
    return added


def _rank(c: Candidate, budgets: Budgets) -> tuple:
    est = c.estimate
    return _excess(est.card_peak_bytes, est.host_ram_bytes, budgets), est.total_s, est.card_peak_bytes


def _excess(card_peak_bytes: int, host_bytes: int, budgets: Budgets) -> float:
    """How far over the budgets, relative to each (0 when the plan fits): the polish's first criterion."""
    return (max(0, card_peak_bytes - budgets.vram_bytes) / max(budgets.vram_bytes, 1)
            + max(0, host_bytes - budgets.ram_bytes) / max(budgets.ram_bytes, 1))


def _mode(choice: Choice) -> str:
    return choice.pipeline_strategy or PER_COMPONENT


def _add_priced_trial(study: optuna.Study, choice: Choice, est: Estimate, budgets: Budgets, profile: Profile,
                      space: SearchSpace, origin: str = "polish") -> None:
    params, distributions = choice_trial_params(choice, profile, space)
    study.add_trial(optuna.trial.create_trial(
        value=est.total_s, params=params, distributions=distributions, constraints=_constraints(est, budgets),
        user_attrs={"choice": choice.to_dict(), "estimate": est.to_dict(), "origin": origin}))


# ---------------------------------------------------------------- search

def _sampler(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # `group` is experimental in Optuna 5; we accept that
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(N_STARTUP_TRIALS, n_trials),
                                          multivariate=True, group=True)


def _open_study(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace, seed: int, n_trials: int,
                storage, name: str | None) -> optuna.Study:
    name = name or study_name(profile, hw, budgets, space)
    storage = open_storage(storage) if storage is not None else None  # raises an ArgumentError naming a bad URL
    study = optuna.create_study(storage=storage, sampler=_sampler(seed, n_trials), study_name=name,
                                load_if_exists=True)
    if not study.trials:
        study.set_user_attr("budgets", budgets.__dict__)  # record_measurement judges measured peaks against them
        _add_classics(study, profile, hw, budgets, space)
    return study


def _add_classics(study: optuna.Study, profile: Profile, hw: HardwareSpec, budgets: Budgets,
                  space: SearchSpace) -> None:
    """Price the classic plans and add them as finished trials, so TPE starts from them.

    Not `enqueue_trial`: on SQLite two workers can pop the same WAITING trial and the second `tell` fails
    ("Cannot tell a COMPLETE trial"); a finished trial added in one statement cannot race."""
    for choice in classic_choices(profile, space):
        try:
            _add_priced_trial(study, choice, estimate(profile, choice, hw), budgets, profile, space, "classic")
        except ValueError:  # a classic plan this pipeline or space cannot express (e.g. n=4 > its blocks)
            logger.debug("classic plan not in this space: %s", describe_choice(choice))


def search(profile: Profile, hw: HardwareSpec, budgets: Budgets, *, space: SearchSpace = SearchSpace(),
           n_trials: int | None = None, seed: int = 0, storage: str | optuna.storages.BaseStorage | None = None,
           study_name_override: str | None = None, show_progress_bar: bool = False,
           accept: Callable[[Choice], bool] | None = None) -> SearchResult:
    """Run (or resume) the study and return the fastest feasible plan and the feasible Pareto front.

    The study starts from the classic plans (added as priced trials), then TPE samples `n_trials` trials
    (None: DEFAULT_N_TRIALS), then the best trial of each pipeline mode is polished by local search (`polish`) and every
    polished plan is added to the study as a trial, so a shared storage keeps it. Plans recorded as failed by
    `record_measurement` are never returned, nor plans `accept` refuses.

    Example:
        >>> result = search(prof, get_gpu("rtx-4090"), Budgets(8 * 10**9, 64 * 10**9), storage="sqlite:///m.db")
        >>> result.best.choice, result.best.estimate.total_s

    Raises:
        BudgetError: no plan fits; it carries the smallest achievable card peak and host RAM.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_trials = DEFAULT_N_TRIALS if n_trials is None else n_trials
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ArgumentError(f"n_trials={n_trials!r} is not valid: give a positive int (or None for the default)")
    study = _open_study(profile, hw, budgets, space, seed, n_trials, storage, study_name_override)
    study.optimize(_objective(profile, hw, budgets, space), n_trials=n_trials, show_progress_bar=show_progress_bar)
    _polish_study(study, profile, hw, budgets, space)
    cands = _candidates(study)
    failed = _measured_failures(study)
    feasible = [c for c in cands if c.fits(budgets) and _choice_key(c.choice) not in failed
                and (accept is None or accept(c.choice))]
    if not feasible:
        raise _budget_error(profile, hw, budgets, space, cands)
    best = min(feasible, key=lambda c: (c.estimate.total_s, c.estimate.card_peak_bytes))
    binding, blocked = binding_constraints([c for c in cands if _choice_key(c.choice) not in failed], best, budgets)
    return SearchResult(best, pareto_front(feasible), len(study.trials), binding, blocked)


def record_measurement(storage: str | optuna.storages.BaseStorage, study_name: str, choice: Choice,
                       profile: Profile, space: SearchSpace, measured_s: float | None, failed: bool,
                       peak_bytes: int | None) -> optuna.trial.FrozenTrial:
    """Add a measured run of `choice` to a stored study, so later planning from that study sees it.

    A success is a COMPLETE trial whose value is the measured seconds (and, when `peak_bytes` is given, whose
    "vram" constraint is the measured card peak minus the study's VRAM budget); a failure (OOM, error) or a run
    without a time is a FAIL trial, and search() never returns that plan again. Both carry user_attrs
    `measured=True`, `choice`, `measured_s`, `peak_bytes`, `failed`.
    """
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    params, distributions = choice_trial_params(choice, profile, space)
    failed = failed or measured_s is None
    attrs = {"measured": True, "choice": choice.to_dict(), "measured_s": measured_s, "peak_bytes": peak_bytes,
             "failed": failed, "measurement_id": uuid.uuid4().hex}
    budgets = study.user_attrs.get("budgets")
    constraints = ({"vram": float(peak_bytes - budgets["vram_bytes"])}
                   if peak_bytes is not None and budgets and not failed else None)
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE,
        value=None if failed else float(measured_s), params=params, distributions=distributions,
        user_attrs=attrs, constraints=constraints)
    study.add_trial(trial)
    return next(t for t in reversed(study.get_trials(deepcopy=False))
                if t.user_attrs.get("measurement_id") == attrs["measurement_id"])


def _budget_error(profile, hw, budgets, space, cands) -> BudgetError:
    lowest = min_memory_candidate(profile, hw, space, cands)
    host_lowest = min(cands + [lowest], key=lambda c: c.estimate.host_ram_bytes)
    msg = (f"no plan fits {format_size(budgets.vram_bytes)} of VRAM and {format_size(budgets.ram_bytes)} of host "
           f"RAM: the smallest achievable card peak is {format_size(lowest.estimate.card_peak_bytes)} "
           f"(host RAM {format_size(lowest.estimate.host_ram_bytes)}) with {describe_choice(lowest.choice)}; "
           f"the smallest host RAM is {format_size(host_lowest.estimate.host_ram_bytes)}. "
           "Raise the budget or lower the workload (size, frames, batch)"
           + ("" if space.allow_lossy else ", or allow fp8 and VAE tiling (allow_lossy=True)"))
    return BudgetError(msg, lowest.estimate.card_peak_bytes, host_lowest.estimate.host_ram_bytes, lowest.choice)


def min_memory_candidate(profile: Profile, hw: HardwareSpec, space: SearchSpace,
                         cands: list[Candidate] = ()) -> Candidate:
    """The lowest-peak plan: per component, the option with the least in-call bytes, with each VAE setting."""
    best = list(cands)
    for mode in space.modes():
        comps = {}
        for name, comp in profile.components.items():
            options = enumerate_component(name, comp, mode, space)
            comps[name] = min(options, key=lambda p, c=comp: (in_call_weight_bytes(c, p), p.use_stream))
        for tiling, slicing in enumerate_vae(profile, space):
            choice = Choice(comps, tiling, slicing)
            best.append(Candidate(choice, estimate(profile, choice, hw)))
    return min(best, key=lambda c: (c.estimate.card_peak_bytes, c.estimate.total_s))

