"""Runtime OOM guard: a pipeline call that runs out of device memory under a plan is re-planned and retried once.

Opt-in: `optimize(pipe, ..., oom_guard=True)`, or `with planner.guard(pipe):` around calls of a pipeline a plan
was applied to. On a `torch.OutOfMemoryError` inside a guarded call:

1. the shortfall is measured: what the call needed when it failed (the allocator's peak so far plus the request
   that failed, read from the error) beyond what the plan predicted it would allocate; at least the failed
   request; when neither is known (no CUDA counters, no size in the message) `UNKNOWN_SHORTFALL_FRACTION` of the
   budget, said so in the log (unknown is never priced as zero);
2. the failed plan is recorded in its Optuna study as a FAIL trial (never proposed again), and the study is
   searched again with the VRAM budget lowered by the shortfall; the new plan keeps every component's storage
   dtype (fp8 casting cannot be undone in process, so the guard never adds it, and can always go back);
3. the new plan is applied, what changed is logged at warning level, and the call is retried once;
4. a second OOM puts the first plan back and raises `PlanOutOfMemoryError` (a `torch.OutOfMemoryError` and a
   `MemplanError`) naming the plan that was attempted.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import torch

from planner.errors import ArgumentError, BudgetError, MemplanError, UnsupportedError

logger = logging.getLogger(__name__)

# Budget taken off when an OOM carries no measurement at all: a tenth, so a second attempt differs visibly.
UNKNOWN_SHORTFALL_FRACTION = 0.10
_GUARD_ATTR = "_memplan_guard"
_REQUEST_RE = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) ?(GiB|MiB|KiB|bytes|B)\b")
_REQUEST_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1, "B": 1}


class PlanOutOfMemoryError(torch.OutOfMemoryError, MemplanError):
    """The guarded call ran out of memory again under the re-planned plan; the first plan was put back."""


@dataclass
class Planning:
    """What re-planning needs beyond the plan: the profile it was priced from, the target and the study's storage."""

    profile: object  # planner.profile_data.Profile
    hardware: object  # cost_models.HardwareSpec
    space: object  # planner.space.SearchSpace
    storage: object  # an Optuna storage (URL or object) holding the plan's study


def requested_bytes(err: BaseException) -> int | None:
    """The size of the allocation that failed, from torch's OOM message ("Tried to allocate 2.00 GiB")."""
    match = _REQUEST_RE.search(str(err))
    return int(float(match.group(1)) * _REQUEST_UNITS[match.group(2)]) if match else None


def shortfall_bytes(err: BaseException, plan, device: str) -> tuple[int, str]:
    """How much more the call needed than the plan predicted, and how that figure was obtained (for the log)."""
    request = requested_bytes(err)
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") and torch.cuda.is_available() else None
    predicted = plan.predicted.allocated_peak_bytes if plan.predicted is not None else None
    if peak is not None and predicted is not None:
        need = peak + (request or 0)
        return max(need - predicted, request or 0), (f"allocator peak {peak} B + failed request {request or 0} B "
                                                     f"vs predicted {predicted} B")
    if request is not None:
        return request, "the failed request (no allocator counters on this device)"
    budget = plan.budgets.get("vram_bytes", 0)
    return int(budget * UNKNOWN_SHORTFALL_FRACTION), (f"unknown: no allocator counters and no size in the error; "
                                                      f"{UNKNOWN_SHORTFALL_FRACTION:.0%} of the budget assumed")


class Guard:
    """The state of one guarded pipeline: its plan, how to re-plan it, and whether a retry was already made."""

    def __init__(self, pipe, plan, planning: Planning):
        self.pipe, self.plan, self.planning = pipe, plan, planning
        self.original_class = type(pipe)

    def call(self, args, kwargs):
        rng = _rng_states(kwargs)
        try:
            return self.original_class.__call__(self.pipe, *args, **kwargs)
        except torch.OutOfMemoryError as err:
            _restore_rng(rng)  # the retry draws the same noise the failed call drew
            return self._recover(err, args, kwargs)

    def _recover(self, err, args, kwargs):
        from planner.apply import apply_plan
        from planner.plan import describe_choice

        failed = self.plan
        shortfall, how = shortfall_bytes(err, failed, failed.device)
        _empty_cache(failed.device)
        new = self._replan(failed, shortfall, err)
        logger.warning("out of memory under plan [%s] (predicted card peak %s B); shortfall %s B (%s); re-planned for "
                       "a VRAM budget of %s B: [%s]; retrying the call once", describe_choice(failed.choice),
                       failed.predicted.card_peak_bytes if failed.predicted else "?", shortfall, how,
                       new.budgets["vram_bytes"], describe_choice(new.choice))
        apply_plan(new, self.pipe, failed.device)
        try:
            result = self.original_class.__call__(self.pipe, *args, **kwargs)
        except torch.OutOfMemoryError as again:
            _empty_cache(failed.device)
            apply_plan(failed, self.pipe, failed.device)
            raise PlanOutOfMemoryError(
                f"out of memory again after re-planning: the plan attempted was [{describe_choice(new.choice)}] "
                f"(VRAM budget {new.budgets['vram_bytes']} B, the first plan's {failed.budgets.get('vram_bytes')} B "
                f"less the measured shortfall {shortfall} B); the first plan was put back. Plan for a smaller "
                "budget (or a smaller workload) and retry") from again
        self.plan = new
        return result

    def _replan(self, failed, shortfall: int, err: BaseException):
        from planner.optimizer import record_plan_failure, replan

        budget = failed.budgets["vram_bytes"] - shortfall
        try:
            new = replan(failed, self.planning, budget, keep_storage=_storage_dtypes(self.pipe))
        except BudgetError as no_plan:
            raise PlanOutOfMemoryError(f"out of memory under the plan, and no plan fits the budget lowered by the "
                                       f"measured shortfall ({shortfall} B): {no_plan}") from err
        record_plan_failure(failed, self.planning)  # after the search, which makes the study if it is new
        return new


