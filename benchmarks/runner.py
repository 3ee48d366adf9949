"""Run scenarios: build the pipeline (random weights, never a download), make and apply the plan, run it, measure.

Each scenario becomes one row (a flat dict): the plan's predictions beside the measurements and their error,
or a status and message when anything failed (OOM, BudgetError, a bug): failures are recorded, never raised.

What is measured, per scenario, after one excluded warm-up call (1 step, same size):
- peak VRAM (CUDA): `max_memory_allocated` / `max_memory_reserved` over the call, per component call too
  (the peak counters are folded and reset at each component boundary); the card peak adds the CUDA context,
  measured as `mem_get_info` used minus `memory_reserved`. On CPU these are None.
- host RAM: RSS after the call minus RSS before the pipeline was built, and the call's peak RSS (VmHWM,
  reset through /proc/self/clear_refs where the kernel allows).
- seconds per phase (encode / denoise / decode) from forward hooks on the components (the VAE's `decode`
  method, which is not `forward`), synchronized on CUDA; `measured_steps` denoising steps run and the full
  call is scaled as  denoise = first_step + (N - 1) * mean(later steps)  (the first step carries one-off
  onloads, e.g. model offload's).

Budgets on CUDA are simulated with `torch.cuda.set_per_process_memory_fraction`: a card of `budget` bytes
leaves `budget - context` to the allocator, so the fraction is (budget - context) / total.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.scenarios import OPTIMIZE, REFERENCE_PLANS, TINY_PIPELINES, Scenario
from planner.plan import describe_choice
from planner.sources import from_pipeline, instantiate
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD,
                              Choice, ComponentPlan, PlanError)

logger = logging.getLogger(__name__)

PROMPT = "a photo of a cat"  # words the in-code tokenizers know
WARMUP_STEPS = 1


# ---------------------------------------------------------------- pipelines with random weights

def build_pipeline(name: str, device: str, seed: int = 0):
    """A runnable pipeline: "tiny-flux" / "tiny-sdxl" (planner.tiny, fp32) or a zoo name / model folder
    (full size, random weights on `device`, in-code tokenizers and schedulers; nothing is downloaded)."""
    if name in TINY_PIPELINES:
        from planner.tiny import tiny_flux_pipeline, tiny_sdxl_pipeline

        pipe = (tiny_flux_pipeline if name == "tiny-flux" else tiny_sdxl_pipeline)(seed=seed)
        return pipe.to(device) if device != "cpu" else pipe
    return _build_zoo(name, device, seed)


def _build_zoo(name: str, device: str, seed: int):
    import diffusers
    from planner.sources import ZOO_DIR, load_source

    source = load_source(name)  # the planner's own meta build: same classes, configs and dtypes
    folder = Path(name) if (Path(name) / "model_index.json").is_file() else ZOO_DIR / name
    index = json.loads((folder / "model_index.json").read_text())
    parts: dict = {}
    for i, (comp, module) in enumerate(source.components.items()):
        parts[comp] = materialize(module, device, seed + i)
    parts.update(_tokenizers(index, parts, source.workload_defaults))
    parts["scheduler"] = _scheduler(index)
    cls = getattr(diffusers, source.pipeline_class)
    return cls(**_init_kwargs(cls, parts))


def materialize(module: torch.nn.Module, device: str, seed: int) -> torch.nn.Module:
    """Meta module → `device` with small random weights (N(0, 0.02), seeded); buffers (position ids, rope
    tables) are computed for real by a twin built with empty parameters but real buffers."""
    from accelerate import init_empty_weights

    config, cls = module.config, type(module)
    with init_empty_weights(include_buffers=False):
        twin = instantiate(cls, config)
    buffers = dict(twin.named_buffers())
    module.to_empty(device=device)
    gen_device = torch.device(device)
    torch.manual_seed(seed)
    if gen_device.type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.normal_(0.0, 0.02)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name].to(b.dtype))
            else:
                logger.warning("%s: buffer %s has no real value; zero-filled", type(module).__name__, name)
                b.zero_()
    return module.eval().requires_grad_(False)


def _tokenizers(index: dict, modules: dict, workload_defaults: dict) -> dict:
    """A small word-level tokenizer per tokenizer slot (its ids stay below any real vocab size); CLIP-style
    (<s> ... </s>, max_position_embeddings long) when the paired text encoder is a CLIP, else T5-style."""
    from planner.glue import word_tokenizer  # the in-code tokenizer the tiny pipelines use

    out = {}
    for key, value in index.items():
        if not key.startswith("tokenizer") or not isinstance(value, list) or not value[1]:
            continue
        encoder = modules.get(key.replace("tokenizer", "text_encoder"))
        clip = encoder is not None and "CLIP" in type(encoder).__name__
        if clip:
            out[key] = word_tokenizer(encoder.config.max_position_embeddings, bos=True)
        else:
            out[key] = word_tokenizer(workload_defaults.get("max_sequence_length", 512), bos=False)
    return out


_SCHEDULERS: dict[str, dict] = {
    "FlowMatchEulerDiscreteScheduler": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096),
    "EulerDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1),
    "UniPCMultistepScheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
}


def _scheduler(index: dict):
    import diffusers

    name = index.get("scheduler", [None, "EulerDiscreteScheduler"])[1]
    return getattr(diffusers, name)(**_SCHEDULERS.get(name, {}))


def _init_kwargs(cls, parts: dict) -> dict:
    """Fill the pipeline constructor: our parts, None for absent optional modules, no watermark/safety checker."""
    kwargs = {}
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if pname in parts:
            kwargs[pname] = parts[pname]
        elif pname in ("add_watermarker", "requires_safety_checker"):
            kwargs[pname] = False
        elif param.default is inspect.Parameter.empty:
            kwargs[pname] = None
    return kwargs


def write_model_folder(pipe, folder: str | Path, dtype: str | None = None) -> Path:
    """A diffusers model folder holding configs only (model_index.json + <component>/config.json) for `pipe`:
    what `load_source` and `memplan plan` read. With it the zoo build path runs on small models too."""
    folder = Path(folder)
    index: dict = {"_class_name": type(pipe).__name__}
    if dtype:
        index["_memplan_workload"] = {"dtype": dtype}
    for name, part in pipe.components.items():
        if part is None:
            continue
        library = "transformers" if type(part).__module__.startswith(("transformers", "tokenizers")) else "diffusers"
        index[name] = [library, type(part).__name__]
        if isinstance(part, torch.nn.Module):
            config = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


class PipelineCache:
    """Holds one pipeline at a time; rebuilds it after fp8 (layerwise casting cannot be undone in process) or
    a failure (hooks and tensors may be half-moved), and frees the previous one before building the next."""

    def __init__(self, builder: Callable = build_pipeline):
        self.builder, self.key, self.pipe, self.clean, self.rss_before_build = builder, None, None, False, 0

    def get(self, scenario: Scenario):
        key = (scenario.pipeline, scenario.device, scenario.seed)
        if self.pipe is None or key != self.key or not self.clean:
            self.drop()
            self.rss_before_build = rss_bytes()
            self.pipe, self.key = self.builder(scenario.pipeline, scenario.device, scenario.seed), key
            self.pipe.set_progress_bar_config(disable=True)
        self.clean = False  # until the run finishes without fp8 and without an error
        return self.pipe

    def release(self, ok: bool, fp8_used: bool) -> None:
        self.clean = ok and not fp8_used

    def drop(self) -> None:
        self.pipe = self.key = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- plans

def _hardware(scenario: Scenario):
    from cost_models import get_gpu

    return dataclasses.replace(get_gpu(scenario.gpu), **scenario.gpu_overrides)


def _workload(scenario: Scenario, pipe) -> dict:
    dtype = str(getattr(pipe, "dtype", torch.float32)).removeprefix("torch.")
    return {"dtype": dtype, **scenario.workload}


def reference_choice(name: str, prof) -> Choice:
    """The reference strategy `name` for every component; block_level falls back to leaf_level where a
    component has no blocks, n is clamped to the largest block list, never-called components stay resident."""
    leaf = ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL)
    uniform = {
        "all_resident": ComponentPlan(RESIDENT), "model_offload": ComponentPlan(MODEL_OFFLOAD),
        "sequential_offload": ComponentPlan(SEQUENTIAL_OFFLOAD),
        "group_leaf_stream": ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL, use_stream=True),
        "group_block_1": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1),
        "group_block_4": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 4),
    }[name]
    comps = {}
    for cname, comp in prof.components.items():
        plan = uniform
        if plan.offload_type == BLOCK_LEVEL:
            plan = leaf if not comp.has_blocks else dataclasses.replace(
                plan, num_blocks_per_group=min(plan.num_blocks_per_group, comp.max_blocks))
        if plan.strategy == GROUP_OFFLOAD and comp.calls_per_run == 0:
            plan = ComponentPlan(RESIDENT)
        comps[cname] = plan
    return Choice(comps)


def make_plan(scenario: Scenario, pipe):
    """The scenario's Plan for `pipe` (not applied): optimized, a reference strategy, or loaded from a file."""
    from cost_models import estimate
    from planner.optimizer import default_ram_budget, plan_for
    from planner.plan import Plan
    from planner.profiler import profile
    from planner.units import parse_size
    from planner.workload import Workload

    hw = _hardware(scenario)
    ram = parse_size(scenario.ram_budget) if scenario.ram_budget is not None else default_ram_budget()[0]
    if scenario.plan == OPTIMIZE:
        return plan_for(pipe, scenario.budget_bytes, ram_budget=ram, gpu=hw, device=scenario.device,
                        allow_lossy=scenario.allow_lossy, n_trials=scenario.n_trials, seed=scenario.seed,
                        storage=scenario.storage, progress=False, **_workload(scenario, pipe))
    source = from_pipeline(pipe)
    if scenario.plan in REFERENCE_PLANS:
        prof = profile(source, **_workload(scenario, pipe))
        work = prof.workload
        choice = reference_choice(scenario.plan, prof)
        comps = {n: {"class": c.class_name, "config_hash": c.config_hash} for n, c in prof.components.items()}
        return Plan(source.pipeline_class, comps, choice, estimate(prof, choice, hw), work.to_dict(),
                    {"vram_bytes": scenario.budget_bytes, "ram_bytes": ram}, hw.to_dict(), scenario.device)
    plan = Plan.load(scenario.plan)
    prof = profile(source, Workload.from_dict(plan.workload)) if plan.workload else profile(
        source, **_workload(scenario, pipe))
    work = prof.workload
    predicted = estimate(prof, plan.choice, hw)  # priced for this scenario's GPU
    return dataclasses.replace(plan, predicted=predicted, workload=work.to_dict(), device=scenario.device)


