"""optimize(): profile → cost model → search → Plan → apply, in one call."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os

import optuna
import torch

from cost_models import GPUS, HardwareSpec, get_gpu
from planner.devices import check_device_available, check_device_name, check_not_meta
from planner.errors import ArgumentError, HardwareError
from planner.guard import Planning, install, uninstall
from planner.plan import Alternative, Plan, describe_binding, describe_workload, lossy_knobs, weights_dtype
from planner.loading import load_shards, loading_report, with_shards
from planner.profiler import Profile, profile
from planner.progress import resolve as resolve_progress
from planner.search import BudgetError, Budgets, SearchResult, pareto_front, record_measurement, search, study_name
from planner.sources import PipelineSource, from_pipeline, load_source
from planner.space import SearchSpace
from planner.units import format_size, parse_size
from planner.workload import Workload

logger = logging.getLogger(__name__)

# The API and the CLI plan for the same device: a plan is for the GPU it is priced on. device="cpu" plans a run
# on this machine's CPU instead (only the knobs that run on a CPU are searched).
DEFAULT_DEVICE = "cuda"


# The default host-RAM budget is this machine's total RAM minus a reserve for the OS, other processes and this
# Python process itself (torch + diffusers + the pipeline's glue take 1-3 GiB): 10% of the RAM, at least 4 GiB.
# Total, not free: a budget that moved with whatever happens to be free would change the plan from run to run.
RAM_RESERVE_FRACTION = 0.10
RAM_RESERVE_MIN_BYTES = 4 * 2**30
# A lossy knob (fp8 storage, VAE tiling) changes the output, so a lossy plan is taken only when no lossless plan
# fits the budgets, or when it is at least this many times faster than the best lossless plan.
MIN_LOSSY_SPEEDUP = 1.25


def total_ram_bytes() -> int:
    """This machine's RAM (physical pages), or the cgroup memory limit of this process when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit_bytes()
    return min(total, limit) if limit else total


