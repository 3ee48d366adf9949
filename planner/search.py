"""Optuna search: the fastest plan whose predicted card peak and host RAM fit the budgets.

Objective: predicted seconds of one pipeline call. Constraints (`trial.set_constraint`, feasible when <= 0):
card peak - VRAM budget, host RAM - RAM budget. The study is seeded with the classic plans so the first trials
already answer, then TPE explores. Storage: in memory, or any Optuna RDB URL to persist and share a study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass

import optuna

from cost_models import Estimate, HardwareSpec, estimate
from planner.profiler import Profile
from planner.space import PER_COMPONENT, SearchSpace, choice_params, suggest_choice
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD,
                              Choice, ComponentPlan)
from planner.units import format_size

logger = logging.getLogger(__name__)


class BudgetError(ValueError):
    """No plan in the space fits the budgets; carries the smallest achievable peak and its plan."""

    def __init__(self, message: str, min_card_bytes: int, min_host_bytes: int, min_choice: Choice):
        super().__init__(message)
        self.min_card_bytes, self.min_host_bytes, self.min_choice = min_card_bytes, min_host_bytes, min_choice


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


def _legal(choice: Choice, profile: Profile) -> bool:
    return all(p.num_blocks_per_group is None or p.num_blocks_per_group <= profile.components[n].max_blocks
               for n, p in choice.components.items())


def study_name(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace) -> str:
    """One study per model architecture x workload x GPU x budgets x space: shared storages reuse it."""
    key = json.dumps([{n: c.config_hash for n, c in profile.components.items()}, profile.workload.to_dict(),
                      hw.to_dict(), budgets.__dict__, space.__dict__], sort_keys=True, default=str)
    return f"memplan-{profile.pipeline_class}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _objective(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace):
    def objective(trial: optuna.Trial) -> float:
        choice = suggest_choice(trial, profile, space)
        est = estimate(profile, choice, hw)
        trial.set_constraint("vram", est.card_peak_bytes - budgets.vram_bytes)
        trial.set_constraint("host_ram", est.host_ram_bytes - budgets.ram_bytes)
        trial.set_user_attr("choice", choice.to_dict())
        trial.set_user_attr("estimate", est.to_dict())
        return est.total_s

    return objective


def _candidates(study: optuna.Study) -> list[Candidate]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "choice" in t.user_attrs:
            out.append(Candidate(Choice.from_dict(t.user_attrs["choice"]), Estimate.from_dict(t.user_attrs["estimate"])))
    return out


def _key(c: Candidate) -> tuple:
    return (c.estimate.card_peak_bytes, c.estimate.total_s, c.estimate.host_ram_bytes)


def pareto_front(cands: list[Candidate]) -> tuple[Candidate, ...]:
    """Non-dominated candidates in (card peak, seconds, host RAM), sorted by card peak; duplicates dropped."""
    unique = {json.dumps(c.choice.to_dict(), sort_keys=True): c for c in cands}.values()
    ordered = sorted(unique, key=_key)
    front: list[Candidate] = []
    for cand in ordered:
        if not any(all(a <= b for a, b in zip(_key(f), _key(cand))) for f in front):
            front.append(cand)
    return tuple(front)


def search(profile: Profile, hw: HardwareSpec, budgets: Budgets, *, space: SearchSpace = SearchSpace(),
           n_trials: int = 300, seed: int = 0, storage: str | optuna.storages.BaseStorage | None = None,
           study_name_override: str | None = None) -> SearchResult:
    """Run (or resume) the study and return the fastest feasible plan and the feasible Pareto front."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # `group` is experimental in Optuna 5; we accept that
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(40, n_trials), multivariate=True,
                                             group=True)
    name = study_name_override or study_name(profile, hw, budgets, space)
    study = optuna.create_study(storage=storage, sampler=sampler, study_name=name, load_if_exists=True)
    if not study.trials:
        for choice in classic_choices(profile, space):
            if _legal(choice, profile):
                study.enqueue_trial(choice_params(choice, profile, space), skip_if_exists=True)
    study.optimize(_objective(profile, hw, budgets, space), n_trials=n_trials)
    cands = _candidates(study)
    feasible = [c for c in cands if c.fits(budgets)]
    if not feasible:
        raise _budget_error(profile, hw, budgets, space, cands)
    best = min(feasible, key=lambda c: (c.estimate.total_s, c.estimate.card_peak_bytes))
    return SearchResult(best, pareto_front(feasible), len(study.trials))


def _budget_error(profile, hw, budgets, space, cands) -> BudgetError:
    lowest = min_memory_candidate(profile, hw, space, cands)
    host_lowest = min(cands + [lowest], key=lambda c: c.estimate.host_ram_bytes)
    msg = (f"no plan fits {format_size(budgets.vram_bytes)} of VRAM and {format_size(budgets.ram_bytes)} of host "
           f"RAM: the smallest achievable card peak is {format_size(lowest.estimate.card_peak_bytes)} "
           f"(host RAM {format_size(lowest.estimate.host_ram_bytes)}) with "
           f"{_describe(lowest.choice)}; the smallest host RAM is {format_size(host_lowest.estimate.host_ram_bytes)}. "
           "Raise the budget, lower the workload (size, frames, batch), or allow fp8 (allow_lossy=True)")
    return BudgetError(msg, lowest.estimate.card_peak_bytes, host_lowest.estimate.host_ram_bytes, lowest.choice)


def min_memory_candidate(profile: Profile, hw: HardwareSpec, space: SearchSpace,
                         cands: list[Candidate] = ()) -> Candidate:
    """The lowest-peak plan: per component, the option with the least in-call bytes, VAE tricks on."""
    from cost_models.memory import in_call_weight_bytes
    from planner.space import enumerate_component

    best = list(cands)
    for mode in space.modes():
        comps = {}
        for name, comp in profile.components.items():
            options = enumerate_component(name, comp, mode, space)
            comps[name] = min(options, key=lambda p, c=comp: (in_call_weight_bytes(c, p), p.use_stream))
        tiling = space.allow_lossy and any(c.supports_tiling for c in profile.components.values())
        slicing = any(c.supports_slicing for c in profile.components.values())
        choice = Choice(comps, tiling, slicing)
        best.append(Candidate(choice, estimate(profile, choice, hw)))
    return min(best, key=lambda c: (c.estimate.card_peak_bytes, c.estimate.total_s))


def _describe(choice: Choice) -> str:
    parts = []
    for name, p in choice.components.items():
        knob = p.strategy if p.strategy != GROUP_OFFLOAD else f"{p.offload_type}" + (
            f" n={p.num_blocks_per_group}" if p.num_blocks_per_group else "") + (" +stream" if p.use_stream else "")
        parts.append(f"{name}: {knob}" + (f" ({p.storage_dtype})" if p.fp8 else ""))
    return "; ".join(parts)