def plan_fields(plan) -> dict:
    """The row's predicted columns (pred_*) and the Pareto alternatives, from a Plan."""
    row = {"pipeline_class": plan.pipeline_class, "plan_desc": describe_choice(plan.choice),
           "workload": plan.workload, "steps_full": plan.workload.get("num_inference_steps"),
           "fp8": any(p.fp8 for p in plan.choice.components.values()),
           "alternatives": [_alternative(a.choice, a.predicted) for a in plan.alternatives]}
    if plan.predicted is not None:
        row.update({f"pred_{k}": v for k, v in plan.predicted.to_dict().items()})
    return row


def compare_prices(pipe, plan, gpu: str) -> dict:
    """The plan's choice priced for another GPU spec (cmp_* columns), e.g. the table entry beside a calibration."""
    from cost_models import estimate, get_gpu
    from planner.profiler import profile
    from planner.workload import Workload

    est = estimate(profile(from_pipeline(pipe), Workload.from_dict(plan.workload)), plan.choice, get_gpu(gpu))
    return {"cmp_gpu": gpu, "cmp_pred_card_peak_bytes": est.card_peak_bytes,
            "cmp_pred_allocated_peak_bytes": est.allocated_peak_bytes, "cmp_pred_total_s": est.total_s}


def _alternative(choice: Choice, est) -> dict:
    return {"card_peak_bytes": est.card_peak_bytes, "allocated_peak_bytes": est.allocated_peak_bytes,
            "host_ram_bytes": est.host_ram_bytes, "total_s": est.total_s, "desc": describe_choice(choice)}