def _cgroup_limit_bytes() -> int | None:
    """The cgroup v2 memory limit of this process (a container's RAM), None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return None
    return int(limit) if limit.isdigit() else None


def default_ram_budget() -> tuple[int, str]:
    """The default host-RAM budget in bytes, and how it was set (printed with the plan)."""
    total = total_ram_bytes()
    reserve = max(RAM_RESERVE_MIN_BYTES, int(total * RAM_RESERVE_FRACTION))
    budget = max(total - reserve, 0)
    return budget, (f"default: this machine's {format_size(total)} of RAM minus a {format_size(reserve)} reserve "
                    f"(10%, at least {format_size(RAM_RESERVE_MIN_BYTES)})")


def _source(model, backend: str = "meta") -> PipelineSource:
    if backend not in ("meta", "device"):
        raise ArgumentError(f"profile backend {backend!r} is not one of 'meta' (trace weightless twins) and 'device' "
                            "(run the loaded modules where they are)")
    if isinstance(model, PipelineSource):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_source(model)
    return from_pipeline(model, meta=backend == "meta")


def plan_for(model, vram_budget: int | str, *, ram_budget: int | str | None = None,
             gpu: str | HardwareSpec | None = None, device: str | None = None, allow_lossy: bool = True,
             n_trials: int | None = None, seed: int = 0, storage: str | None = None,
             progress: bool | None = None, profile_backend: str = "meta", allow_untraced: bool = False,
             **workload) -> Plan:
    """Make a Plan for `model` (pipeline, zoo name, model folder) without applying it. See `optimize`."""
    return _plan_for(model, vram_budget, ram_budget=ram_budget, gpu=gpu, device=device, allow_lossy=allow_lossy,
                     n_trials=n_trials, seed=seed, storage=storage, progress=progress,
                     profile_backend=profile_backend, allow_untraced=allow_untraced, **workload)[0]


def _plan_for(model, vram_budget, *, ram_budget, gpu, device, allow_lossy, n_trials, seed, storage,
              progress, profile_backend, allow_untraced, **workload) -> tuple[Plan, Planning]:
    """plan_for, and what the OOM guard needs to re-plan it (profile, target, space, storage)."""
    _check_flags(allow_lossy=allow_lossy, allow_untraced=allow_untraced)
    show = resolve_progress(progress)
    n_trials = _check_search_args(n_trials, storage)
    seed = _count("seed", seed, 0, 2**32 - 1)  # numpy's seed range, which Optuna's samplers use
    workload = {k: v for k, v in _check_workload_args(workload).items() if v is not None}  # None: the default
    vram_bytes = parse_size(vram_budget)
    ram_bytes, ram_note = (parse_size(ram_budget), "given") if ram_budget is not None else default_ram_budget()
    hw, gpu_note = (get_gpu(gpu), "given") if gpu is not None else (_detect_gpu(), "detected")
    bounded, vram_given = _bounded_by_card(vram_bytes, hw), _as_given(vram_budget)
    if bounded < vram_bytes:  # the summary must not show "8TB = 24.00 GiB" unexplained
        vram_given += f", bounded by {hw.name}'s memory"
    vram_bytes = bounded
    device = check_device_name(device or DEFAULT_DEVICE)
    source = _source(model, profile_backend)
    prof = with_shards(profile(source, allow_untraced=allow_untraced, progress=show, **workload),
                       load_shards(source.components, source.folder))
    work = prof.workload  # what the pipeline ran: its own defaults, the user's knobs on top
    logger.info("workload: %s (%s)", describe_workload(work.to_dict()),
                f"set: {', '.join(sorted(workload))}" if workload else "the pipeline's defaults")
    logger.info("budgets: VRAM %s = %s, host RAM %s (%s); GPU %s (%s)", _as_given(vram_budget),
                format_size(vram_bytes), format_size(ram_bytes), ram_note, hw.name, gpu_note)
    ram_short = sum(c.total_bytes for c in prof.components.values()) > ram_bytes
    space = SearchSpace(cuda=torch.device(device).type == "cuda", allow_lossy=allow_lossy, allow_disk=ram_short)
    budgets = Budgets(vram_bytes, ram_bytes)
    result, space, lossy = _search_lossless_first(prof, hw, budgets, space, n_trials=n_trials, seed=seed,
                                                  storage=storage, show_progress_bar=show)
    explain = {"vram_as_given": vram_given,
               "ram_as_given": _as_given(ram_budget) if ram_budget is not None else None, "ram_note": ram_note,
               "gpu_note": gpu_note, "workload_set": sorted(workload), "binding": list(result.binding),
               "blocked": result.blocked.estimate.to_dict() if result.blocked else None, "lossy": lossy}
    plan = _make_plan(prof, result, hw, device, budgets, space, explain)
    logger.info("binding constraint: %s", describe_binding(plan))
    return plan, Planning(prof, hw, space, storage)


def replan(plan: Plan, planning: Planning, vram_bytes: int, keep_storage: dict[str, str | None]) -> Plan:
    """The fastest plan of `plan`'s study within `vram_bytes`, other than `plan` itself, keeping each component's
    storage dtype as `keep_storage` says (the OOM guard: fp8 casting cannot be undone, so it is never added)."""
    def accept(choice) -> bool:
        return choice != plan.choice and all(choice.components[n].storage_dtype == d for n, d in keep_storage.items())

    budgets = Budgets(vram_bytes, plan.budgets["ram_bytes"])
    result = search(planning.profile, planning.hardware, budgets, space=planning.space, storage=planning.storage,
                    study_name_override=plan.search["study_name"], accept=accept)
    new = _make_plan(planning.profile, result, planning.hardware, plan.device, budgets, planning.space, plan.explain)
    return dataclasses.replace(new, search=plan.search)  # the same study: later measurements land there too


def record_plan_failure(plan: Plan, planning: Planning) -> None:
    """Record `plan` as failed (an OOM) in its study, so no later search of that study proposes it."""
    record_measurement(planning.storage, plan.search["study_name"], plan.choice, planning.profile, planning.space,
                       measured_s=None, failed=True, peak_bytes=None)



def _check_flags(**flags) -> None:
    """Flags are bools: `allow_lossy="no"` is truthy and would silently mean the opposite."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ArgumentError(f"{name}={value!r} is not valid: give True or False")