def _rng_states(kwargs: dict) -> list:
    """The states of the random generators the call may draw from: its `generator`(s) and torch's default one."""
    gens = kwargs.get("generator")
    gens = [g for g in (gens if isinstance(gens, (list, tuple)) else [gens]) if isinstance(g, torch.Generator)]
    return [(g, g.get_state()) for g in gens] + [(None, torch.get_rng_state())]


def _restore_rng(states: list) -> None:
    for gen, rng_state in states:
        gen.set_state(rng_state) if gen is not None else torch.set_rng_state(rng_state)


def _storage_dtypes(pipe) -> dict[str, str | None]:
    from planner.apply import _components, _fp8_dtype_of

    return {name: _fp8_dtype_of(module) for name, module in _components(pipe).items()}


def _empty_cache(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


_GUARDED_CLASSES: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    """A subclass of the pipeline's class, under the same name, whose __call__ goes through the guard: a special
    method is looked up on the type, so an instance attribute could not intercept `pipe(...)`."""
    if cls not in _GUARDED_CLASSES:
        def __call__(self, *args, **kwargs):
            return getattr(self, _GUARD_ATTR).call(args, kwargs)

        _GUARDED_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
    return _GUARDED_CLASSES[cls]


def install(pipe, plan, planning: Planning) -> None:
    """Guard `pipe`'s calls (see the module docstring) until `uninstall(pipe)`."""
    if getattr(pipe, _GUARD_ATTR, None) is not None:
        raise ArgumentError("this pipeline is already guarded")
    guard_ = Guard(pipe, plan, planning)
    pipe.__dict__[_GUARD_ATTR] = guard_
    pipe.__class__ = _guarded_class(type(pipe))


def uninstall(pipe) -> None:
    guard_ = pipe.__dict__.pop(_GUARD_ATTR, None)
    if guard_ is not None:
        pipe.__class__ = guard_.original_class


@contextlib.contextmanager
def guard(pipe, plan=None, *, storage=None):
    """Within the block, an OOM in a call of `pipe` re-plans from the plan's study and retries once.

    Example:
        >>> plan = Plan.load("flux-8gb.json"); plan.apply(pipe)
        >>> with guard(pipe):                      # the plan applied to pipe; its study in `storage` if it has one
        ...     image = pipe("an astronaut").images[0]

    `plan` defaults to the plan applied to `pipe`. Re-planning needs the plan's profile: it is made now from the
    pipeline (meta twins, seconds), which needs its weights in their own dtype; a pipeline already cast to fp8 is
    guarded with optimize(..., oom_guard=True), which keeps the profile it planned from. `storage`: the Optuna
    storage holding the plan's study (None: a new in-memory study under the plan's study name)."""
    plan = plan or getattr(pipe, "_memplan_plan", None)
    if plan is None:
        raise ArgumentError("guard() needs a plan applied to the pipeline: apply one first (plan.apply(pipe)) or pass "
                            "plan=")
    if getattr(pipe, _GUARD_ATTR, None) is not None:  # optimize(..., oom_guard=True) guards it already
        yield pipe
        return
    install(pipe, plan, _planning_for(pipe, plan, storage))
    try:
        yield pipe
    finally:
        uninstall(pipe)


def _planning_for(pipe, plan, storage) -> Planning:
    from cost_models import HardwareSpec
    from planner.loading import load_shards, with_shards
    from planner.profiler import profile
    from planner.sources import from_pipeline
    from planner.space import SearchSpace
    from planner.workload import Workload

    if not (plan.workload and plan.hardware and plan.budgets and plan.search):
        raise UnsupportedError("guard() needs a plan made by optimize()/plan_for (its workload, GPU, budgets and "
                               "study); a hand-written plan cannot be re-planned")
    cast = [n for n, d in _storage_dtypes(pipe).items() if d is not None]
    if cast:
        raise UnsupportedError(f"{', '.join(cast)}: weights already stored in fp8, so the pipeline cannot be profiled "
                               "in its own dtype again; use optimize(..., oom_guard=True), which keeps the profile")
    source = from_pipeline(pipe)
    prof = with_shards(profile(source, Workload.from_dict(plan.workload)),
                       load_shards(source.components, source.folder))
    return Planning(prof, HardwareSpec.from_dict(plan.hardware), SearchSpace(**plan.search["space"]),
                    storage if storage is not None else _fresh_storage())


def _fresh_storage():
    import optuna

    return optuna.storages.InMemoryStorage()


__all__ = ["Guard", "Planning", "PlanOutOfMemoryError", "guard", "install", "uninstall"]