# ---------------------------------------------------------------- measurement

def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its peak (VmHWM), from /proc/self/status; 0 where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_rss_peak() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseRecorder:
    """Hooks on each component recording every call: component, phase, start/end seconds since `start()`,
    and on CUDA the allocator peak inside that call. Hooks are removed in __exit__."""

    def __init__(self, pipe, cuda: bool, phases: dict[str, str]):
        self.cuda, self.events, self.t0 = cuda, [], time.perf_counter()
        self.modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
        self.phases = {n: phases.get(n, "other") for n in self.modules}
        self.handles: list = []
        self.patched: list = []
        self.peak_alloc = self.peak_reserved = 0
        self._open: dict[str, float] = {}

    def __enter__(self) -> "PhaseRecorder":
        for name, module in self.modules.items():
            if self.phases[name] == "decode" and hasattr(module, "decode"):
                self._wrap_decode(name, module)  # pipelines call vae.decode(), not forward()
            else:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._begin(n)))
                self.handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._end(n)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for module in self.patched:
            del module.decode  # the instance attribute; the class method shows through again

    def _wrap_decode(self, name: str, module) -> None:
        original = module.decode

        def decode(*args, **kwargs):
            self._begin(name)
            try:
                return original(*args, **kwargs)
            finally:
                self._end(name)

        module.decode = decode
        self.patched.append(module)

    def start(self) -> None:
        self.events, self._open = [], {}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak_alloc = self.peak_reserved = 0
        self.t0 = time.perf_counter()

    def _fold(self) -> tuple[int, int]:
        """Fold the allocator's peaks since the last reset into the totals; return them and reset."""
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        self.peak_alloc, self.peak_reserved = max(self.peak_alloc, alloc), max(self.peak_reserved, reserved)
        torch.cuda.reset_peak_memory_stats()
        return alloc, reserved

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0

    def _begin(self, name: str) -> None:
        t = self._now()
        if self.cuda:
            self._fold()
        self._open[name] = t

    def _end(self, name: str) -> None:
        t = self._now()
        peak = self._fold()[0] if self.cuda else None
        self.events.append([name, self.phases[name], self._open.pop(name, t), t, peak])

    def finish(self) -> float:
        t = self._now()
        if self.cuda:
            self._fold()
        return t


