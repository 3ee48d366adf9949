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
from planner.loading import load_shards, loading_report, with_shards
from planner.plan import Alternative, Plan, weights_dtype
from planner.profiler import Profile, profile
from planner.search import Budgets, record_measurement, search, study_name
from planner.sources import PipelineSource, from_pipeline, load_source
from planner.space import SearchSpace
from planner.units import format_size, parse_size
from planner.workload import Workload, default_workload

logger = logging.getLogger(__name__)


def available_ram_bytes() -> int:
    """This machine's available RAM (MemAvailable), the default host-RAM budget."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _source(model, backend: str = "meta") -> PipelineSource:
    if backend not in ("meta", "device"):
        raise ArgumentError(f"profile backend {backend!r} is not one of 'meta' (trace weightless twins) and 'device' "
                            "(run the loaded modules where they are)")
    if isinstance(model, PipelineSource):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_source(model)
    return from_pipeline(model, meta=backend == "meta")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_for(model, vram_budget: int | str, *, ram_budget: int | str | None = None,
             gpu: str | HardwareSpec | None = None, device: str | None = None, allow_lossy: bool = True,
             n_trials: int | None = None, seed: int = 0, storage: str | None = None,
             show_progress_bar: bool = False, profile_backend: str = "meta", **workload) -> Plan:
    """Make a Plan for `model` (pipeline, zoo name, model folder) without applying it. See `optimize`."""
    _check_flags(allow_lossy=allow_lossy, show_progress_bar=show_progress_bar)
    n_trials = _check_search_args(n_trials, storage)
    seed = _count("seed", seed, 0, 2**32 - 1)  # numpy's seed range, which Optuna's samplers use
    workload = _check_workload_args(workload)
    vram_bytes = parse_size(vram_budget)
    ram_bytes = parse_size(ram_budget) if ram_budget is not None else available_ram_bytes()
    hw = get_gpu(gpu) if gpu is not None else _detect_gpu()
    vram_bytes = _bounded_by_card(vram_bytes, hw)
    device = check_device_name(device or _default_device())
    source = _source(model, profile_backend)
    work = default_workload(source.pipeline_class, **{**source.workload_defaults, **workload})
    prof = with_shards(profile(source, work), load_shards(source.components, source.folder))
    ram_short = sum(c.total_bytes for c in prof.components.values()) > ram_bytes
    space = SearchSpace(cuda=torch.device(device).type == "cuda", allow_lossy=allow_lossy, allow_disk=ram_short)
    budgets = Budgets(vram_bytes, ram_bytes)
    result = search(prof, hw, budgets, space=space, n_trials=n_trials, seed=seed, storage=storage,
                    show_progress_bar=show_progress_bar)
    return _make_plan(prof, result, hw, device, budgets, space)


WORKLOAD_ARGS = tuple(f.name for f in dataclasses.fields(Workload))


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
    """The workload keywords, known and integer; their ranges are the Workload's and the pipeline's to check."""
    unknown = sorted(set(workload) - set(WORKLOAD_ARGS))
    if unknown:
        raise ArgumentError(f"unknown workload argument(s) {unknown}: the workload is given by "
                            f"{', '.join(WORKLOAD_ARGS)}")
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


def _make_plan(prof: Profile, result, hw: HardwareSpec, device: str, budgets: Budgets, space: SearchSpace) -> Plan:
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
                loading=loading_report(prof, budgets.ram_bytes))


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
             batch_size: int = 1, allow_lossy: bool = True, n_trials: int | None = None, seed: int = 0,
             storage: str | None = None, profile_backend: str = "meta", apply: bool = True) -> Plan:
    """Choose the fastest memory plan for `pipe` that fits the budgets, and apply it.

    Example:
        >>> plan = optimize(pipe, vram_budget="8GB", gpu="rtx-4070-12gb")   # pipe is ready to run
        >>> plan.save("flux-8gb.json")                                       # later: Plan.load(...).apply(pipe)

    Args:
        pipe: a loaded diffusers pipeline (or a zoo name / model folder, with apply=False).
        vram_budget: the memory of the card the plan must run on ("8GB" = 8e9 bytes, "8GiB" = 8*2**30): the
            predicted allocator peak times the allocator overhead plus the CUDA context must fit in it.
        ram_budget: host RAM for offloaded weights (default: this machine's available RAM).
        gpu: the target GPU, a name from `memplan gpus` or a spec JSON from calibrate().
        device: where the pipeline runs ("cuda" if available, else "cpu"); on "cpu" only knobs that run on
            CPU are searched (group offloading without streams, fp8 storage, VAE tiling/slicing).
        height, width, num_frames, num_inference_steps, batch_size: the workload (defaults: the pipeline's).
        allow_lossy: allow fp8 storage of weights (layerwise casting: lossy, cannot be undone in process).
        n_trials, seed, storage: the Optuna study (n_trials None: the search's default, then an exact local
            polish; storage: an RDB URL such as "sqlite:///memplan.db" to persist and share the study).
        profile_backend: "meta" (default: weightless twins traced on meta, seconds for any size) or "device"
            (run the loaded modules where they are: measured seconds per call and block, and on CUDA the
            allocator's own peaks; needs the pipeline on the target device).
        apply: apply the plan to `pipe` before returning it.

    Raises:
        ValueError: bad input, named. planner.search.BudgetError: no plan fits; it names the minimum.
    """
    _check_flags(apply=apply)
    if apply:  # before the search, not after it
        device = _check_applicable(pipe, device or _default_device())
    plan = plan_for(pipe, vram_budget, ram_budget=ram_budget, gpu=gpu, device=device, allow_lossy=allow_lossy,
                    n_trials=n_trials, seed=seed, storage=storage, profile_backend=profile_backend,
                    height=height, width=width,
                    num_frames=num_frames, num_inference_steps=num_inference_steps, batch_size=batch_size)
    if apply:
        plan.apply(pipe)
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