def _count(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int within [low, high]; any integer type (numpy's too) is accepted, bools and floats not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name}={value!r} is not valid: give an int")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ArgumentError(f"{name}={value!r} is not valid: give an int {bound}")
    return int(value)


def _check_search_args(n_trials, storage) -> int | None:
    if storage is not None and not isinstance(storage, (str, optuna.storages.BaseStorage)):
        raise ArgumentError(f"storage={storage!r} is not valid: give an Optuna RDB URL such as "
                            "'sqlite:///memplan.db', an optuna storage, or None (in memory)")
    return None if n_trials is None else _count("n_trials", n_trials, 1)


def _check_workload_args(workload: dict) -> dict:
    """The workload keywords, integers as ints; any argument of the pipeline's `__call__` is a knob, and a name
    it does not take is refused, naming them, when the call is built (`planner.call_args.call_kwargs`)."""
    return {k: v if v is None or isinstance(v, bool) or not isinstance(v, numbers.Integral) else int(v)
            for k, v in workload.items()}


def _check_applicable(pipe, device: str) -> str:
    """What `apply` would refuse, refused before profiling and searching: no pipeline, no such device, meta weights."""
    if isinstance(pipe, (str, os.PathLike, PipelineSource)) or not hasattr(pipe, "components"):
        raise ArgumentError("apply=True needs a loaded pipeline; pass apply=False to plan for a zoo name or folder")
    check_device_available(device)
    check_not_meta({k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)})
    return device


def _bounded_by_card(vram_bytes: int, hw: HardwareSpec) -> int:
    """A budget above the target card's memory cannot be used: warn, and plan for the card."""
    if vram_bytes > hw.vram_bytes:
        logger.warning("VRAM budget %s is more than %s has (%s): planning for %s", format_size(vram_bytes), hw.name,
                       format_size(hw.vram_bytes), format_size(hw.vram_bytes))
        return hw.vram_bytes
    return vram_bytes


def _as_given(budget: int | str) -> str:
    return budget if isinstance(budget, str) else f"{budget} bytes"


def _search_lossless_first(prof: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace,
                           **kw) -> tuple[SearchResult, SearchSpace, dict]:
    """Search without lossy knobs, then (if allowed) with them: the lossy plan wins only when no lossless plan fits
    or it is MIN_LOSSY_SPEEDUP times faster. Returns the chosen result (its Pareto front holds both searches'
    feasible plans), the space it came from, and what was decided about lossy knobs, and why."""
    lossless_space = dataclasses.replace(space, allow_lossy=False)
    lossless = lossy = None
    try:
        lossless = search(prof, hw, budgets, space=lossless_space, **kw)
    except BudgetError:
        if not space.allow_lossy:
            raise
    if not space.allow_lossy:
        return lossless, lossless_space, {"allowed": False, "taken": [], "reason": "lossy knobs not allowed"}
    try:
        lossy = search(prof, hw, budgets, space=space, **kw)
    except BudgetError:
        if lossless is None:
            raise
    decision = _lossy_decision(lossless, lossy)
    # the lossy search's plan: when its lossy knobs are taken, or when it found a faster plan without any
    lossy_wins = lossless is None or decision["taken"] or (
        not decision["declined"] and lossy is not None and lossy.best.estimate.total_s < lossless.best.estimate.total_s)
    chosen, chosen_space = (lossy, space) if lossy_wins else (lossless, lossless_space)
    front = pareto_front([c for r in (lossless, lossy) if r is not None for c in r.pareto])
    if chosen.best not in front:  # a lossless plan kept although a lossy alternative dominates it
        front = (chosen.best, *front)
    return dataclasses.replace(chosen, pareto=front), chosen_space, decision


def _lossy_decision(lossless: SearchResult | None, lossy: SearchResult | None) -> dict:
    """Whether the lossy search's best plan is taken over the lossless search's (see MIN_LOSSY_SPEEDUP)."""
    rule = f"only when no lossless plan fits or when at least {MIN_LOSSY_SPEEDUP}x faster"
    knobs = lossy_knobs(lossy.best.choice) if lossy else []
    out = {"allowed": True, "rule": rule, "taken": [], "declined": [],
           "lossless_s": lossless.best.estimate.total_s if lossless else None,
           "lossy_s": lossy.best.estimate.total_s if lossy and knobs else None}
    if not knobs:
        return {**out, "reason": "the fastest plan found is lossless"}
    if lossless is None:
        return {**out, "taken": knobs, "reason": "needed to fit: no lossless plan fits the budgets"}
    speedup = out["lossless_s"] / out["lossy_s"]
    taken = speedup >= MIN_LOSSY_SPEEDUP
    return {**out, "taken" if taken else "declined": knobs,
            "reason": f"the lossy plan is {speedup:.2f}x faster than the best lossless one ({out['lossless_s']:.2f}s "
                      f"-> {out['lossy_s']:.2f}s), {'at least' if taken else 'below'} {MIN_LOSSY_SPEEDUP}x"}


def _make_plan(prof: Profile, result: SearchResult, hw: HardwareSpec, device: str, budgets: Budgets,
               space: SearchSpace, explain: dict) -> Plan:
    comps = {n: {"class": c.class_name, "config_hash": c.config_hash} for n, c in prof.components.items()}
    for name, comp in prof.components.items():
        dtype = weights_dtype(comp.param_bytes_by_dtype)
        comps[name].update({"dtype": dtype} if dtype else {})
    alternatives = tuple(Alternative(c.choice, c.estimate) for c in result.pareto)
    return Plan(pipeline_class=prof.pipeline_class, components=comps, choice=result.best.choice,
                predicted=result.best.estimate, workload=prof.workload.to_dict(),
                budgets={"vram_bytes": budgets.vram_bytes, "ram_bytes": budgets.ram_bytes},
                hardware=hw.to_dict(), device=device, alternatives=alternatives,
                search={"study_name": study_name(prof, hw, budgets, space), "space": dataclasses.asdict(space)},
                explain=explain, loading=loading_report(prof, budgets.ram_bytes))


def _detect_gpu() -> HardwareSpec:
    """The table entry of this machine's CUDA GPU (matched by its name and memory); without CUDA, or for a card
    not in the table, the user must name the target."""
    from cost_models.gpu_names import match, suggest

    if not torch.cuda.is_available():
        raise ArgumentError("no target GPU given and no CUDA GPU on this machine: pass gpu='rtx-4090' (any name "
                            "`memplan gpus` lists) or gpu='my-gpu.json' (from calibrate())")
    device = torch.cuda.current_device()  # the name and the memory of the same card
    name, total = torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    key = match(name, total)
    if key is None:
        near = suggest(name)
        raise HardwareError(f"this machine's GPU {name!r} ({format_size(total)}) is not in the GPU table"
                            + (f" (nearest: {', '.join(near)})" if near else "")
                            + ": pass gpu=<a table name> to plan as that card, or calibrate this one "
                              "(cost_models.calibrate.calibrate(), then gpu='my-gpu.json')")
    logger.info("target GPU: detected %s (%s) -> table entry %s", name, format_size(total), key)
    return GPUS[key]


def optimize(pipe, vram_budget: int | str = "8GB", *, ram_budget: int | str | None = None,
             gpu: str | HardwareSpec | None = None, device: str | None = None, height: int | None = None,
             width: int | None = None, num_frames: int | None = None, num_inference_steps: int | None = None,
             batch_size: int | None = None, max_sequence_length: int | None = None, allow_lossy: bool = True,
             n_trials: int | None = None, seed: int = 0, storage: str | None = None, profile_backend: str = "meta",
             allow_untraced: bool = False, progress: bool | None = None, apply: bool = True,
             oom_guard: bool = False, **pipeline_kwargs) -> Plan:
    """Choose the fastest memory plan for `pipe` that fits the budgets, and apply it.

    Example:
        >>> plan = optimize(pipe, vram_budget="8GB", gpu="rtx-4070-12gb")   # pipe is ready to run
        >>> print(plan.summary())                                            # what, and why
        >>> plan.save("flux-8gb.json")                                       # later: Plan.load(...).apply(pipe)

    Args:
        pipe: a loaded diffusers pipeline (or a zoo name / model folder, with apply=False).
        vram_budget: the memory of the card the plan must run on ("8GB" = 8e9 bytes, "8GiB" = 8*2**30): the
            predicted allocator peak times the allocator overhead plus the CUDA context must fit in it.
        ram_budget: host RAM for offloaded weights (default: this machine's total RAM minus a reserve of 10%,
            at least 4 GiB; see default_ram_budget — total, not free, so the plan does not change from run to run).
        gpu: the target GPU: any common name ("rtx-4090", "NVIDIA GeForce RTX 4090", "4090", "h100-sxm"; `memplan
            gpus` lists the table) or a spec JSON from calibrate(). Default: this machine's CUDA card, detected.
        device: where the plan runs (default "cuda", as in the CLI: a plan is for the GPU it is priced on); "cpu"
            plans a run on this CPU, searching only knobs that run on CPU (group offloading without streams, fp8
            storage, VAE tiling/slicing).
        height, width, num_frames, num_inference_steps, batch_size, max_sequence_length, **pipeline_kwargs: the
            workload, any argument of the pipeline's `__call__` (e.g. guidance_scale=); what is not given takes
            the pipeline's own default (its call runs on weightless twins to learn what it does, see
            `planner.discovery`); batch_size is its images/videos per prompt. `plan.workload` records the result.
        allow_lossy: allow fp8 storage and VAE tiling, which change the output. Even then they are taken only
            when no lossless plan fits or when they make the plan MIN_LOSSY_SPEEDUP (1.25x) faster than the best
            lossless one; False forbids them.
        n_trials, seed, storage: the Optuna study (n_trials None: the search's default, then an exact local
            polish; storage: an RDB URL such as "sqlite:///memplan.db" to persist and share the study).
        profile_backend: "meta" (default: weightless twins traced on meta, seconds for any size) or "device"
            (run the loaded modules where they are: measured seconds per call and block, and on CUDA the
            allocator's own peaks; needs the pipeline on the target device).
        allow_untraced: plan even when a component call cannot be traced (its activations and compute then go
            unpriced: the plan is partly blind, and says so in warnings); default: refuse with an error naming it.
        progress: progress bars on stderr while profiling and searching (None, the default: only in a terminal).
        apply: apply the plan to `pipe` before returning it.
        oom_guard: guard `pipe`'s calls: an out-of-memory error in one re-plans from the same study for the
            budget less the measured shortfall, applies that plan and retries once (planner.guard); needs apply.

    Raises:
        planner.errors.MemplanError (a ValueError): bad input, named; BudgetError when no plan fits (it names the
        minimum); DeviceError for a device this machine lacks. On any error `pipe` is as it was.
    """
    _check_flags(apply=apply, oom_guard=oom_guard)
    if oom_guard and not apply:
        raise ArgumentError("oom_guard=True guards the calls of the pipeline the plan is applied to: it needs "
                            "apply=True")
    if apply:  # before the search, not after it
        device = _check_applicable(pipe, device or DEFAULT_DEVICE)
    if oom_guard and storage is None:  # the study must outlive this call: the guard re-plans from it
        storage = optuna.storages.InMemoryStorage()
    plan, planning = _plan_for(pipe, vram_budget, ram_budget=ram_budget, gpu=gpu, device=device,
                               allow_lossy=allow_lossy, n_trials=n_trials, seed=seed, storage=storage,
                               progress=progress, profile_backend=profile_backend,
                               allow_untraced=allow_untraced, height=height, width=width, num_frames=num_frames,
                               num_inference_steps=num_inference_steps, batch_size=batch_size,
                               max_sequence_length=max_sequence_length, **pipeline_kwargs)
    if apply:
        plan.apply(pipe)
        uninstall(pipe)  # a guard from an earlier optimize() guards the plan just replaced
    if oom_guard:
        install(pipe, plan, planning)
    return plan


def record_run(plan: Plan, pipe, storage: str, *, measured_s: float | None, failed: bool,
               peak_bytes: int | None = None) -> None:
    """Record a measured run of `plan` (made by plan_for/optimize with `storage`) in that Optuna storage, so later
    planning for the same model, workload, GPU and budgets sees it; failures (OOM) are recorded as FAIL trials
    and never proposed again. `pipe` is the pipeline as it was planned, or `from_pipeline(pipe)` taken before
    applying (an fp8 plan changes the weights' dtypes, and with them the profile the study was made from)."""
    if not plan.search:
        raise ArgumentError("the plan carries no study (it was not made by plan_for/optimize): nothing to record into")
    source = _source(pipe)
    prof = profile(source, Workload.from_dict(plan.workload))
    record_measurement(storage, plan.search["study_name"], plan.choice, prof, SearchSpace(**plan.search["space"]),
                       measured_s=measured_s, failed=failed, peak_bytes=peak_bytes)