def _phases(pipe, plan) -> dict[str, str]:
    """Each component's phase as discovery found it for the plan's workload (the profile is cached)."""
    from cost_models.memory import PHASES
    from planner.profiler import profile
    from planner.workload import Workload

    prof = profile(from_pipeline(pipe), Workload.from_dict(plan.workload)) if plan.workload else profile(
        from_pipeline(pipe))
    return {n: PHASES.get(c.role, "other") for n, c in prof.components.items()}


def measure(pipe, plan, scenario: Scenario, rss_before_build: int) -> dict:
    """Warm up (excluded), run `measured_steps` steps, return the measured columns (meas_*)."""
    cuda = torch.device(scenario.device).type == "cuda"
    full_steps = int(plan.workload.get("num_inference_steps") or scenario.measured_steps)
    steps = min(scenario.measured_steps, full_steps)
    with PhaseRecorder(pipe, cuda, _phases(pipe, plan)) as rec:
        pipe(**call_kwargs(pipe, plan.workload, WARMUP_STEPS, scenario.seed))
        peak_reset = reset_rss_peak()
        if not peak_reset:
            logger.warning("VmHWM cannot be reset here: meas_host_peak_bytes is not recorded (it would include the build)")
        retries = _alloc_retries(cuda)
        rec.start()
        pipe(**call_kwargs(pipe, plan.workload, steps, scenario.seed))
        call_s = rec.finish()
        retries = _alloc_retries(cuda) - retries if cuda else None
    # Host RAM after the measured call, and its peak during the call (VmHWM, reset just before it, so building the
    # pipeline and the warm-up are not in it); both beyond what the process held before the pipeline was built.
    row = {"steps_measured": steps, "meas_call_s": call_s, "meas_timeline": rec.events,
           "meas_host_ram_bytes": rss_bytes() - rss_before_build,
           "meas_host_peak_bytes": rss_bytes("VmHWM") - rss_before_build if peak_reset else None}
    row.update(_phase_times(rec.events, steps, full_steps))
    row.update(_cuda_memory(rec) if cuda else dict.fromkeys(_VRAM_COLUMNS))  # on CPU: no VRAM to measure
    row["meas_alloc_retries"] = retries
    return row


def _alloc_retries(cuda: bool) -> int:
    """The caching allocator's count of allocations it retried after freeing its cache: under the simulated card
    (set_per_process_memory_fraction) a retry means the plan hit the cap, i.e. it did not fit with room to spare."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0


def measured_on(device: str) -> dict:
    """Where the row was measured: the CUDA card by torch's exact name and its memory, or this CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return {"measured_on": torch.cuda.get_device_name(index),
                "measured_total_bytes": torch.cuda.get_device_properties(index).total_memory}
    return {"measured_on": f"cpu ({platform.processor() or platform.machine()})", "measured_total_bytes": None}


def same_device(hw, row: dict) -> bool:
    """Predicted seconds compare with measured ones only on the card they were predicted for: a spec calibrated
    on exactly that card, or the card's own table entry (matched by the one GPU-name resolver)."""
    from cost_models.gpu_names import match

    name, total = row.get("measured_on"), row.get("measured_total_bytes")
    if total is None:  # measured on a CPU: a GPU spec's seconds say nothing about it
        return False
    return hw.source == f"calibrate() on {name}" or match(name, total) == hw.name


def call_kwargs(pipe, workload: dict, steps: int, seed: int) -> dict:
    """The pipeline call for `workload` with `steps` steps; output_type="pt" so the VAE decode runs."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(prompt=PROMPT, height=workload["height"], width=workload["width"], num_inference_steps=steps,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    if workload.get("batch_size", 1) > 1:
        kwargs["num_images_per_prompt"] = workload["batch_size"]
    if "max_sequence_length" in params and workload.get("max_sequence_length"):
        kwargs["max_sequence_length"] = workload["max_sequence_length"]
    if "num_frames" in params and workload.get("num_frames"):
        kwargs["num_frames"] = workload["num_frames"]
    cfg = workload.get("cfg_batch", 1) > 1 or workload.get("cfg_passes", 1) > 1
    kwargs["guidance_scale"] = 5.0 if cfg else 3.5  # Flux: embedded guidance, no CFG batch
    return kwargs


def _phase_times(events: list, steps: int, full_steps: int) -> dict:
    """Measured seconds (meas_*: the measured call, `steps` denoising steps) and, in their own columns, the call
    extrapolated to `full_steps` (extrap_*: the first step once, the mean of the later steps for the rest)."""
    phase_s: dict[str, float] = {}
    for _, phase, start, end, _ in events:
        phase_s[phase] = phase_s.get(phase, 0.0) + (end - start)
    calls = [end - start for _, phase, start, end, _ in events if phase == "denoise"]
    per_step = max(1, len(calls) // steps)
    step_s = [sum(calls[i:i + per_step]) for i in range(0, len(calls), per_step)]
    extrap = dict(phase_s)
    if step_s:
        later = step_s[1:] or step_s[:1]
        extrap["denoise"] = step_s[0] + (full_steps - 1) * sum(later) / len(later)
    return {"meas_phase_s": phase_s, "meas_total_s": sum(phase_s.values()),
            "meas_step_s": (sum(step_s[1:]) / len(step_s[1:])) if len(step_s) > 1 else (step_s[0] if step_s else None),
            "extrap_phase_s": extrap, "extrap_total_s": sum(extrap.values())}


_VRAM_COLUMNS = ("meas_allocated_peak_bytes", "meas_reserved_peak_bytes", "meas_context_bytes", "meas_card_peak_bytes",
                 "meas_phase_peak_bytes", "device_total_bytes")


def _context_and_total_bytes() -> tuple[int, int]:
    """Device memory the allocator does not hold (CUDA context, kernels, library state), and the card's total."""
    free, total = torch.cuda.mem_get_info()
    return max(0, (total - free) - torch.cuda.memory_reserved()), total


def _cuda_memory(rec: PhaseRecorder) -> dict:
    context, total = _context_and_total_bytes()
    phase_peak: dict[str, int] = {}
    for _, phase, _, _, peak in rec.events:
        phase_peak[phase] = max(phase_peak.get(phase, 0), peak or 0)
    return {"meas_allocated_peak_bytes": rec.peak_alloc, "meas_reserved_peak_bytes": rec.peak_reserved,
            "meas_context_bytes": context, "meas_card_peak_bytes": rec.peak_reserved + context,
            "meas_phase_peak_bytes": phase_peak, "device_total_bytes": total}


# ---------------------------------------------------------------- one scenario, many scenarios

def _error_pct(pred, meas) -> float | None:
    """100 * (predicted - measured) / measured: positive when the model over-predicts."""
    if pred is None or meas is None or not meas:
        return None
    return 100.0 * (pred - meas) / meas


def _errors(row: dict, cuda: bool, timed: bool) -> dict:
    """Errors of the predictions; time errors only when `timed` (measured on the device predicted for)."""
    out = {"err_peak_pct": _error_pct(row.get("pred_allocated_peak_bytes"), row.get("meas_allocated_peak_bytes")),
           "err_card_pct": _error_pct(row.get("pred_card_peak_bytes"), row.get("meas_card_peak_bytes")),
           "err_time_pct": _error_pct(row.get("pred_total_s"), row.get("extrap_total_s")) if timed else None,
           # On CPU the "device" is host RAM too, so host RAM cannot be compared with the offloaded bytes.
           "err_host_pct": _error_pct(row.get("pred_host_ram_bytes"), row.get("meas_host_ram_bytes")) if cuda else None}
    if row.get("cmp_gpu"):
        out["err_cmp_card_pct"] = _error_pct(row.get("cmp_pred_card_peak_bytes"), row.get("meas_card_peak_bytes"))
        out["err_cmp_time_pct"] = _error_pct(row.get("cmp_pred_total_s"), row.get("extrap_total_s")) if timed else None
    pred_steps = row.get("steps_full")
    if timed and row.get("meas_step_s") and row.get("pred_phase_s") and pred_steps:
        out["err_step_pct"] = _error_pct(row["pred_phase_s"].get("denoise", 0.0) / pred_steps, row["meas_step_s"])
    return out


def _status(err: BaseException) -> str:
    from planner.search import BudgetError

    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom"
    if isinstance(err, BudgetError):
        return "budget_error"
    if isinstance(err, PlanError):
        return "plan_error"
    return "error"


class _MemoryFraction:
    """Simulate a card of `budget` bytes on CUDA: the allocator may use (budget - context) of the device."""

    def __init__(self, budget_bytes: int, cuda: bool):
        self.budget, self.cuda, self.fraction = budget_bytes, cuda, None

    def __enter__(self) -> "_MemoryFraction":
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            context, total = _context_and_total_bytes()
            self.fraction = min(1.0, max(0.0, (self.budget - context) / total))
            torch.cuda.set_per_process_memory_fraction(self.fraction)
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)


def base_row(scenario: Scenario) -> dict:
    return {"scenario": scenario.name, "pipeline": scenario.pipeline, "plan_kind": scenario.plan,
            "device": scenario.device, "gpu": scenario.gpu, "budget_bytes": scenario.budget_bytes,
            "status": "error", "message": "", "torch": torch.__version__}


def run_scenario(scenario: Scenario, cache: PipelineCache | None = None) -> dict:
    """One row for `scenario`; every failure becomes the row's status and message."""
    cache = cache or PipelineCache()
    row, cuda = base_row(scenario), torch.device(scenario.device).type == "cuda"
    if scenario.needs_cuda and not cuda:
        return {**row, "status": "skipped", "message": f"{scenario.plan} needs CUDA; device is {scenario.device}"}
    ok = fp8 = False
    plan = planned = None
    try:
        t = time.perf_counter()
        pipe = cache.get(scenario)
        row["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        plan = make_plan(scenario, pipe)
        hw = _hardware(scenario)
        row.update(plan_fields(plan), plan_s=time.perf_counter() - t, pred_for=hw.name, **measured_on(scenario.device))
        fp8 = row["fp8"]
        if scenario.compare_gpu:
            row.update(compare_prices(pipe, plan, scenario.compare_gpu))  # before apply: fp8 changes dtypes
        row["budget_met_pred"] = row.get("pred_card_peak_bytes", 0) <= scenario.budget_bytes
        planned = from_pipeline(pipe) if scenario.storage and plan.search else None  # before fp8 changes dtypes
        t = time.perf_counter()
        plan.apply(pipe, scenario.device)  # weights move off the device before the budget is imposed
        row["apply_s"] = time.perf_counter() - t
        with _MemoryFraction(scenario.budget_bytes, cuda) as frac:
            row["memory_fraction"] = frac.fraction
            row.update(measure(pipe, plan, scenario, cache.rss_before_build))
        timed = same_device(hw, row)
        row.update(_errors(row, cuda, timed), time_compared=timed, status="ok")
        # Met: the measured card peak is within the budget AND the allocator never had to flush its cache to stay
        # under the simulated card's cap (a run that only fits by retrying is not counted as fitting).
        row["budget_met"] = (row["meas_card_peak_bytes"] <= scenario.budget_bytes
                             and row["meas_alloc_retries"] == 0) if cuda else None
        ok = True
    except Exception as err:  # recorded, never raised: one broken scenario must not end the sweep
        logger.warning("scenario %s failed: %s: %s", scenario.name, type(err).__name__, err)
        row.update(status=_status(err), message=f"{type(err).__name__}: {err}"[:2000])
        row["budget_met"] = False if row["status"] == "oom" else None
    finally:
        cache.release(ok, fp8)
    if planned is not None:
        _record(row, plan, planned, scenario.storage)
    return row


def _record(row: dict, plan, planned, storage: str) -> None:
    """Put the measured run (or its failure, OOM included) into the study the plan came from."""
    from planner.optimizer import record_run

    failed = row["status"] != "ok"
    record_run(plan, planned, storage, measured_s=None if failed else row.get("extrap_total_s"), failed=failed,
               peak_bytes=row.get("meas_card_peak_bytes"))
    row["recorded_in"] = storage


def run_scenarios(scenarios: list[Scenario], out: str | Path | None = None, *, time_limit_s: float | None = None,
                  progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every scenario in order; rows are appended to `out` (JSONL) as they finish and written as CSV beside
    it at the end. Scenarios not started within `time_limit_s` become rows with status "skipped"."""
    start, rows, cache = time.perf_counter(), [], PipelineCache()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("")
    for scenario in scenarios:
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            row = {**base_row(scenario), "status": "skipped", "message": f"time limit {time_limit_s:.0f}s reached"}
        else:
            row = run_scenario(scenario, cache)
        rows.append(row)
        if out is not None:
            with open(out, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        if progress:
            progress(row)
    cache.drop()
    if out is not None:
        write_csv(rows, Path(out).with_suffix(".csv"))
    return rows


def write_rows(rows: list[dict], out: str | Path) -> None:
    """All rows at once: JSONL at `out`, CSV beside it."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    write_csv(rows, Path(out).with_suffix(".csv"))


def read_rows(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(rows: list[dict], path: str | Path) -> None:
    """The rows as CSV (pandas); dict and list cells are JSON-encoded."""
    import pandas as pd

    flat = [{k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows]
    pd.DataFrame(flat).to_csv(path, index=False)
